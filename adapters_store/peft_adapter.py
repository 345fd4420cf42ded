"""Parse a PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`) into per-module A/B weights,
checked against the base model: every tensor must belong to a targeted module, fit its shape and be finite, and
every targeted module must have both of its tensors."""

import logging
import os
import re
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from lora_server.adapters_store.base_model import BaseModelDescription, full_module_name
from lora_server.adapters_store.errors import AdapterError
from lora_server.adapters_store.limits import StoreLimits, check_ranks
from lora_server.adapters_store.lora_adapter import LoraAdapter, LoraModuleWeights
from lora_server.adapters_store.peft_config import CONFIG_FILE, parse_lora_config
from lora_server.adapters_store.peft_targets import TargetSpec, resolve_targets
from lora_server.adapters_store.safetensors_header import DEFAULT_MAX_HEADER_BYTES, check_safetensors_header

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")  # never unpickled: loading one can run arbitrary code
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Why float16's largest finite value: the device pool may be float16, where a larger weight becomes inf and poisons
# its requests' logits. Trained LoRA weights are orders of magnitude below it.
MAX_WEIGHT_MAGNITUDE = float(torch.finfo(torch.float16).max)
# PEFT's save_pretrained drops the adapter name, and its loader would not accept a key that kept it.
_TENSOR_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])\.weight")
_VELORA_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_velora_embed")


def load_peft_adapter(directory: str | os.PathLike, base: BaseModelDescription,
                      limits: StoreLimits | None = None) -> LoraAdapter:
    """Read a directory written by PEFT's save_pretrained. Pickle checkpoints are refused, never opened."""
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(str(directory), "not a directory")
    if not (directory / WEIGHTS_FILE).is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterError(pickles[0], "pickle weight files are refused (loading one can run code); save the "
                                           f"adapter with safe_serialization=True to get {WEIGHTS_FILE}")
        raise AdapterError(WEIGHTS_FILE, f"missing from {directory}")
    if not (directory / CONFIG_FILE).is_file():
        raise AdapterError(CONFIG_FILE, f"missing from {directory}")
    return parse_peft_adapter((directory / CONFIG_FILE).read_bytes(), (directory / WEIGHTS_FILE).read_bytes(), base,
                              limits)


def parse_peft_adapter(config_bytes: bytes, safetensors_bytes: bytes, base: BaseModelDescription,
                       limits: StoreLimits | None = None) -> LoraAdapter:
    """`limits`, when given, caps the ranks and the safetensors header; without, only the default header cap applies.
    File sizes are the caller's to check, before the bytes are even read (see upload.split_upload)."""
    config = parse_lora_config(config_bytes)
    targets = resolve_targets(config, base)
    if limits is not None:
        check_ranks(targets, limits)
    # Our own header check first: the library refuses oversized headers too, but only past its own fixed cap; ours
    # refuses at this server's limit, before allocating anything, with a clear message, and names the tensor at fault.
    check_safetensors_header(safetensors_bytes, file=WEIGHTS_FILE,
                             max_header_bytes=limits.max_header_bytes if limits else DEFAULT_MAX_HEADER_BYTES)
    try:
        tensors = load_safetensors(safetensors_bytes)  # plain data, no pickle
    except (SafetensorError, ValueError, KeyError, TypeError, RuntimeError) as error:
        raise AdapterError(WEIGHTS_FILE, f"not a readable safetensors file ({error})") from None
    if not tensors:
        raise AdapterError(WEIGHTS_FILE, "holds no tensors")

    module_names = base.module_names()
    halves: dict[tuple[int, str], dict[str, torch.Tensor]] = {key: {} for key in targets}
    for key, tensor in sorted(tensors.items()):  # sorted: the same file always fails on the same tensor
        velora = _VELORA_KEY.fullmatch(key) if config.is_velora else None
        if velora and module_names.get(velora.group("module")) in targets:
            continue  # VeLoRA's compressed-activation basis: only its training backward reads it
        match = _TENSOR_KEY.fullmatch(key)
        if not match:
            raise _tensor_error(key, "unexpected tensor: only lora_A.weight and lora_B.weight tensors are supported "
                                     "(DoRA magnitudes, biases, embeddings and full modules are not)")
        module = module_names.get(match.group("module"))
        if module is None:
            raise _tensor_error(key, f"unexpected tensor: {base.describe()} has no such LoRA-capable module")
        if module not in targets:
            raise _tensor_error(key, f"unexpected tensor: {CONFIG_FILE} does not target this module (see "
                                     "target_modules, exclude_modules and layers_to_transform)")
        halves[module][match.group("which")] = tensor

    modules = {module: _module_weights(module, pair, targets[module], base) for module, pair in halves.items()}
    adapter = LoraAdapter(modules=modules, config=config.raw)
    logger.debug("parsed a LoRA adapter: %d modules, ranks %s", len(modules), adapter.ranks)
    return adapter


def _module_weights(module: tuple[int, str], pair: dict[str, torch.Tensor], target: TargetSpec,
                    base: BaseModelDescription) -> LoraModuleWeights:
    keys = {which: f"base_model.model.{full_module_name(*module)}.lora_{which}.weight" for which in "AB"}
    for which, other in (("A", "B"), ("B", "A")):
        if which not in pair:
            reason = f"lora_{other} is there" if other in pair else f"{CONFIG_FILE} targets this module"
            raise _tensor_error(keys[which], f"missing ({reason})")
    a, b = pair["A"], pair["B"]
    for which, tensor in (("A", a), ("B", b)):
        if tensor.dtype not in FLOAT_DTYPES:
            raise _tensor_error(keys[which], f"dtype {tensor.dtype} is not float32, float16 or bfloat16")

    in_features, out_features = base.module_shapes[module[1]]
    # A and B that agree with each other and with the base but not with the config: name the config's rank as the
    # culprit, since "wrong shape" alone would hide it.
    if (a.dim() == b.dim() == 2 and a.shape[1] == in_features and b.shape[0] == out_features
            and a.shape[0] == b.shape[1] != target.rank):
        raise _tensor_error(keys["A"], f"rank {a.shape[0]} does not match the configured rank {target.rank} "
                                       f"({CONFIG_FILE}: {target.rank_field})")
    for which, tensor, expected in (("A", a, (target.rank, in_features)), ("B", b, (out_features, target.rank))):
        if tuple(tensor.shape) != expected:
            raise _tensor_error(keys[which], f"shape {tuple(tensor.shape)} does not fit {module[1]} of the base "
                                             f"model at rank {target.rank}: expected {expected}")
        if not torch.isfinite(tensor).all():
            raise _tensor_error(keys[which], "holds NaN or Inf values")
        if tensor.numel() and tensor.abs().max().item() > MAX_WEIGHT_MAGNITUDE:
            raise _tensor_error(keys[which], f"holds values over {MAX_WEIGHT_MAGNITUDE:g} in magnitude, which "
                                             f"overflow a float16 adapter pool")
    return LoraModuleWeights(lora_a=a.contiguous(), lora_b=b.contiguous(), scale=target.scale)


def _tensor_error(key: str, message: str) -> AdapterError:
    return AdapterError(key, message, file=WEIGHTS_FILE)
