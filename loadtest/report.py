"""The printed table and the Markdown report of a run: one row per (adapters, alpha, rate, mode) point, then the
baselines side by side, then latency by adapter popularity rank."""

import math

from lora_server.loadtest.stats import PERCENTILES

LATENCY_LABELS = {"ttft_ms": "TTFT", "itl_ms": "ITL", "tpot_ms": "TPOT", "e2e_ms": "e2e"}


def point_label(point: dict) -> str:
    return (f"n={point['num_adapters']} a={point['alpha']:g} rate={point['rate']:g}" if point["rate"] is not None
            else f"n={point['num_adapters']}")


def format_table(points: list[dict]) -> str:
    """A plain-text table for the terminal."""
    lines = []
    for point in points:
        summary = point["summary"]
        lines.append(f"{point_label(point)} [{point['mode']}]: {summary['ok']}/{summary['requests']} ok "
                     f"{_errors(summary)}in {summary['wall_s']:.1f} s, {summary['request_throughput']:.2f} req/s, "
                     f"{summary['output_token_throughput']:.1f} out tok/s, goodput {summary['goodput']:.2f} req/s")
        for name, label in LATENCY_LABELS.items():
            row = summary["latency"][name]
            lines.append(f"    {label:<5} ms  mean {_ms(row['mean'])}" +
                         "".join(f"  p{p} {_ms(row[f'p{p}'])}" for p in PERCENTILES))
    lines += [f"error: {error}" for point in points for error in point["summary"]["error_samples"]][:5]
    return "\n".join(lines)


def markdown_report(run: dict) -> str:
    points = run["points"]
    config = run["config"]
    lines = [f"# lora-server load test: {config['workload']} workload", "",
             f"Server {config['url']}, route `{config['route']}`, seed {config['seed']}. "
             f"Machine: {config.get('machine') or 'not given (--machine)'}.", "",
             "| adapters | alpha | rate (req/s) | mode | ok | req/s | out tok/s | goodput | TTFT p50 | TTFT p99 | "
             "TPOT p50 | TPOT p99 | e2e p50 | e2e p99 |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for point in points:
        s, lat = point["summary"], point["summary"]["latency"]
        rate = "closed" if point["rate"] is None else f"{point['rate']:g}"
        lines.append(f"| {point['num_adapters']} | {point['alpha']:g} | {rate} | {point['mode']} | "
                     f"{s['ok']}/{s['requests']} | {s['request_throughput']:.2f} | "
                     f"{s['output_token_throughput']:.1f} | "
                     f"{s['goodput']:.2f} | {_ms(lat['ttft_ms']['p50'])} | {_ms(lat['ttft_ms']['p99'])} | "
                     f"{_ms(lat['tpot_ms']['p50'])} | {_ms(lat['tpot_ms']['p99'])} | {_ms(lat['e2e_ms']['p50'])} | "
                     f"{_ms(lat['e2e_ms']['p99'])} |")
    lines += ["", "Latencies in ms. Goodput: requests per second that met every SLO given "
              f"(TTFT {config['slo']['ttft_ms']}, TPOT {config['slo']['tpot_ms']}, e2e {config['slo']['e2e_ms']} ms; "
              "None: no bound)."]
    overheads = baseline_ratios(points)
    if overheads:
        lines += ["", "## LoRA overhead against the baselines (same arrivals, prompts and lengths)", "",
                  "| point | e2e p50 LoRA / base | TPOT p50 LoRA / base | TPOT p50 merged / base |",
                  "|---|---:|---:|---:|"]
        lines += [f"| {label} | {_ratio(ratios['e2e_lora'])} | {_ratio(ratios['tpot_lora'])} | "
                  f"{_ratio(ratios['tpot_merged'])} |" for label, ratios in overheads.items()]
    for note in run.get("notes", []):
        lines += ["", f"Note: {note}"]
    failures = [(point_label(point), point["mode"], point["summary"]) for point in points if point["summary"]["failed"]]
    if failures:
        lines += ["", "## Errors", ""]
        lines += [f"- {label} [{mode}]: by status {s['errors_by_status']}; e.g. {s['error_samples'][:2]}"
                  for label, mode, s in failures]
    lora = [point for point in points if point["mode"] == "lora"]
    if lora:
        last = lora[-1]
        lines += ["", f"## Latency by adapter popularity rank ({point_label(last)})", "",
                  "| rank | requests | TTFT p50 | TTFT p99 | e2e p50 | e2e p99 |", "|---:|---:|---:|---:|---:|---:|"]
        for rank, row in list(last["summary"]["by_rank"].items())[:20]:
            lines.append(f"| {rank} | {row['requests']} | {_ms(row['ttft_ms']['p50'])} | {_ms(row['ttft_ms']['p99'])} "
                         f"| {_ms(row['e2e_ms']['p50'])} | {_ms(row['e2e_ms']['p99'])} |")
    if run.get("plots"):
        lines += ["", "## Plots", ""] + [f"![{name}]({name})" for name in run["plots"]]
    return "\n".join(lines) + "\n"


def baseline_ratios(points: list[dict]) -> dict[str, dict[str, float]]:
    """For each point that has a base-only run: LoRA/base and merged/base ratios of the p50s."""
    by_key: dict[tuple, dict[str, dict]] = {}
    for point in points:
        key = (point["num_adapters"], point["alpha"], point["rate"])
        by_key.setdefault(key, {})[point["mode"]] = point["summary"]["latency"]
    ratios = {}
    for (num, alpha, rate), modes in by_key.items():
        if "base" not in modes or "lora" not in modes:
            continue
        base = modes["base"]
        merged = modes.get("merged")
        label = point_label({"num_adapters": num, "alpha": alpha, "rate": rate})
        ratios[label] = {"e2e_lora": _div(modes["lora"]["e2e_ms"]["p50"], base["e2e_ms"]["p50"]),
                         "tpot_lora": _div(modes["lora"]["tpot_ms"]["p50"], base["tpot_ms"]["p50"]),
                         "tpot_merged": _div(merged["tpot_ms"]["p50"], base["tpot_ms"]["p50"]) if merged else math.nan}
    return ratios


def _div(a: float, b: float) -> float:
    return a / b if b and not math.isnan(b) else math.nan


def _ratio(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.2f}x"


def _ms(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{value:.1f}"


def _errors(summary: dict) -> str:
    return f"(failed by status {summary['errors_by_status']}) " if summary["failed"] else ""
