"""Every replica's Prometheus metrics in one scrape of the ingress, each series labelled `replica="<name>"`.

Each engine replica publishes its single server's exposition text to the metrics board (one small deployment) every
PUBLISH_INTERVAL_S; the ingress's /metrics merges what the board holds. A replica that stopped publishing (dead,
scaled down) drops out after STALE_AFTER_S. Plain Python, no Ray: the board's bookkeeping and the merge are tested
directly; app.py wraps them in deployments."""

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import Metric
from prometheus_client.parser import text_string_to_metric_families

REPLICA_LABEL = "replica"
PUBLISH_INTERVAL_S = 2.0  # a scrape sees each replica's metrics at most this old (Prometheus scrapes every 15 s)
STALE_AFTER_S = 3 * PUBLISH_INTERVAL_S  # a replica silent this long is gone: two missed publishes are not enough


class MetricsBoard:
    """The latest exposition text of each replica, by replica name, with the (monotonic) time it arrived."""

    def __init__(self) -> None:
        self._latest: dict[str, tuple[float, str]] = {}

    def publish(self, replica: str, text: str, now: float) -> None:
        self._latest[replica] = (now, text)

    def current(self, now: float) -> dict[str, str]:
        """Replica name -> text, for the replicas heard from within STALE_AFTER_S; the others are forgotten."""
        self._latest = {name: (at, text) for name, (at, text) in self._latest.items() if now - at <= STALE_AFTER_S}
        return {name: text for name, (_, text) in self._latest.items()}


def merge_replica_metrics(texts: dict[str, str]) -> bytes:
    """One exposition of every replica's metrics: each family once (HELP and TYPE from the first replica that has
    it), each sample with REPLICA_LABEL set to its replica's name."""
    families: dict[str, Metric] = {}
    for replica, text in sorted(texts.items()):
        for family in text_string_to_metric_families(text):
            merged = families.setdefault(family.name, Metric(family.name, family.documentation, family.type,
                                                             family.unit))
            merged.samples += [sample._replace(labels={**sample.labels, REPLICA_LABEL: replica})
                               for sample in family.samples]
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Fixed(list(families.values())))
    return generate_latest(registry)


class _Fixed:
    """A collector of metrics already collected."""

    def __init__(self, metrics: list[Metric]) -> None:
        self._metrics = metrics

    def collect(self) -> list[Metric]:
        return self._metrics
