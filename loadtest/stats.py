"""One run's results as numbers: throughput, latency mean/p50/p90/p99 (numpy's percentile, linear interpolation, as
vLLM's benchmark_serving reports them), goodput under SLOs, errors by status, latency by adapter popularity rank."""

from collections import Counter
from dataclasses import dataclass

import numpy as np

from lora_server.loadtest.client import Result

PERCENTILES = (50, 90, 99)
METRICS = ("ttft_ms", "itl_ms", "tpot_ms", "e2e_ms")


@dataclass(frozen=True)
class Slo:
    """Goodput counts a request only when it meets every bound given (None: no bound), as in DistServe and vLLM."""
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None

    def is_met(self, result: Result) -> bool:
        if not result.ok:
            return False
        checks = ((self.ttft_ms, result.ttft_s), (self.tpot_ms, result.tpot_s), (self.e2e_ms, result.e2e_s))
        # A request with no first token or a single token has no TTFT/TPOT to miss by.
        return all(bound is None or value is None or value * 1e3 <= bound for bound, value in checks)


def distribution(values: list[float]) -> dict[str, float]:
    """mean and p50/p90/p99; NaN for no values."""
    if not values:
        return {"mean": float("nan")} | {f"p{p}": float("nan") for p in PERCENTILES}
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean())} | {f"p{p}": float(np.percentile(array, p)) for p in PERCENTILES}


def latencies_ms(results: list[Result]) -> dict[str, list[float]]:
    ok = [r for r in results if r.ok]
    return {
        "ttft_ms": [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None],
        "itl_ms": [gap * 1e3 for r in ok for gap in r.chunk_gaps_s],
        "tpot_ms": [r.tpot_s * 1e3 for r in ok if r.tpot_s is not None],
        "e2e_ms": [r.e2e_s * 1e3 for r in ok],
    }


def summarize(results: list[Result], wall_s: float, slo: Slo) -> dict:
    ok = [r for r in results if r.ok]
    output_tokens = sum(r.completion_tokens for r in ok)
    prompt_tokens = sum(r.prompt_tokens for r in ok)
    per_second = 1.0 / wall_s if wall_s > 0 else 0.0
    by_rank: dict[int, list[Result]] = {}
    for result in ok:
        by_rank.setdefault(result.adapter_rank, []).append(result)
    return {
        "requests": len(results), "ok": len(ok), "failed": len(results) - len(ok),
        "errors_by_status": {str(status): count for status, count in
                             sorted(Counter(r.status for r in results if not r.ok).items())},
        "error_samples": sorted({r.error for r in results if r.error})[:5],
        "wall_s": wall_s,
        "request_throughput": len(ok) * per_second,
        "output_token_throughput": output_tokens * per_second,
        "total_token_throughput": (prompt_tokens + output_tokens) * per_second,
        "prompt_tokens": prompt_tokens, "output_tokens": output_tokens,
        "goodput": sum(slo.is_met(r) for r in results) * per_second,
        "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "e2e_ms": slo.e2e_ms},
        "latency": {name: distribution(values) for name, values in latencies_ms(results).items()},
        "by_rank": {str(rank): {"requests": len(group),
                                "ttft_ms": distribution([r.ttft_s * 1e3 for r in group if r.ttft_s is not None]),
                                "e2e_ms": distribution([r.e2e_s * 1e3 for r in group])}
                    for rank, group in sorted(by_rank.items())},
    }
