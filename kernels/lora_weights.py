"""One LoRA layer's adapter weights: a row pool shared by every slot, and the slot tables that say whose rows are where.

Layout (one buffer pair per layer; a slot owns rows, not a padded block):
    lora_a  [num_slices, total_rows, in]   A rows of every slice (q/k/v share x, so they share rows too)
    lora_bt [total_rows, out]             Bᵀ rows; slice k owns columns slice_offsets[k]:slice_offsets[k+1]
A slot is (row_start, rank per slice, scale per slice): its slice-k adapter is rows row_start : row_start + rank.

The tables exist twice, with the same values: host lists for the torch path and launch-time decisions, device
tensors for the Triton kernels. Both are rebuilt when a slot changes (an adapter load, not a step), so a forward pass
only reads them.
"""

import itertools
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

# Every LoraWeights by its `key`: a compiled graph cannot carry a Python object into a custom op, only an int, so
# the LoRA custom ops (kernels.lora_ops) find their layer's pool here. Weak: a dropped model's pools go with it.
_BY_KEY: "weakref.WeakValueDictionary[int, LoraWeights]" = weakref.WeakValueDictionary()
_NEXT_KEY = itertools.count()


@dataclass(frozen=True)
class SliceTerm:
    """One slice of one slot, host side: what the torch path needs to add its term (slices of rank 0 have none)."""

    slice_id: int
    rank: int
    scale: float
    lo: int  # first output column of the slice
    hi: int  # one past its last
    bt: torch.Tensor = field(compare=False, repr=False)  # [rank, hi - lo]: a view of the slot's Bᵀ rows, this slice


@dataclass(frozen=True)
class SlotPlan:
    """One slot, host side, as the torch path reads it per run: numbers and ready-made views of its rows, so that a
    run costs its matmuls and not the slicing."""

    row_start: int
    max_rank: int  # the slot's largest rank over this layer's slices: rows row_start : row_start + max_rank
    terms: tuple[SliceTerm, ...]  # its slices of rank > 0
    a: torch.Tensor = field(compare=False, repr=False)  # [num_slices, in, max_rank]: a view of its A rows, transposed


