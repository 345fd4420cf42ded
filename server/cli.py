"""`lora-server` command line: `serve` the HTTP API, `generate` from a file of requests offline on the engine (mixed
adapters), `merge` an adapter into a checkpoint."""

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

from lora_server.adapters_store import AdapterError, AdapterNotFound, AdapterStore
from lora_server.api.cli_options import HelpFormatter, add_logging_arguments, configure_logging, package_version
from lora_server.api.serve import add_serve_parser, run_serve
from lora_server.demo.paths import DEMO_MODEL_DIR, demo_adapter_dirs
from lora_server.engine.build import EngineOptions, base_description, open_engine
from lora_server.engine.request import EngineRequest, RequestError
from lora_server.engine.sampler import SamplingError, SamplingParams
from lora_server.export import ExportError, add_merge_parser, run_merge
from lora_server.kernels.lora_ops import LORA_BACKENDS, resolve_lora_backend
from lora_server.model.config import ModelConfigError
from lora_server.model.loader import resolve_device

logger = logging.getLogger("lora_server")

DEFAULT_TENANT = "default"
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")


class CliError(Exception):
    """A user error worth one clear line on stderr, not a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-server", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {package_version()}")
    commands = parser.add_subparsers(dest="command", required=True, title="commands", metavar="COMMAND")
    gen = commands.add_parser("generate", help="run a JSONL file of requests on the engine (mixed adapters)",
                              description="Run a JSONL file of requests on the engine; one JSON line per request on "
                                          "stdout, and a one-line summary on stderr.", formatter_class=HelpFormatter)
    gen.add_argument("--model", type=Path, default=None,
                     help="Hugging Face checkpoint directory (default: the embedded demo model and its adapters)")
    gen.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                     help="a PEFT adapter directory, available to requests as NAME (repeatable)")
    gen.add_argument("--quantize", choices=["none", "nf4"], default="none")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    gen.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    gen.add_argument("--lora-backend", choices=list(LORA_BACKENDS), default="auto",
                     help="per-token LoRA math: Triton kernels (auto on CUDA) or plain torch (auto on CPU)")
    gen.add_argument("--max-num-seqs", type=int, default=64, help="sequences admitted at once")
    gen.add_argument("--max-num-batched-tokens", type=int, default=2048, help="tokens in one forward pass")
    gen.add_argument("--requests", type=Path, required=True,
                     help='JSONL: {"prompt": str} or {"prompt_token_ids": [int]}, plus "adapter", "max_new_tokens", '
                          '"temperature", "top_p", "top_k", "seed", "stop"')
    add_logging_arguments(gen)
    add_serve_parser(commands)
    add_merge_parser(commands)
    commands.add_parser("serve-cluster", add_help=False,  # parses its own flags: serve's plus the cluster's
                        help="serve on Ray Serve: engine replicas over one shared adapter repository (CLUSTER.md)")
    return parser


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve-cluster"]:
        from lora_server.cluster.command import run_serve_cluster  # imports Ray: the optional `cluster` extra

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        sys.exit(run_serve_cluster(argv[1:]))
    args = build_parser().parse_args(argv)
    configure_logging(args.log_level, args.log_format)
    try:
        if args.command == "serve":
            sys.exit(run_serve(args))
        if args.command == "merge":
            run_merge(args)
        else:
            run_generate(args)
    except (CliError, AdapterError, AdapterNotFound, ModelConfigError, RequestError, SamplingError,
            ExportError) as error:
        sys.exit(f"lora-server: error: {error}")


def run_generate(args: argparse.Namespace) -> None:
    model_dir = Path(args.model or DEMO_MODEL_DIR)
    adapter_dirs = {} if args.model else dict(demo_adapter_dirs())
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise CliError(f"--adapter takes NAME=PATH, got {spec!r}")
        adapter_dirs[name] = Path(path)
    options = EngineOptions(device=args.device, dtype=args.dtype, quantize=args.quantize,
                            lora_backend=args.lora_backend, max_num_seqs=args.max_num_seqs,
                            max_num_batched_tokens=args.max_num_batched_tokens)
    try:
        resolve_lora_backend(args.lora_backend, resolve_device(args.device))
    except ValueError as error:
        raise CliError(str(error)) from None

    # The adapters go through a throwaway store, so they are validated exactly as uploads to the server are.
    with tempfile.TemporaryDirectory(prefix="lora-server-generate-") as store_dir, \
            AdapterStore.open(store_dir, base_description(model_dir)) as store:
        for name, path in adapter_dirs.items():
            store.put(DEFAULT_TENANT, name, read_adapter_dir(path))
        engine = open_engine(model_dir, store, options, model_name=str(model_dir))
        try:
            report_weight_bytes(engine.model)
            requests = read_requests(args.requests, engine.tokenizer, set(adapter_dirs))
            prepared = []
            for request in requests:  # all checked (and pinned) before any runs
                try:
                    prepared.append(engine.prepare(request))
                except RequestError as error:
                    raise CliError(f"{args.requests}, {request.request_id}: {error}") from None
            started = time.monotonic()
            completions = engine.generate(prepared)
            elapsed_s = time.monotonic() - started
        finally:
            engine.close()
    for completion in completions:
        if completion.finish_reason == "error":
            raise CliError(f"request {completion.request_id}: {completion.error}")
        line = {"token_ids": completion.token_ids, "text": completion.text, "finish_reason": completion.finish_reason}
        print(json.dumps(line), flush=True)
    print(generate_summary(len(completions), sum(len(c.token_ids) for c in completions), elapsed_s), file=sys.stderr)


def generate_summary(num_requests: int, num_tokens: int, elapsed_s: float) -> str:
    rate = num_tokens / elapsed_s if elapsed_s > 0 else 0.0
    return f"lora-server generate: {num_requests} requests, {num_tokens} tokens generated in {elapsed_s:.2f} s " \
           f"({rate:.1f} tokens/s)"


def read_adapter_dir(path: Path) -> dict[str, bytes]:
    if not path.is_dir():
        raise CliError(f"adapter directory {path} does not exist")
    return {name: (path / name).read_bytes() for name in ADAPTER_FILES if (path / name).is_file()}


def report_weight_bytes(model) -> None:
    linear_bytes = sum(linear.base.weight_bytes for linear in model.lora_linears())
    other = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if ".base." not in name)
    logger.info("weight bytes: %.2f MB in decoder linears, %.2f MB in embeddings, norms and LM head",
                linear_bytes / 1e6, other / 1e6)


def read_requests(path: Path, tokenizer, adapter_names: set[str]) -> list[EngineRequest]:
    if not path.is_file():
        raise CliError(f"requests file {path} does not exist")
    requests = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise CliError(f"{path}:{number}: not valid JSON ({error})") from None
        if not isinstance(row, dict) or ("prompt" in row) == ("prompt_token_ids" in row):
            raise CliError(f"{path}:{number}: give exactly one of \"prompt\" or \"prompt_token_ids\"")
        unknown = set(row) - {"prompt", "prompt_token_ids", "adapter", "max_new_tokens", "temperature", "top_p",
                              "top_k", "seed", "stop"}
        if unknown:
            raise CliError(f"{path}:{number}: unknown fields {sorted(unknown)}")
        if "prompt" in row and not isinstance(row["prompt"], str):
            raise CliError(f"{path}:{number}: prompt must be a string")
        token_ids = tokenizer.encode(row["prompt"]) if "prompt" in row else row["prompt_token_ids"]
        if not isinstance(token_ids, list) or not all(isinstance(t, int) for t in token_ids):
            raise CliError(f"{path}:{number}: prompt_token_ids must be a list of integers")
        sampling_keys = ("max_new_tokens", "temperature", "top_p", "top_k", "seed")
        numbers = {k: row[k] for k in sampling_keys if row.get(k) is not None}
        for key, value in numbers.items():
            integral = key in ("max_new_tokens", "top_k", "seed")
            if isinstance(value, bool) or not isinstance(value, int if integral else (int, float)):
                raise CliError(f"{path}:{number}: {key} must be {'an integer' if integral else 'a number'}")
        stop = row.get("stop") or []
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise CliError(f"{path}:{number}: stop must be a list of strings")
        adapter = row.get("adapter")
        if adapter is not None and not isinstance(adapter, str):
            raise CliError(f"{path}:{number}: adapter must be a string or null")
        if adapter is not None and adapter not in adapter_names:
            raise CliError(f"{path}:{number}: unknown adapter {adapter!r} "
                           f"(available: {', '.join(sorted(adapter_names)) or 'none'})")
        try:
            sampling = SamplingParams(**numbers)
        except SamplingError as error:
            raise CliError(f"{path}:{number}: {error}") from None
        requests.append(EngineRequest(prompt_token_ids=token_ids, sampling=sampling, adapter_id=adapter,
                                      tenant=DEFAULT_TENANT, stop=tuple(stop), request_id=f"line {number}"))
    return requests
