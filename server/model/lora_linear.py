"""A linear layer whose output adds, for every token, the LoRA term of that token's own adapter slot.

`base` computes x @ Wᵀ (+ bias). It is a dense layer here; the NF4 pass swaps in a 4-bit one, and the LoRA term
never sees the difference. Packed projections (q/k/v, gate/up) are one layer with several output *slices*.

A forward pass may carry several LoRA batches: each adds its tokens' terms through the same kernels and the same
slot pool. While an adapter is merged into the base (see server.model.merge), the second batch is the compensation
one, whose slot reads the merged adapter's rows with negated scales.
"""

from collections.abc import Sequence
from itertools import accumulate

import torch
import torch.nn.functional as F
from torch import nn

from kernels.lora_batch import LoraBatch
from kernels.lora_ops import apply_lora

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
        self.lora_a: torch.Tensor | None = None  # [num_slices, total_rows, in] once a pool is allocated
        self.lora_bt: torch.Tensor | None = None  # [total_rows, out_features]
        # Slot tables, host side (see kernels.lora_torch for the layout).
        self.slot_row_starts: list[int] = []
        self.slot_ranks: list[list[int]] = []
        self.slot_scales: list[list[float]] = []
        # The same tables on the device, for the Triton backend (refreshed whenever a slot changes).
        self.slot_tables: dict[str, torch.Tensor] = {}
        self.max_loaded_rank = 0
        self.compensation_slot = -1  # the extra table entry past the engine's slots, once a pool is allocated
        self.lora_backend = "torch"  # "torch" or "triton", resolved by whoever builds the model (see kernels.lora_ops)

    @property
    def out_features(self) -> int:
        return self.slice_offsets[-1]

    @property
    def num_slices(self) -> int:
        return len(self.slice_sizes)

    # ---------------------------------------------------------------- adapter slots

    def allocate_lora_pool(self, total_rows: int, num_slots: int, dtype: torch.dtype, device: torch.device) -> None:
        """Room for `num_slots` adapters sharing `total_rows` rows (a slot of rank r uses r of them).

        The tables get one entry more, slot `num_slots` (`compensation_slot`): it owns no rows, and is only ever an
        alias of another slot's rows (see `alias_slot`), so the engine's slots 0..num_slots-1 stay all its own.
        """
        self.lora_a = torch.zeros(self.num_slices, total_rows, self.in_features, dtype=dtype, device=device)
        self.lora_bt = torch.zeros(total_rows, self.out_features, dtype=dtype, device=device)
        self.compensation_slot = num_slots
        self.slot_row_starts = [0] * (num_slots + 1)
        self.slot_ranks = [[0] * self.num_slices for _ in range(num_slots + 1)]
        self.slot_scales = [[0.0] * self.num_slices for _ in range(num_slots + 1)]
        self._sync_slot_tables()

    def load_slot(self, slot: int, row_start: int, slices: Sequence[SliceWeights]) -> None:
        assert self.lora_a is not None and self.lora_bt is not None, "allocate_lora_pool first"
        assert len(slices) == self.num_slices
        ranks, scales = [], []
        for k, weights in enumerate(slices):
            if weights is None:
                ranks.append(0)
                scales.append(0.0)
                continue
            a, b, scale = weights
            rank = a.shape[0]
            lo, hi = self.slice_offsets[k], self.slice_offsets[k + 1]
            assert a.shape == (rank, self.in_features) and b.shape == (hi - lo, rank), (a.shape, b.shape)
            assert row_start + rank <= self.lora_a.shape[1], "slot rows run past the pool"
            self.lora_a[k, row_start : row_start + rank].copy_(a)
            self.lora_bt[row_start : row_start + rank, lo:hi].copy_(b.T)
            ranks.append(rank)
            scales.append(float(scale))
        self.slot_row_starts[slot] = row_start
        self.slot_ranks[slot] = ranks
        self.slot_scales[slot] = scales
        self._sync_slot_tables()

    def alias_slot(self, slot: int, source: int, scale_factor: float) -> None:
        """Point `slot` at `source`'s rows, with its scales times `scale_factor`: no weights are copied.

        A scale factor of -1 gives -scale·B·A, the compensation term of a merged adapter; both LoRA backends take
        any sign of scale (it multiplies the fp32 shrink output). `source` must keep its rows while aliased."""
        assert slot != source
        self.slot_row_starts[slot] = self.slot_row_starts[source]
        self.slot_ranks[slot] = list(self.slot_ranks[source])
        self.slot_scales[slot] = [scale * scale_factor for scale in self.slot_scales[source]]
        self._sync_slot_tables()

    def slot_slices(self, slot: int) -> list[SliceWeights]:
        """The adapter in `slot` as it sits in the pool: per slice (A [rank, in], B [out_k, rank] views, scale)."""
        assert self.lora_a is not None and self.lora_bt is not None, "allocate_lora_pool first"
        row, slices = self.slot_row_starts[slot], []
        for k, (rank, scale) in enumerate(zip(self.slot_ranks[slot], self.slot_scales[slot], strict=True)):
            lo, hi = self.slice_offsets[k], self.slice_offsets[k + 1]
            slices.append((self.lora_a[k, row : row + rank], self.lora_bt[row : row + rank, lo:hi].T, scale)
                          if rank else None)
        return slices

    def clear_slot(self, slot: int) -> None:
        self.slot_ranks[slot] = [0] * self.num_slices
        self.slot_scales[slot] = [0.0] * self.num_slices
        self._sync_slot_tables()

    def _sync_slot_tables(self) -> None:
        # Slots change when adapters load, not per step, so a small host-to-device copy here is cheap.
        device = self.lora_a.device
        self.max_loaded_rank = max((max(ranks) for ranks in self.slot_ranks), default=0)
        self.slot_tables = {
            "slot_row_starts": torch.tensor(self.slot_row_starts, dtype=torch.int32, device=device),
            "slot_ranks": torch.tensor(self.slot_ranks, dtype=torch.int32, device=device),
            "slot_scales": torch.tensor(self.slot_scales, dtype=torch.float32, device=device),
            "slice_offsets": torch.tensor(self.slice_offsets, dtype=torch.int32, device=device),
        }

    # ---------------------------------------------------------------- forward

    def forward(self, x: torch.Tensor, lora: LoraBatches = None) -> torch.Tensor:
        # x: [num_tokens, in] -> out: [num_tokens, out_features]
        out = self.base(x)
        if lora is None or self.lora_a is None:
            return out
        for batch in lora if isinstance(lora, tuple) else (lora,):
            if not batch.has_lora:
                continue
            apply_lora(self.lora_backend, x, out, self.lora_a, self.lora_bt, batch,
                       slot_row_starts_host=self.slot_row_starts, slot_ranks_host=self.slot_ranks,
                       slot_scales_host=self.slot_scales, slice_offsets_host=self.slice_offsets, **self.slot_tables,
                       max_rank=self.max_loaded_rank)  # a bound known up front: no per-call scan of the segments
        return out
