"""`lora-server merge`: write a Hugging Face checkpoint with one PEFT adapter merged into the base's weights.

Every targeted weight becomes W + scale·B·A, summed in fp32 from the adapter file's own tensors and rounded once to
the output dtype, as PEFT's merge_and_unload would make it. With `--quantize nf4` the base is first quantized as the
server would serve it, and the checkpoint holds the dense weights that base computes with (dequantized + delta):
what an NF4 deployment serves, for any tool that reads plain checkpoints.

The output directory gets config.json (dtype updated), model.safetensors (or shards and their index),
generation_config.json and the tokenizer files, so transformers' from_pretrained loads it as it is.
"""

import argparse
import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm import tqdm

from lora_server.adapters_store import full_module_name, load_peft_adapter
from lora_server.api.cli_options import HelpFormatter, add_logging_arguments
from lora_server.engine.build import describe_base_model
from lora_server.model.config import PACKED_MODULES
from lora_server.model.llama import LlamaModel
from lora_server.model.loader import INDEX_FILE, SINGLE_FILE, load_model, read_config
from lora_server.model.merge import add_deltas_, effective_weight

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
COPIED_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                "tokenizer.model", "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja")
MAX_SHARD_BYTES = 5 * 10**9  # transformers' own default for save_pretrained


class ExportError(ValueError):
    """The export cannot be done as asked (an output directory in the way, an unknown dtype)."""


def add_merge_parser(subcommands: argparse._SubParsersAction) -> argparse.ArgumentParser:
    merge = subcommands.add_parser("merge", help="write a Hugging Face checkpoint with an adapter merged in",
                                   description=__doc__, formatter_class=HelpFormatter)
    merge.add_argument("--model", type=Path, required=True, help="Hugging Face checkpoint directory of the base")
    merge.add_argument("--adapter", type=Path, required=True, help="PEFT adapter directory")
    merge.add_argument("--out", type=Path, required=True, help="new directory for the merged checkpoint")
    merge.add_argument("--quantize", choices=["none", "nf4"], default="none",
                       help="nf4: merge into the NF4 base the server would serve (the checkpoint is dense either way)")
    merge.add_argument("--dtype", choices=["auto", *DTYPES], default="auto",
                       help="dtype of the written weights (auto: the base checkpoint's); with nf4, also the dtype the "
                            "base is quantized from")
    add_logging_arguments(merge)
    return merge


def run_merge(args: argparse.Namespace) -> None:
    export_merged(args.model, args.adapter, args.out, quantize=args.quantize, dtype=args.dtype)


