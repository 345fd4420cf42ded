"""An upload hands the adapter it parsed (to validate it) to the engine's host cache: the first request for the new
version loads it from the host, never parsing its files from disk again, and runs it exactly."""

from tests.api.helpers import expected, generate, metrics, put_version, upload, value

LOADS = "lora_server_adapter_loads_total"


def loads_between(before: dict, after: dict) -> dict[str, float]:
    return {source: value(after, LOADS, source=source) - value(before, LOADS, source=source)
            for source in ("host", "disk")}


def test_the_first_load_after_an_upload_comes_from_the_host(acme):
    before = metrics(acme)
    assert upload(acme, "handed-over", "title").status_code == 201
    response = generate(acme, adapter="handed-over")
    assert response.status_code == 200 and response.json()["text"] == expected("title")
    assert loads_between(before, metrics(acme)) == {"host": 1, "disk": 0}

    before = metrics(acme)  # a new version (hot-swap) is handed over too
    assert put_version(acme, "handed-over", "rot13").status_code == 201
    response = generate(acme, adapter="handed-over")
    assert response.json()["text"] == expected("rot13") and response.json()["adapter_version"] == 2
    assert loads_between(before, metrics(acme)) == {"host": 1, "disk": 0}
