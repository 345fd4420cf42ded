"""A parsed LoRA adapter: per-module A and B weights with their scale, as plain tensors on the CPU."""

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class LoraModuleWeights:
    lora_a: torch.Tensor  # [rank, in_features], the file's dtype, contiguous
    lora_b: torch.Tensor  # [out_features, rank]
    scale: float  # alpha / rank, or alpha / sqrt(rank) for rsLoRA, after rank_pattern / alpha_pattern

    def __post_init__(self) -> None:
        assert self.lora_a.dim() == 2 and self.lora_b.dim() == 2, (self.lora_a.shape, self.lora_b.shape)
        assert self.lora_a.shape[0] == self.lora_b.shape[1] > 0, (self.lora_a.shape, self.lora_b.shape)

    @property
    def rank(self) -> int:
        return self.lora_a.shape[0]


@dataclass(frozen=True)
class LoraAdapter:
    modules: dict[tuple[int, str], LoraModuleWeights]  # (layer, module such as "q_proj") -> weights
    config: dict[str, Any]  # adapter_config.json as parsed

    def __post_init__(self) -> None:
        assert self.modules, "an adapter has at least one module"

    @property
    def max_rank(self) -> int:
        return max(w.rank for w in self.modules.values())

    @property
    def ranks(self) -> list[int]:
        return sorted({w.rank for w in self.modules.values()})

    @property
    def num_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for w in self.modules.values() for t in (w.lora_a, w.lora_b))