def export_merged(model_dir: Path, adapter_dir: Path, out_dir: Path, quantize: str = "none", dtype: str = "auto",
                  max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Raises ExportError, AdapterError (the adapter does not fit the base) or ModelConfigError (nor the base us)."""
    model_dir, adapter_dir, out_dir = Path(model_dir), Path(adapter_dir), Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise ExportError(f"{out_dir} already exists and is not an empty directory")
    config = read_config(model_dir)
    out_dtype = _output_dtype(dtype, config.checkpoint_dtype)
    adapter = load_peft_adapter(adapter_dir, describe_base_model(config, name=model_dir.name))
    # Dense: the checkpoint's own values, exactly. NF4: quantized from the dtype the server would compute in.
    load_dtype = out_dtype if quantize == "nf4" else DTYPES.get(config.checkpoint_dtype, torch.float32)
    model = load_model(model_dir, torch.device("cpu"), load_dtype)
    if quantize == "nf4":
        from lora_server.model.nf4 import quantize_nf4_  # bitsandbytes is imported only when asked for

        quantize_nf4_(model)

    out_dir.mkdir(parents=True, exist_ok=True)
    num_bytes = _write_shards(_merged_tensors(model, adapter.modules, out_dtype), out_dir, max_shard_bytes)
    hf_config = json.loads((model_dir / "config.json").read_text())
    hf_config.pop("quantization_config", None)  # the written weights are dense, whatever the base was
    hf_config["dtype"] = dtype_name = str(out_dtype).removeprefix("torch.")
    if "torch_dtype" in hf_config:  # the name transformers < 5 reads
        hf_config["torch_dtype"] = hf_config["dtype"]
    (out_dir / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    for name in COPIED_FILES:
        if (model_dir / name).is_file():
            shutil.copyfile(model_dir / name, out_dir / name)
    _ordinary_permissions(out_dir)
    logger.info("wrote %s: %s with %s merged (%d modules%s), %.1f MB of %s weights", out_dir, model_dir, adapter_dir,
                len(adapter.modules), ", NF4 base" if quantize == "nf4" else "", num_bytes / 1e6, dtype_name)


def _ordinary_permissions(out_dir: Path) -> None:
    """Every written file 0666 less the umask (0644 under the usual 022), as `open` would create it: safetensors
    writes its files 0600, which other users (a serving account, a container) then cannot read."""
    umask = os.umask(0o022)  # reading the umask means setting it: restored at once (a CLI, single-threaded here)
    os.umask(umask)
    for path in out_dir.iterdir():
        if path.is_file():
            path.chmod(0o666 & ~umask)


def _output_dtype(dtype: str, checkpoint_dtype: str) -> torch.dtype:
    name = checkpoint_dtype if dtype == "auto" else dtype
    if name not in DTYPES:
        raise ExportError(f"cannot write {name} weights; pass --dtype with one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _merged_tensors(model: LlamaModel, modules: dict, out_dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """(Hugging Face name, tensor in out_dtype) for every weight of the checkpoint, one layer at a time. Slices of
    packed weights are copies: safetensors refuses tensors that share storage."""
    yield "model.embed_tokens.weight", model.embed_tokens.weight.to(out_dtype)
    # disable=None: a bar on a terminal, nothing in a log file
    for index, layer in enumerate(tqdm(model.layers, desc="merging", unit="layer", disable=None)):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield f"model.layers.{index}.{norm}.weight", getattr(layer, norm).weight.to(out_dtype)
        for packed, slices in model.packed_slices(index, modules).items():
            linear = model.packed_linear(layer, packed)
            weight = effective_weight(linear.base).to(torch.float32, copy=True)  # [out, in]: the deltas go in here
            add_deltas_(weight, linear.slice_offsets, slices)
            for name, (owner, k) in PACKED_MODULES.items():
                if owner != packed:
                    continue
                lo, hi = linear.slice_offsets[k], linear.slice_offsets[k + 1]
                yield f"{full_module_name(index, name)}.weight", weight[lo:hi].to(out_dtype, copy=True)  # one rounding
                if linear.base.bias is not None:
                    yield f"{full_module_name(index, name)}.bias", linear.base.bias[lo:hi].to(out_dtype, copy=True)
    yield "model.norm.weight", model.norm.weight.to(out_dtype)
    if not model.config.tie_word_embeddings:
        yield "lm_head.weight", model.lm_head.weight.to(out_dtype)


def _write_shards(tensors: Iterator[tuple[str, torch.Tensor]], out_dir: Path, max_shard_bytes: int) -> int:
    """One model.safetensors, or shards of at most max_shard_bytes and their index (as save_pretrained writes).
    Each shard is written as soon as it is full, so at most one shard of merged weights is held at a time."""
    shard: dict[str, torch.Tensor] = {}
    shard_paths: list[Path] = []
    weight_map: dict[str, int] = {}
    shard_bytes = total_bytes = 0

    def flush() -> None:
        path = out_dir / f"shard-{len(shard_paths)}.tmp"  # renamed once the number of shards is known
        save_file(shard, path, metadata={"format": "pt"})
        shard_paths.append(path)
        shard.clear()

    for name, tensor in tensors:
        size = tensor.numel() * tensor.element_size()
        if shard and shard_bytes + size > max_shard_bytes:
            flush()
            shard_bytes = 0
        shard[name] = tensor
        weight_map[name] = len(shard_paths)
        shard_bytes += size
        total_bytes += size
    flush()

    if len(shard_paths) == 1:
        shard_paths[0].rename(out_dir / SINGLE_FILE)
        return total_bytes
    names = [f"model-{i + 1:05d}-of-{len(shard_paths):05d}.safetensors" for i in range(len(shard_paths))]
    for path, name in zip(shard_paths, names, strict=True):
        path.rename(out_dir / name)
    index = {"metadata": {"total_size": total_bytes},
             "weight_map": {tensor: names[i] for tensor, i in weight_map.items()}}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return total_bytes
