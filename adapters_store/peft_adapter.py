"""Parse a PEFT LoRA adapter (`adapter_config.json` + `adapter_model.safetensors`) into per-module A/B weights,
checked against the base model: every tensor must belong to a targeted module, fit its shape and be finite."""

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from adapters_store.base_model import BaseModelDescription
from adapters_store.errors import AdapterError
from adapters_store.peft_config import CONFIG_FILE, parse_lora_config

WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")  # never unpickled: loading one can run arbitrary code
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# base_model.model.<module name>.lora_A.weight (an adapter-name segment before .weight is tolerated)
_TENSOR_KEY = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[\w-]+)?\.weight")


@dataclass(frozen=True)
class LoraModuleWeights:
    lora_a: torch.Tensor  # [rank, in_features]
    lora_b: torch.Tensor  # [out_features, rank]
    scale: float  # alpha / rank, or alpha / sqrt(rank) for rsLoRA

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass(frozen=True)
class LoraAdapter:
    modules: dict[tuple[int, str], LoraModuleWeights]  # (layer, module such as "q_proj") -> weights
    config: dict[str, Any]

    @property
    def max_rank(self) -> int:
        return max(w.rank for w in self.modules.values())

    @property
    def ranks(self) -> list[int]:
        return sorted({w.rank for w in self.modules.values()})

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for w in self.modules.values() for t in (w.lora_a, w.lora_b))


def load_peft_adapter(directory: str | os.PathLike, base: BaseModelDescription) -> LoraAdapter:
    directory = Path(directory)
    if not directory.is_dir():
        raise AdapterError(str(directory), "is not a directory")
    if not (directory / WEIGHTS_FILE).is_file():
        pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise AdapterError(pickles[0], "pickle weight files are refused (they can run code when loaded); "
                                           f"save the adapter as {WEIGHTS_FILE}")
        raise AdapterError(WEIGHTS_FILE, f"missing from {directory}")
    if not (directory / CONFIG_FILE).is_file():
        raise AdapterError(CONFIG_FILE, f"missing from {directory}")
    return parse_peft_adapter((directory / CONFIG_FILE).read_bytes(), (directory / WEIGHTS_FILE).read_bytes(), base)


def parse_peft_adapter(config_bytes: bytes, safetensors_bytes: bytes, base: BaseModelDescription) -> LoraAdapter:
    spec = parse_lora_config(config_bytes, base)
    try:
        tensors = load_safetensors(safetensors_bytes)
    except (SafetensorError, ValueError, RuntimeError, OSError) as error:
        raise AdapterError(WEIGHTS_FILE, f"not a readable safetensors file ({error})") from None
    if not tensors:
        raise AdapterError(WEIGHTS_FILE, "holds no tensors")

    module_names = base.module_names()
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = _TENSOR_KEY.fullmatch(key)
        name = match.group("module") if match else None
        if name not in module_names or not spec.targets(name, module_names[name][0]):
            raise AdapterError(key, "unexpected tensor: not the lora_A or lora_B weight of a targeted module")
        halves.setdefault(name, {})[match.group("which")] = tensor

    modules: dict[tuple[int, str], LoraModuleWeights] = {}
    for name, pair in halves.items():
        layer, module = module_names[name]
        for which in "AB":
            if which not in pair:
                other = "B" if which == "A" else "A"
                raise AdapterError(f"base_model.model.{name}.lora_{which}.weight", f"missing (lora_{other} is there)")
        rank, scale = spec.rank_and_scale(name)
        in_features, out_features = base.module_shapes[module]
        a, b = pair["A"], pair["B"]
        for which, tensor, expected in (("A", a, (rank, in_features)), ("B", b, (out_features, rank))):
            key = f"base_model.model.{name}.lora_{which}.weight"
            if tensor.dtype not in _FLOAT_DTYPES:
                raise AdapterError(key, f"dtype {tensor.dtype} is not float32, float16 or bfloat16")
            if tuple(tensor.shape) != expected:
                raise AdapterError(key, f"shape {tuple(tensor.shape)} does not fit the base model and rank {rank} "
                                        f"(expected {expected})")
            if not torch.isfinite(tensor).all():
                raise AdapterError(key, "holds NaN or Inf values")
        modules[(layer, module)] = LoraModuleWeights(lora_a=a.contiguous(), lora_b=b.contiguous(), scale=scale)
    return LoraAdapter(modules=modules, config=spec.raw)
