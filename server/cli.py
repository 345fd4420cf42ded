"""`lora-server` command line: `generate` runs a file of requests offline, in one batch, with mixed adapters."""

import argparse
import json
import logging
import sys
from pathlib import Path

from adapters_store import AdapterError, load_peft_adapter
from kernels.lora_ops import LORA_BACKENDS, resolve_lora_backend
from server.demo.paths import DEMO_MODEL_DIR, demo_adapter_dirs
from server.engine.base_description import describe_base_model
from server.engine.offline import GenerationError, GenerationRequest, generate
from server.engine.sampler import SamplingError, SamplingParams
from server.model.config import ModelConfigError
from server.model.loader import load_model, read_config, resolve_device, resolve_dtype
from server.model.tokenizer import load_tokenizer

logger = logging.getLogger("lora_server")


class CliError(Exception):
    """A user error worth one clear line on stderr, not a traceback."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lora-server", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="run a JSONL file of requests in one mixed-adapter batch")
    gen.add_argument("--model", type=Path, default=None,
                     help="Hugging Face checkpoint directory (default: the embedded demo model and its adapters)")
    gen.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                     help="a PEFT adapter directory, available to requests as NAME (repeatable)")
    gen.add_argument("--quantize", choices=["none", "nf4"], default="none")
    gen.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    gen.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto")
    gen.add_argument("--lora-backend", choices=list(LORA_BACKENDS), default="auto",
                     help="per-token LoRA math: Triton kernels (auto on CUDA) or plain torch (auto on CPU)")
    gen.add_argument("--requests", type=Path, required=True,
                     help='JSONL: {"prompt": str} or {"prompt_token_ids": [int]}, plus "adapter", "max_new_tokens", '
                          '"temperature", "top_p", "top_k", "seed"')
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    try:
        run_generate(args)
    except (CliError, AdapterError, ModelConfigError, GenerationError, SamplingError) as error:
        sys.exit(f"lora-server: error: {error}")


def run_generate(args: argparse.Namespace) -> None:
    model_dir = args.model or DEMO_MODEL_DIR
    adapter_dirs = {} if args.model else dict(demo_adapter_dirs())
    for spec in args.adapter:
        name, sep, path = spec.partition("=")
        if not sep or not name or not path:
            raise CliError(f"--adapter takes NAME=PATH, got {spec!r}")
        adapter_dirs[name] = Path(path)

    device = resolve_device(args.device)
    try:
        lora_backend = resolve_lora_backend(args.lora_backend, device)
    except ValueError as error:
        raise CliError(str(error)) from None
    checkpoint_dtype = read_config(Path(model_dir)).checkpoint_dtype
    model = load_model(model_dir, device, resolve_dtype(args.dtype, device, checkpoint_dtype))
    model.set_lora_backend(lora_backend)
    report_weight_bytes(model, quantize=args.quantize == "nf4")
    tokenizer = load_tokenizer(model_dir, model.config.eos_token_ids)
    base = describe_base_model(model.config, name=str(model_dir))
    adapters = {name: load_peft_adapter(path, base) for name, path in adapter_dirs.items()}

    requests = read_requests(args.requests, tokenizer)
    results = generate(model, requests, adapters, tokenizer.eos_token_ids)
    for result in results:
        line = {"token_ids": result.token_ids, "text": tokenizer.decode(result.token_ids),
                "finish_reason": result.finish_reason}
        print(json.dumps(line), flush=True)


def report_weight_bytes(model, quantize: bool) -> None:
    """Quantize if asked, and say how many bytes the decoder's linear weights take."""
    linear_bytes = sum(linear.base.weight_bytes for linear in model.lora_linears())
    if quantize:
        from server.model.nf4 import quantize_nf4_  # bitsandbytes is imported only when asked for

        dense, nf4 = quantize_nf4_(model)
        logger.info("NF4: decoder linear weights %.2f MB -> %.2f MB (%.3fx)", dense / 1e6, nf4 / 1e6, nf4 / dense)
        linear_bytes = nf4
    other = sum(p.numel() * p.element_size() for name, p in model.named_parameters() if ".base." not in name)
    logger.info("weight bytes: %.2f MB in decoder linears, %.2f MB in embeddings, norms and LM head",
                linear_bytes / 1e6, other / 1e6)


def read_requests(path: Path, tokenizer) -> list[GenerationRequest]:
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
                              "top_k", "seed"}
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
        sampling = SamplingParams(**numbers)
        requests.append(GenerationRequest(prompt_token_ids=token_ids, adapter=row.get("adapter"), sampling=sampling))
    return requests
