"""Per-adapter traffic since start: exact request counts per version (GET /v1/adapters/{id}), and metric series
whose number stays bounded however many adapters there are.

Series. The base model has one (`base`); at most `max_series` adapters have their own (`tenant/adapter_id`: the '/'
cannot occur in an id, so no adapter collides with `base` or `other`); every other adapter's traffic is summed into
`other`. An adapter without a series gets one when there is room, or when it has served more than PROMOTE_FACTOR
times the requests of the tracked adapter with the fewest, which then goes back to `other`.

A series counts from when it was made, never traffic from before: so every series, `other` included, only ever
grows, and Prometheus's increase() over all series together is exact across promotions (a re-promoted adapter's
series restarts at zero, which rate() reads as the counter reset it is).
"""

import threading
from dataclasses import dataclass

BASE_LABEL = "base"
OTHER_LABEL = "other"
# Why a factor above 1: two adapters with about equal traffic would otherwise swap places on every request,
# making a new series each time.
PROMOTE_FACTOR = 1.25


@dataclass
class SeriesCounts:
    requests: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0


class AdapterTraffic:
    def __init__(self, max_series: int) -> None:
        assert max_series >= 1, max_series
        self.max_series = max_series
        self._lock = threading.Lock()  # record() runs on the event loop, samples() may run on a scrape thread
        self._served: dict[tuple[str, str], dict[int | str, int]] = {}  # (tenant, adapter) -> version -> requests
        self._totals: dict[tuple[str, str], int] = {}  # (tenant, adapter) -> requests, all versions
        self._tracked: dict[tuple[str, str], SeriesCounts] = {}
        self._base = SeriesCounts()
        self._other = SeriesCounts()

    def record(self, tenant: str, adapter_id: str | None, version: int | str | None, prompt_tokens: int,
               generation_tokens: int) -> None:
        """One finished (or aborted) request."""
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

    def served(self, tenant: str, adapter_id: str) -> dict[int | str, int]:
        """Requests finished since start, by version."""
        with self._lock:
            return dict(self._served.get((tenant, adapter_id), {}))

    def samples(self) -> list[tuple[str, SeriesCounts]]:
        """(label, counts) of every series: base, each tracked adapter, other."""
        with self._lock:
            tracked = [(f"{tenant}/{adapter_id}", SeriesCounts(**vars(counts)))
                       for (tenant, adapter_id), counts in sorted(self._tracked.items())]
            return [(BASE_LABEL, SeriesCounts(**vars(self._base))), *tracked,
                    (OTHER_LABEL, SeriesCounts(**vars(self._other)))]

    def _series_for(self, lineage: tuple[str, str]) -> SeriesCounts:
        if lineage in self._tracked:
            return self._tracked[lineage]
        if len(self._tracked) < self.max_series:
            self._tracked[lineage] = SeriesCounts()
            return self._tracked[lineage]
        weakest = min(self._tracked, key=lambda key: (self._totals[key], key))
        if self._totals[lineage] > PROMOTE_FACTOR * self._totals[weakest]:
            del self._tracked[weakest]
            self._tracked[lineage] = SeriesCounts()
            return self._tracked[lineage]
        return self._other
