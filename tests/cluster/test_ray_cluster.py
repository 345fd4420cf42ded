"""The Ray Serve application on the local Ray cluster (conftest.py): two CPU replicas of the demo model on one
shared repository. Uploads through the ingress are served by both replicas; an adapter's repeated requests stay on one
replica (named in the response) and another adapter's go to the other; greedy outputs equal the single server's;
streaming passes through the ingress; one scrape of the ingress's /metrics sees every replica, labelled."""

import time
from collections import Counter

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.api.helpers import expected, generate, upload

REPLICA_HEADER = "x-lora-replica"
SETTLE_TIMEOUT_S = 60
NUM_SETTLED = 4  # consecutive requests on one replica: Ray's router has heard where the adapter is
# Ray's router learns which replica holds an adapter from the replica, through the controller, a fraction of a second
# after the first request; a request sent before that may go to the other replica, which then loads the adapter too,
# and from then on Ray spreads the adapter's requests over both (the CI run of 2026-12-03 saw 4 of 8). So one request
# loads it, and the next wait until the router has heard.
ROUTER_LEARNS_S = 2.0


def settle(client: httpx.Client, adapter: str, demo: str) -> str:
    """The adapter loaded on one replica alone, and requests for it until NUM_SETTLED in a row went to one replica;
    that replica."""
    deadline, run = time.monotonic() + SETTLE_TIMEOUT_S, []
    while len(run) < NUM_SETTLED or len(set(run[-NUM_SETTLED:])) > 1:
        assert time.monotonic() < deadline, f"{adapter}'s requests never settled on a replica: {run}"
        response = generate(client, adapter=adapter)
        assert response.status_code == 200 and response.json()["text"] == expected(demo)  # greedy, as alone
        run.append(response.headers[REPLICA_HEADER])
        if len(run) == 1:
            time.sleep(ROUTER_LEARNS_S)
    return run[-1]


@pytest.mark.slow
def test_uploads_affinity_and_greedy_outputs_through_the_ingress(cluster):
    with httpx.Client(base_url=cluster.url, timeout=120) as client:
        assert upload(client, "up", "upper").status_code == 201
        assert upload(client, "rev", "reverse").status_code == 201
        replicas = {}
        for adapter, demo in (("up", "upper"), ("rev", "reverse")):
            replicas[adapter] = settle(client, adapter, demo)
            served_by = []
            for _ in range(8):
                response = generate(client, adapter=adapter)
                assert response.status_code == 200 and response.json()["text"] == expected(demo)
                served_by.append(response.headers[REPLICA_HEADER])
            # Affinity, as Ray Serve gives it: a preference for a replica that has the adapter, not a rule (a request
            # may go elsewhere when that replica looks busy to the router), so most requests, not all.
            assert served_by.count(replicas[adapter]) >= 6, (replicas[adapter], served_by)
        # "up" is warm on one replica, so Ray sent "rev" to the replica with fewer adapters: the other one.
        assert replicas["up"] != replicas["rev"], replicas
        with client.stream("POST", "/v1/completions", json={"model": "up", "prompt": "hello world", "max_tokens": 8,
                                                            "stream": True}) as stream:
            assert stream.status_code == 200 and stream.headers[REPLICA_HEADER] == replicas["up"]
            assert sum(1 for line in stream.iter_lines() if line.startswith("data:")) > 1  # chunks, not one body


def adapter_counts(client: httpx.Client, adapters: set[str]) -> tuple[Counter, set[str]]:
    """From one scrape of the ingress: finished requests by (replica, adapter) for these adapters, and every replica
    named in a series."""
    response = client.get("/metrics")
    assert response.status_code == 200
    counts: Counter = Counter()
    names = set()
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            names.add(sample.labels["replica"])  # every series is labelled
            if sample.name == "lora_server_adapter_requests_total" and sample.labels["adapter"] in adapters:
                counts[sample.labels["replica"], sample.labels["adapter"]] += sample.value
    return counts, names


@pytest.mark.slow
def test_one_scrape_of_the_ingress_sees_every_replica_labelled(cluster):
    with httpx.Client(base_url=cluster.url, timeout=120) as client:
        # Adapters no other test uses: their counts are this test's requests alone.
        adapters = {"metrics-up": "upper", "metrics-rev": "reverse"}
        for adapter, demo in adapters.items():
            assert upload(client, adapter, demo).status_code == 201
        served: Counter = Counter()
        for adapter in ("metrics-up", "metrics-rev", "metrics-up", "metrics-rev", "metrics-up"):
            response = generate(client, adapter=adapter)
            assert response.status_code == 200
            served[response.headers[REPLICA_HEADER], f"default/{adapter}"] += 1
        # Replicas publish every couple of seconds: wait until the scrape holds all five requests.
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        while (scraped := adapter_counts(client, {adapter for _, adapter in served}))[0] != served:
            assert time.monotonic() < deadline, (scraped, served)
            time.sleep(0.5)
        assert len(scraped[1]) == 2, scraped[1]  # both replicas in one scrape