class LoraWeights:
    """A layer's row pool and slot tables. Mutated only by `set_slot`/`alias_slot`/`clear_slot` (adapter loads), and
    never for a slot that a running batch uses (the engine's residency sees to that), so a forward pass on another
    thread reads each of its slots whole."""

    def __init__(self, lora_a: torch.Tensor, lora_bt: torch.Tensor, slice_offsets: Sequence[int],
                 num_slots: int) -> None:
        num_slices, total_rows, _ = lora_a.shape
        assert lora_bt.shape == (total_rows, slice_offsets[-1]), (lora_a.shape, lora_bt.shape, slice_offsets)
        assert len(slice_offsets) == num_slices + 1 and slice_offsets[0] == 0
        assert lora_a.dtype == lora_bt.dtype and lora_a.device == lora_bt.device
        self.key = next(_NEXT_KEY)  # this pool's id for the custom ops: see `by_key`
        _BY_KEY[self.key] = self
        self.lora_a = lora_a  # [num_slices, total_rows, in]
        self.lora_bt = lora_bt  # [total_rows, out]
        self.slice_offsets = tuple(slice_offsets)  # [num_slices + 1]
        # Host tables, per slot.
        self.row_starts: list[int] = [0] * num_slots  # [num_slots]
        self.ranks: list[tuple[int, ...]] = [(0,) * num_slices] * num_slots  # [num_slots][num_slices]
        self.scales: list[tuple[float, ...]] = [(0.0,) * num_slices] * num_slots  # [num_slots][num_slices]
        # [num_slots]: each slot's plan, built from the above when the torch path first asks (see `plan`).
        self._plans: list[SlotPlan | None] = [None] * num_slots
        self.max_rank = 0  # the largest rank loaded in any slot and slice: a bound for every batch
        # Device tables, allocated once and rewritten by `_refresh`: views of one int32 tensor, and the scales.
        ranks_end = num_slots * (1 + num_slices)
        self._device_ints = torch.empty(ranks_end + num_slices + 1, dtype=torch.int32, device=lora_a.device)
        self.device_row_starts = self._device_ints[:num_slots]  # [num_slots] int32
        self.device_ranks = self._device_ints[num_slots:ranks_end].view(num_slots, num_slices)  # int32
        self.device_slice_offsets = self._device_ints[ranks_end:]  # [num_slices + 1] int32
        self.device_scales = torch.empty(num_slots, num_slices, dtype=torch.float32, device=lora_a.device)
        self._refresh()

    @classmethod
    def allocate(cls, num_slices: int, total_rows: int, in_features: int, slice_offsets: Sequence[int],
                 num_slots: int, dtype: torch.dtype, device: torch.device) -> "LoraWeights":
        """An empty pool: zero weights, every slot of rank 0."""
        lora_a = torch.zeros(num_slices, total_rows, in_features, dtype=dtype, device=device)
        lora_bt = torch.zeros(total_rows, slice_offsets[-1], dtype=dtype, device=device)
        return cls(lora_a, lora_bt, slice_offsets, num_slots)

    @staticmethod
    def by_key(key: int) -> "LoraWeights":
        return _BY_KEY[key]

    @property
    def num_slices(self) -> int:
        return self.lora_a.shape[0]

    @property
    def num_slots(self) -> int:
        return len(self.row_starts)

    @property
    def total_rows(self) -> int:
        return self.lora_a.shape[1]

    # ---------------------------------------------------------------- slot changes

    def set_slot(self, slot: int, row_start: int, ranks: Sequence[int], scales: Sequence[float]) -> None:
        """Point `slot` at rows row_start.. with these ranks and scales, per slice (the rows are written apart)."""
        assert len(ranks) == len(scales) == self.num_slices, (ranks, scales)
        assert all(r >= 0 for r in ranks) and row_start >= 0, (row_start, ranks)
        assert row_start + max(ranks) <= self.total_rows, f"slot rows {row_start}+{max(ranks)} run past the pool"
        self.row_starts[slot] = row_start
        self.ranks[slot] = tuple(ranks)
        self.scales[slot] = tuple(float(s) for s in scales)
        self._plans[slot] = None
        self._refresh()

    def alias_slot(self, slot: int, source: int, scale_factor: float) -> None:
        """`slot` reads `source`'s rows, with its scales times `scale_factor`: no weights are copied."""
        assert slot != source
        self.set_slot(slot, self.row_starts[source], self.ranks[source],
                      [scale * scale_factor for scale in self.scales[source]])

    def clear_slot(self, slot: int) -> None:
        """`slot` adds nothing any more (its row start is kept, for whoever still reads where it was)."""
        self.set_slot(slot, self.row_starts[slot], (0,) * self.num_slices, (0.0,) * self.num_slices)

    def plan(self, slot: int) -> SlotPlan:
        """`slot`'s plan: built on first use after each change of the slot. Lazily, because its views cost host
        memory per slot and layer, and only the torch path reads them."""
        plan = self._plans[slot]
        if plan is None:
            plan = self._plans[slot] = self._build_plan(slot)
        return plan

    def _build_plan(self, slot: int) -> SlotPlan:
        row, ranks, scales, offsets = self.row_starts[slot], self.ranks[slot], self.scales[slot], self.slice_offsets
        terms = tuple(SliceTerm(k, rank, scale, offsets[k], offsets[k + 1],
                                bt=self.lora_bt[row : row + rank, offsets[k] : offsets[k + 1]])
                      for k, (rank, scale) in enumerate(zip(ranks, scales, strict=True)) if rank)
        max_rank = max(ranks, default=0)
        return SlotPlan(row_start=row, max_rank=max_rank, terms=terms,
                        a=self.lora_a[:, row : row + max_rank].transpose(1, 2))

    def _refresh(self) -> None:
        """max_rank and the device tables, from the host tables.

        The device tables are rewritten in place, never replaced: a step captured in a CUDA graph holds their
        addresses. A forward pass on another thread may read them mid-copy; it reads only the slots of its own batch,
        which no load changes while it runs (see the class docstring), and each of those entries is rewritten with
        the value it already holds."""
        offsets = self.slice_offsets
        self.max_rank = max((max(ranks, default=0) for ranks in self.ranks), default=0)
        ints = torch.tensor([*self.row_starts, *(r for ranks in self.ranks for r in ranks), *offsets],
                            dtype=torch.int32)
        # One transfer for the int32 tables, one for the scales.
        self._device_ints.copy_(ints)
        self.device_scales.copy_(torch.tensor(self.scales, dtype=torch.float32).view(self.num_slots, self.num_slices))
