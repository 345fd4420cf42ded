"""Per-adapter traffic since start: exact request counts per version (GET /v1/adapters/{id}), and metric series
whose number stays bounded however many adapters there are.

Series. The base model has one (`base`); at most `max_series` adapters have their own (`tenant/adapter_id`: the '/'
cannot occur in an id, so no adapter collides with `base` or `other`); every other adapter's traffic is summed into
`other`. An adapter without a series gets one when there is room, or when it has served more than PROMOTE_FACTOR
times the requests of the tracked adapter with the fewest, which then goes back to `other`.

A series counts from when it was made, never traffic from before: so every series, `other` included, only ever
grows, and Prometheus's increase() over all series together is exact across promotions (a re-promoted adapter's
series restarts at zero, which rate() reads as the counter reset it is).

Each series also holds two latency histograms (time to first token, end to end), so per-adapter latency is bounded by
the same series: (max_series + 2) label values, each with one count per bucket.
"""

import threading
from bisect import bisect_left
from dataclasses import dataclass, field

BASE_LABEL = "base"
OTHER_LABEL = "other"
# Why a factor above 1: two adapters with about equal traffic would otherwise swap places on every request,
# making a new series each time.
PROMOTE_FACTOR = 1.25


@dataclass
class LatencyCounts:
    """A histogram's state: `counts[i]` observations in (bounds[i-1], bounds[i]] (not cumulative), the last one
    above every bound (+Inf); `sum` of every observation."""

    bounds: tuple[float, ...]
    counts: list[int] = field(default_factory=list)
    sum: float = 0.0

    def __post_init__(self) -> None:
        assert list(self.bounds) == sorted(set(self.bounds)), self.bounds
        if not self.counts:
            self.counts = [0] * (len(self.bounds) + 1)
        assert len(self.counts) == len(self.bounds) + 1, (self.bounds, self.counts)

    @property
    def count(self) -> int:
        return sum(self.counts)

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1  # Prometheus' `le`: a value on a bound is in its bucket
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        """(upper bound, observations at or below it), +Inf last: Prometheus' buckets."""
        totals, running = [], 0
        for bound, count in zip((*self.bounds, float("inf")), self.counts, strict=True):
            running += count
            totals.append((bound, running))
        return totals

    def copy(self) -> "LatencyCounts":
        return LatencyCounts(self.bounds, list(self.counts), self.sum)


@dataclass
class SeriesCounts:
    requests: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    time_to_first_token: LatencyCounts = field(default_factory=lambda: LatencyCounts(()))
    e2e_latency: LatencyCounts = field(default_factory=lambda: LatencyCounts(()))

    def copy(self) -> "SeriesCounts":
        return SeriesCounts(self.requests, self.prompt_tokens, self.generation_tokens,
                            self.time_to_first_token.copy(), self.e2e_latency.copy())


class AdapterTraffic:
    def __init__(self, max_series: int, ttft_buckets: tuple[float, ...] = (),
                 e2e_buckets: tuple[float, ...] = ()) -> None:
        """`ttft_buckets`, `e2e_buckets`: upper bounds (seconds) of each series' latency histograms; none leaves
        only the +Inf bucket (a count and a sum)."""
        assert max_series >= 1, max_series
        self.max_series = max_series
        self._ttft_buckets = ttft_buckets
        self._e2e_buckets = e2e_buckets
        self._lock = threading.Lock()  # record() runs on the event loop, samples() may run on a scrape thread
        self._served: dict[tuple[str, str], dict[int | str, int]] = {}  # (tenant, adapter) -> version -> requests
        self._totals: dict[tuple[str, str], int] = {}  # (tenant, adapter) -> requests, all versions
        self._tracked: dict[tuple[str, str], SeriesCounts] = {}
        self._base = self._new_series()
        self._other = self._new_series()

    def record(self, tenant: str, adapter_id: str | None, version: int | str | None, prompt_tokens: int,
               generation_tokens: int, time_to_first_token_s: float | None = None,
               e2e_latency_s: float | None = None) -> None:
        """One finished (or aborted) request; `time_to_first_token_s` None if it produced no token. The latencies
        are recorded here, at its end, with its counts: so all of one request lands in one series, even if its
        adapter was promoted while it ran."""
        with self._lock:
            if adapter_id is None:
                series = self._base
            else:
                lineage = (tenant, adapter_id)
                by_version = self._served.setdefault(lineage, {})
                by_version[version] = by_version.get(version, 0) + 1
                self._totals[lineage] = self._totals.get(lineage, 0) + 1
                series = self._series_for(lineage)
            series.requests += 1
            series.prompt_tokens += prompt_tokens
            series.generation_tokens += generation_tokens
            if time_to_first_token_s is not None:
                series.time_to_first_token.observe(time_to_first_token_s)
            if e2e_latency_s is not None:
                series.e2e_latency.observe(e2e_latency_s)

    def served(self, tenant: str, adapter_id: str) -> dict[int | str, int]:
        """Requests finished since start, by version."""
        with self._lock:
            return dict(self._served.get((tenant, adapter_id), {}))

    def samples(self) -> list[tuple[str, SeriesCounts]]:
        """(label, counts) of every series: base, each tracked adapter, other."""
        with self._lock:
            tracked = [(f"{tenant}/{adapter_id}", counts.copy())
                       for (tenant, adapter_id), counts in sorted(self._tracked.items())]
            return [(BASE_LABEL, self._base.copy()), *tracked, (OTHER_LABEL, self._other.copy())]

    def label_of(self, tenant: str, adapter_id: str | None) -> str:
        """The series label an adapter's traffic counts under now: its own if tracked, else base or other (for
        gauges that follow the counters' bounded labels; nothing is promoted by asking)."""
        if adapter_id is None:
            return BASE_LABEL
        with self._lock:
            return f"{tenant}/{adapter_id}" if (tenant, adapter_id) in self._tracked else OTHER_LABEL

    def _new_series(self) -> SeriesCounts:
        return SeriesCounts(time_to_first_token=LatencyCounts(self._ttft_buckets),
                            e2e_latency=LatencyCounts(self._e2e_buckets))

    def _series_for(self, lineage: tuple[str, str]) -> SeriesCounts:
        if lineage in self._tracked:
            return self._tracked[lineage]
        if len(self._tracked) < self.max_series:
            self._tracked[lineage] = self._new_series()
            return self._tracked[lineage]
        weakest = min(self._tracked, key=lambda key: (self._totals[key], key))
        if self._totals[lineage] > PROMOTE_FACTOR * self._totals[weakest]:
            del self._tracked[weakest]
            self._tracked[lineage] = self._new_series()
            return self._tracked[lineage]
        return self._other
