"""The ingress's /metrics merge: every replica's series, each labelled with its replica, values untouched; a replica
that stopped publishing drops out of the board."""

import random

from prometheus_client.parser import text_string_to_metric_families

from lora_server.api.metrics import ApiMetrics
from lora_server.cluster.replica_metrics import REPLICA_LABEL, STALE_AFTER_S, MetricsBoard, merge_replica_metrics


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def test_every_replicas_series_is_there_once_labelled_with_its_replica():
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    texts = {}
    for name in ("replica-a", "replica-b"):
        metrics = ApiMetrics(max_adapter_series=8, stats=lambda: None, num_stored_versions=lambda: None)
        for _ in range(rng.randrange(1, 20)):
            metrics.requests.labels("/v1/generate", rng.choice(["200", "404"])).inc()
        metrics.finished.labels("stop").inc(rng.randrange(1, 100))
        metrics.e2e_latency.observe(rng.random())
        texts[name] = metrics.render().decode()
    merged = merge_replica_metrics(texts).decode()
    expected = {(sample_name, tuple(sorted({**dict(labels), REPLICA_LABEL: name}.items()))): value
                for name, text in texts.items() for (sample_name, labels), value in _samples(text).items()}
    assert _samples(merged) == expected, f"seed {seed}"
    assert merged.count("# TYPE lora_server_requests_total counter") == 1  # one family, both replicas' series


def test_the_board_forgets_a_replica_that_stopped_publishing():
    board = MetricsBoard()
    board.publish("a", "x 1\n", now=100.0)
    board.publish("b", "x 2\n", now=100.0 + STALE_AFTER_S / 2)
    assert board.current(now=100.0 + STALE_AFTER_S) == {"a": "x 1\n", "b": "x 2\n"}
    assert board.current(now=100.0 + STALE_AFTER_S + 1) == {"b": "x 2\n"}
    board.publish("a", "x 3\n", now=100.0 + STALE_AFTER_S + 2)  # a restarted replica under the same name returns
    assert board.current(now=100.0 + STALE_AFTER_S + 2) == {"a": "x 3\n", "b": "x 2\n"}
