"""PNG plots of a run through matplotlib's Agg backend (no display needed): latency CDFs, throughput and p99 latency
against the offered rate, TTFT by adapter popularity rank. Each function returns the file name it wrote."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: a headless machine has no display, and a GUI backend would want one

import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend
import numpy as np  # noqa: E402

from lora_server.loadtest.report import point_label  # noqa: E402


def write_plots(out_dir: Path, points: list[dict], latencies: list[dict[str, list[float]]]) -> list[str]:
    """`latencies[i]`: point i's raw latencies in ms (stats.latencies_ms)."""
    names = [_latency_cdfs(out_dir, points, latencies)]
    lora = [point for point in points if point["mode"] == "lora" and point["rate"] is not None]
    if len({point["rate"] for point in lora}) > 1:
        names.append(_against_rate(out_dir, lora))
    if lora and lora[-1]["summary"]["by_rank"]:
        names.append(_ttft_by_rank(out_dir, lora[-1]))
    return names


def _latency_cdfs(out_dir: Path, points: list[dict], latencies: list[dict[str, list[float]]]) -> str:
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    for axis, name, title in zip(axes, ("ttft_ms", "tpot_ms", "e2e_ms"), ("time to first token", "time per output "
                                                                           "token", "end to end"), strict=True):
        for point, values in zip(points, latencies, strict=True):
            if values[name]:
                ordered = np.sort(values[name])
                axis.plot(ordered, np.arange(1, len(ordered) + 1) / len(ordered),
                          label=f"{point_label(point)} [{point['mode']}]")
        axis.set(title=title, xlabel="ms", ylabel="fraction of requests")
        axis.grid(alpha=0.3)
    axes[0].legend(fontsize=6)
    return _save(figure, out_dir, "latency_cdf.png")


def _against_rate(out_dir: Path, lora: list[dict]) -> str:
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    for key in sorted({(point["num_adapters"], point["alpha"]) for point in lora}):
        series = sorted((point for point in lora if (point["num_adapters"], point["alpha"]) == key),
                        key=lambda point: point["rate"])
        rates = [point["rate"] for point in series]
        label = f"n={key[0]} a={key[1]:g}"
        left.plot(rates, [point["summary"]["request_throughput"] for point in series], "o-", label=label)
        right.plot(rates, [point["summary"]["latency"]["e2e_ms"]["p99"] for point in series], "o-", label=label)
        right.plot(rates, [point["summary"]["latency"]["ttft_ms"]["p99"] for point in series], "s--",
                   label=f"{label} TTFT")
    left.set(title="throughput", xlabel="offered rate (req/s)", ylabel="finished req/s")
    right.set(title="p99 latency", xlabel="offered rate (req/s)", ylabel="ms")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    return _save(figure, out_dir, "rate_sweep.png")


def _ttft_by_rank(out_dir: Path, point: dict) -> str:
    rows = sorted((int(rank), row) for rank, row in point["summary"]["by_rank"].items() if int(rank) > 0)
    figure, axis = plt.subplots(figsize=(6, 3.8))
    ranks = [rank for rank, _ in rows]
    axis.plot(ranks, [row["ttft_ms"]["p50"] for _, row in rows], "o", markersize=3, label="p50")
    axis.plot(ranks, [row["ttft_ms"]["p99"] for _, row in rows], "x", markersize=3, label="p99")
    axis.set(title=f"TTFT by adapter popularity rank ({point_label(point)})", xlabel="rank (1 = most requested)",
             ylabel="ms", xscale="log")
    axis.grid(alpha=0.3)
    axis.legend()
    return _save(figure, out_dir, "ttft_by_rank.png")


def _save(figure: plt.Figure, out_dir: Path, name: str) -> str:
    figure.tight_layout()
    figure.savefig(out_dir / name, dpi=80)
    plt.close(figure)
    return name
