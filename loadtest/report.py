"""Percentiles and the printed table."""

from collections import Counter

from lora_server.loadtest.client import Result

PERCENTILES = (50, 90, 99)


def percentile(values: list[float], p: float) -> float:
    """Nearest-rank percentile; NaN for no values."""
    if not values:
        return float("nan")
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def summarize(results: list[Result], wall_s: float) -> dict:
    ok = [r for r in results if r.ok]
    tokens = sum(r.num_tokens for r in ok)
    latencies = {
        "ttft_ms": [r.ttft_s * 1e3 for r in ok if r.ttft_s is not None],
        "itl_ms": [gap * 1e3 for r in ok for gap in r.token_gaps_s],
        "e2e_ms": [r.e2e_s * 1e3 for r in ok],
    }
    return {
        "requests": len(results), "ok": len(ok), "failed": len(results) - len(ok),
        "statuses": dict(sorted(Counter(r.status for r in results).items())),
        "wall_s": wall_s, "requests_per_s": len(ok) / wall_s if wall_s else 0.0,
        "output_tokens": tokens, "output_tokens_per_s": tokens / wall_s if wall_s else 0.0,
        "latency": {name: {f"p{p}": percentile(values, p) for p in PERCENTILES} | {"mean": _mean(values)}
                    for name, values in latencies.items()},
        "by_adapter": dict(sorted(Counter(r.adapter or "(base)" for r in ok).items())),
        "errors": sorted({r.error for r in results if r.error})[:5],
    }


def format_table(summary: dict) -> str:
    lines = [
        f"requests  {summary['ok']} ok, {summary['failed']} failed  (HTTP statuses {summary['statuses']})",
        f"wall      {summary['wall_s']:.2f} s   {summary['requests_per_s']:.2f} req/s   "
        f"{summary['output_tokens_per_s']:.1f} output tok/s ({summary['output_tokens']} tokens)",
        "",
        f"{'latency (ms)':<14}" + "".join(f"{f'p{p}':>10}" for p in PERCENTILES) + f"{'mean':>10}",
    ]
    for name, label in (("ttft_ms", "first token"), ("itl_ms", "between tokens"), ("e2e_ms", "end to end")):
        row = summary["latency"][name]
        lines.append(f"{label:<14}" + "".join(f"{row[f'p{p}']:>10.1f}" for p in PERCENTILES) + f"{row['mean']:>10.1f}")
    lines += ["", "requests by adapter: " + ", ".join(f"{k} {v}" for k, v in summary["by_adapter"].items())]
    lines += [f"error: {error}" for error in summary["errors"]]
    return "\n".join(lines)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
