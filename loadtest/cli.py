"""lora-loadtest (also `python -m lora_server.loadtest`): S-LoRA's workload, a closed loop or a replayed trace against
a lora-server, swept over rate, number of adapters and alpha, with base-only and merged baselines; prints a table and
writes per-request JSONL, a JSON summary, a Markdown report and PNG plots to --out."""

import argparse
import itertools
import json
import logging
import sys
import threading
from pathlib import Path

from tqdm import tqdm

from lora_server.loadtest.adapters import probe_shapes, upload_random_adapters
from lora_server.loadtest.client import Endpoint, Result, error_message
from lora_server.loadtest.errors import LoadtestError
from lora_server.loadtest.report import format_table, markdown_report, point_label
from lora_server.loadtest.runner import run_closed_loop, run_open_loop
from lora_server.loadtest.stats import Slo, latencies_ms, summarize
from lora_server.loadtest.workload import Job, SLoraWorkload, load_trace, slora_jobs, with_adapter

logger = logging.getLogger(__name__)


def _floats(text: str) -> list[float]:
    return [float(item) for item in text.split(",") if item]


def _ints(text: str) -> list[int]:
    return [int(item) for item in text.split(",") if item]


def _range(text: str) -> tuple[int, int]:
    low, _, high = text.partition(":")
    return int(low), int(high or low)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="lora-loadtest", description=__doc__)
    server = parser.add_argument_group("server")
    server.add_argument("--url", default="http://127.0.0.1:8000")
    server.add_argument("--api-key", default=None, help="a key of the tenant to test (an admin key to upload/merge)")
    server.add_argument("--route", choices=["generate", "completions"], default="generate")
    server.add_argument("--timeout", type=float, default=300.0, help="seconds per request")
    work = parser.add_argument_group("workload")
    work.add_argument("--workload", choices=["slora", "closed", "trace"], default="slora")
    work.add_argument("--rate", type=_floats, default=[1.0], help="slora: requests/s, a comma list to sweep")
    work.add_argument("--cv", type=float, default=1.0, help="slora: coefficient of variation of inter-arrivals")
    work.add_argument("--alpha", type=_floats, default=[1.0], help="slora: power-law exponent, a comma list to sweep")
    work.add_argument("--num-adapters", type=_ints, default=None,
                      help="adapters in play, a comma list to sweep (default: all of --adapters)")
    work.add_argument("--num-requests", "--requests", type=int, default=100, help="requests per point")
    work.add_argument("--input-words", type=_range, default=(2, 8), help="LOW:HIGH words per prompt")
    work.add_argument("--output-tokens", type=_range, default=(8, 32), help="LOW:HIGH max new tokens")
    work.add_argument("--concurrency", type=int, default=8, help="closed: requests in flight")
    work.add_argument("--trace", type=Path, help="trace: JSONL of {timestamp, adapter, prompt, max_new_tokens}")
    work.add_argument("--seed", type=int, default=0)
    adapters = parser.add_argument_group("adapters")
    adapters.add_argument("--adapters", default="all",
                          help="comma list of adapter ids in popularity order, or 'all' (the key's adapters)")
    adapters.add_argument("--upload-adapters", type=int, default=0,
                          help="first upload this many random adapters shaped for the served model (admin key)")
    adapters.add_argument("--ranks", type=_ints, default=[8, 16, 32], help="ranks of the uploaded adapters")
    adapters.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj")
    adapters.add_argument("--adapter-prefix", default="loadtest")
    out = parser.add_argument_group("measurements and outputs")
    out.add_argument("--baselines", action="store_true",
                     help="also run each point with every request on the base model, and on the most popular "
                          "adapter merged (needs --merge-policy manual and an admin key)")
    out.add_argument("--slo-ttft-ms", type=float)
    out.add_argument("--slo-tpot-ms", type=float)
    out.add_argument("--slo-e2e-ms", type=float)
    out.add_argument("--out", type=Path, help="folder for requests.jsonl, summary.json, report.md and the plots")
    out.add_argument("--no-plots", action="store_true")
    out.add_argument("--machine", default="", help="what the server ran on, for the report")
    out.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    try:
        run = execute(args)
    except LoadtestError as error:
        print(f"lora-loadtest: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("lora-loadtest: interrupted", file=sys.stderr)
        return 130
    print(json.dumps(run, indent=2) if args.json else format_table(run["points"]))
    return 0 if all(point["summary"]["failed"] == 0 for point in run["points"]) else 1


def execute(args: argparse.Namespace) -> dict:
    endpoint = Endpoint(args.url, args.api_key, args.timeout)
    models = endpoint.get_json("/v1/models")["data"]
    base_model = next(model["id"] for model in models if model.get("parent") is None)
    available = [model["id"] for model in models if model.get("parent") is not None]
    if args.upload_adapters:
        shapes = probe_shapes(endpoint, tuple(args.target_modules.split(",")))
        adapters = upload_random_adapters(endpoint, shapes, args.upload_adapters, tuple(args.ranks),
                                          args.adapter_prefix, args.seed)
    elif args.adapters == "all":
        adapters = available
    else:
        adapters = [name for name in args.adapters.split(",") if name]
        unknown = [name for name in adapters if name not in available and name != "base"]
        if unknown:
            raise LoadtestError(f"unknown adapter {unknown[0]!r}: this key's tenant has "
                                f"{', '.join(available) or 'no adapters'} (see GET /v1/models)")
    slo = Slo(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2e_ms)
    points: list[dict] = []
    all_results: list[tuple[dict, list[Result]]] = []
    notes: list[str] = []
    for key, jobs in plan(args, adapters):
        num_adapters, alpha, rate = key
        modes: list[tuple[str, list[Job]]] = [("lora", jobs)]
        if args.baselines:
            modes.append(("base", with_adapter(jobs, None)))
            if adapters:
                modes.append(("merged", with_adapter(jobs, adapters[0])))
        for mode, mode_jobs in modes:
            label = {"num_adapters": num_adapters, "alpha": alpha, "rate": rate, "mode": mode}
            if mode == "merged" and not merge(endpoint, adapters[0], notes):
                continue
            try:
                results, wall_s = send(args, endpoint, base_model, mode_jobs, f"{point_label(label)} [{mode}]")
            finally:
                if mode == "merged":
                    endpoint.post_json("DELETE", f"/v1/adapters/{adapters[0]}/merge")
            points.append(label | {"summary": summarize(results, wall_s, slo)})
            all_results.append((label, results))
    config = {"url": args.url, "route": args.route, "workload": args.workload, "seed": args.seed,
              "cv": args.cv, "num_requests": args.num_requests, "input_words": args.input_words,
              "output_tokens": args.output_tokens, "concurrency": args.concurrency, "machine": args.machine,
              "slo": {"ttft_ms": slo.ttft_ms, "tpot_ms": slo.tpot_ms, "e2e_ms": slo.e2e_ms}}
    run = {"config": config, "points": points, "notes": notes}
    if args.out:
        write_outputs(args, run, all_results)
    return run


def plan(args: argparse.Namespace, adapters: list[str]) -> list[tuple[tuple[int, float, float | None], list[Job]]]:
    """((num_adapters, alpha, rate), jobs) for each point of the sweep."""
    if args.workload == "trace":
        if args.trace is None:
            raise LoadtestError("--workload trace needs --trace FILE")
        return [((len(adapters), 0.0, None), load_trace(args.trace))]
    counts = args.num_adapters or [len(adapters)]
    if max(counts) > len(adapters):
        raise LoadtestError(f"--num-adapters {max(counts)}: only {len(adapters)} adapters to choose from "
                            "(upload more with --upload-adapters N)")
    # A closed loop ignores arrival times: one point per (n, alpha), whatever --rate says.
    rates: list[float | None] = [None] if args.workload == "closed" else list(args.rate)
    points = []
    for num_adapters, alpha, rate in itertools.product(counts, args.alpha, rates):
        workload = SLoraWorkload(rate or 1.0, args.cv, alpha, args.num_requests, args.input_words, args.output_tokens)
        points.append(((num_adapters, alpha, rate), slora_jobs(workload, adapters[:num_adapters], args.seed)))
    return points


def send(args: argparse.Namespace, endpoint: Endpoint, base_model: str, jobs: list[Job],
         label: str) -> tuple[list[Result], float]:
    lock = threading.Lock()
    # disable=None: a bar on a terminal, nothing when stderr is a file or a pipe (CI logs).
    with tqdm(total=len(jobs), desc=label, unit="req", disable=None, leave=False) as bar:
        def progress() -> None:
            with lock:
                bar.update(1)

        if args.workload == "closed":
            return run_closed_loop(endpoint, args.route, base_model, jobs, args.concurrency, progress)
        return run_open_loop(endpoint, args.route, base_model, jobs, progress)


def merge(endpoint: Endpoint, adapter: str, notes: list[str]) -> bool:
    status, body = endpoint.post_json("POST", f"/v1/adapters/{adapter}/merge")
    if status == 200:
        return True
    notes.append(f"merged baseline skipped: merging {adapter!r} answered HTTP {status}: {error_message(body)}")
    logger.warning("%s", notes[-1])
    return False


def write_outputs(args: argparse.Namespace, run: dict, all_results: list[tuple[dict, list[Result]]]) -> None:
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "requests.jsonl", "w") as file:
        for label, results in all_results:
            for result in results:
                file.write(json.dumps(label | result.to_json()) + "\n")
    if not args.no_plots:
        from lora_server.loadtest.plots import write_plots  # matplotlib is slow to import: only when plotting

        run["plots"] = write_plots(args.out, run["points"], [latencies_ms(results) for _, results in all_results])
    (args.out / "summary.json").write_text(json.dumps(run, indent=2))
    (args.out / "report.md").write_text(markdown_report(run))
    logger.info("wrote %s", args.out)
