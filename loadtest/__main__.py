"""python -m lora_server.loadtest: stream N requests at a lora-server with C in flight, spread over adapters, and print
a table (or JSON) of throughput and client-side latency percentiles."""

import argparse
import json
import random
import string
import sys
import time
from concurrent.futures import ThreadPoolExecutor

from lora_server.loadtest.client import Endpoint, Result, stream_completion, stream_generate
from lora_server.loadtest.report import format_table, summarize


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m lora_server.loadtest", description=__doc__)
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--adapters", default="all",
                        help="comma-separated adapter ids, 'base' for the base model, or 'all' (every adapter from "
                             "/v1/models, and the base)")
    parser.add_argument("--route", choices=["generate", "completions"], default="generate")
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--prompt-words", type=int, default=3, help="words per prompt (lowercase, demo style)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per request")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    endpoint = Endpoint(args.url, args.api_key, args.timeout)
    models = endpoint.get_json("/v1/models")["data"]
    base = next(m["id"] for m in models if m.get("parent") is None)
    if args.adapters == "all":
        adapters: list[str | None] = [None] + [m["id"] for m in models if m.get("parent") is not None]
    else:
        adapters = [None if name == "base" else name for name in args.adapters.split(",") if name]
    rng = random.Random(args.seed)
    jobs = [(_prompt(rng, args.prompt_words), rng.choice(adapters)) for _ in range(args.requests)]

    def run(job: tuple[str, str | None]) -> Result:
        prompt, adapter = job
        if args.route == "generate":
            return stream_generate(endpoint, prompt, adapter, args.max_new_tokens)
        return stream_completion(endpoint, prompt, adapter or base, adapter, args.max_new_tokens)

    started = time.perf_counter()
    with ThreadPoolExecutor(args.concurrency) as pool:
        results = list(pool.map(run, jobs))
    summary = summarize(results, time.perf_counter() - started)
    summary["config"] = {"url": args.url, "route": args.route, "requests": args.requests,
                         "concurrency": args.concurrency, "max_new_tokens": args.max_new_tokens}
    print(json.dumps(summary, indent=2) if args.json else format_table(summary))
    return 0 if summary["failed"] == 0 else 1


def _prompt(rng: random.Random, num_words: int) -> str:
    words = ["".join(rng.choice(string.ascii_lowercase) for _ in range(rng.randint(2, 6))) for _ in range(num_words)]
    return " ".join(words) + " => "


if __name__ == "__main__":
    sys.exit(main())
