"""A black-box load generator for lora-server: streams requests over plain HTTP (standard library only, nothing from
server/) and reports throughput and latency percentiles. `python -m lora_server.loadtest --help`."""
