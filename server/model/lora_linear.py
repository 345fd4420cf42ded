"""A linear layer whose output adds, for every token, the LoRA term of that token's own adapter slot.

`base` computes x @ Wᵀ (+ bias). It is a dense layer here; the NF4 pass swaps in a 4-bit one, and the LoRA term
never sees the difference. Packed projections (q/k/v, gate/up) are one layer with several output *slices*.

The layer's row pool and slot tables are one `kernels.lora_weights.LoraWeights`, changed only when a slot is loaded
or cleared; a forward pass hands it, with the step's `LoraBatch` (built once per step), to `apply_lora`.

A forward pass may carry several LoRA batches: each adds its tokens' terms through the same kernels and the same
slot pool. While an adapter is merged into the base (see server.model.merge), the second batch is the compensation
one, whose slot reads the merged adapter's rows with negated scales.
"""

from collections.abc import Sequence
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from lora_server.kernels.lora_batch import LoraBatch
from lora_server.kernels.lora_ops import apply_lora
from lora_server.kernels.lora_weights import LoraWeights

# One slice's adapter weights: (A [rank, in], B [out_k, rank], scale), or None where the adapter skips the slice.
SliceWeights = tuple[torch.Tensor, torch.Tensor, float] | None
# What a forward pass is given: no LoRA, one batch, or several whose terms all add up (each token, each batch).
LoraBatches = LoraBatch | tuple[LoraBatch, ...] | None


class DenseBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)

    @property
    def weight_bytes(self) -> int:
        return self.weight.numel() * self.weight.element_size()


class LoraLinear(nn.Module):
    def __init__(self, in_features: int, slice_sizes: Sequence[int], bias: bool = False) -> None:
        super().__init__()
        self.in_features = in_features
        self.slice_sizes = tuple(slice_sizes)
        self.slice_offsets = (0, *accumulate(self.slice_sizes))  # slice k is columns offsets[k]:offsets[k + 1]
        self.base: nn.Module = DenseBase(in_features, self.slice_offsets[-1], bias)
        # The row pool and slot tables every forward pass hands to apply_lora, once a pool is allocated.
        self.lora_weights: LoraWeights | None = None
        self.compensation_slot = -1  # the extra table entry past the engine's slots, once a pool is allocated
        self.lora_backend = "torch"  # "torch" or "triton", resolved by whoever builds the model (see kernels.lora_ops)

    @property
    def out_features(self) -> int:
        return self.slice_offsets[-1]

    @property
    def num_slices(self) -> int:
        return len(self.slice_sizes)

    # The pool and host slot tables, read-only (see kernels.lora_weights for the layout).

    @property
    def lora_a(self) -> torch.Tensor | None:
        return None if self.lora_weights is None else self.lora_weights.lora_a  # [num_slices, total_rows, in]

    @property
    def lora_bt(self) -> torch.Tensor | None:
        return None if self.lora_weights is None else self.lora_weights.lora_bt  # [total_rows, out_features]

    @property
    def slot_row_starts(self) -> Sequence[int]:
        return () if self.lora_weights is None else self.lora_weights.row_starts  # [num_slots + 1]

    @property
    def slot_ranks(self) -> Sequence[Sequence[int]]:
        return () if self.lora_weights is None else self.lora_weights.ranks  # [num_slots + 1][num_slices]

    @property
    def slot_scales(self) -> Sequence[Sequence[float]]:
        return () if self.lora_weights is None else self.lora_weights.scales  # [num_slots + 1][num_slices]

    @property
    def _weights(self) -> LoraWeights:
        assert self.lora_weights is not None, "allocate_lora_pool first"
        return self.lora_weights

    # ---------------------------------------------------------------- adapter slots

    def allocate_lora_pool(self, total_rows: int, num_slots: int, dtype: torch.dtype, device: torch.device) -> None:
        """Room for `num_slots` adapters sharing `total_rows` rows (a slot of rank r uses r of them).

        The tables get one entry more, slot `num_slots` (`compensation_slot`): it owns no rows, and is only ever an
        alias of another slot's rows (see `alias_slot`), so the engine's slots 0..num_slots-1 stay all its own.
        """
        self.lora_weights = LoraWeights.allocate(self.num_slices, total_rows, self.in_features, self.slice_offsets,
                                                 num_slots + 1, dtype, device)
        self.compensation_slot = num_slots

    def load_slot(self, slot: int, row_start: int, slices: Sequence[SliceWeights]) -> None:
        weights = self._weights
        assert len(slices) == self.num_slices
        ranks, scales = [], []
        for k, slice_weights in enumerate(slices):
            if slice_weights is None:
                ranks.append(0)
                scales.append(0.0)
                continue
            a, b, scale = slice_weights
            rank = a.shape[0]
            lo, hi = self.slice_offsets[k], self.slice_offsets[k + 1]
            assert a.shape == (rank, self.in_features) and b.shape == (hi - lo, rank), (a.shape, b.shape)
            assert row_start + rank <= weights.total_rows, "slot rows run past the pool"
            weights.lora_a[k, row_start : row_start + rank].copy_(a)
            weights.lora_bt[row_start : row_start + rank, lo:hi].copy_(b.T)
            ranks.append(rank)
            scales.append(float(scale))
        weights.set_slot(slot, row_start, ranks, scales)

    def alias_slot(self, slot: int, source: int, scale_factor: float) -> None:
        """Point `slot` at `source`'s rows, with its scales times `scale_factor`: no weights are copied.

        A scale factor of -1 gives -scale·B·A, the compensation term of a merged adapter; both LoRA backends take
        any sign of scale (it multiplies the fp32 shrink output). `source` must keep its rows while aliased."""
        self._weights.alias_slot(slot, source, scale_factor)

    def slot_slices(self, slot: int) -> list[SliceWeights]:
        """The adapter in `slot` as it sits in the pool: per slice (A [rank, in], B [out_k, rank] views, scale)."""
        weights = self._weights
        row, slices = weights.row_starts[slot], []
        for k, (rank, scale) in enumerate(zip(weights.ranks[slot], weights.scales[slot], strict=True)):
            lo, hi = self.slice_offsets[k], self.slice_offsets[k + 1]
            slices.append((weights.lora_a[k, row : row + rank], weights.lora_bt[row : row + rank, lo:hi].T, scale)
                          if rank else None)
        return slices

    def clear_slot(self, slot: int) -> None:
        self._weights.clear_slot(slot)

    # ---------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, lora: LoraBatches = None) -> torch.Tensor:
        # x: [num_tokens, in] -> out: [num_tokens, out_features]
        out = self.base(x)
        if lora is None or self.lora_weights is None:
            return out
        for batch in lora if isinstance(lora, tuple) else (lora,):
            apply_lora(self.lora_backend, x, out, self.lora_weights, batch)
        return out
