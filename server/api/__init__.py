"""HTTP: schemas, routes, auth, metrics. Talks to the engine only through AsyncEngine (submit, abort, stats).

`create_app(config, loader)` builds the FastAPI app; `serve.py` is the `lora-server serve` command around it."""
