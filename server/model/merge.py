"""Merge the adapter in one LoRA slot into the base weights in place, and unmerge it bit-exactly.

While slot m is merged, every layer it targets computes x @ (W + δ_m)ᵀ with δ_m = scale_m·B_m·A_m, so m's tokens need
no LoRA term at all. Every other token stays in the same batch and gets two terms through the same kernels: its own
(if any) and the compensation slot's, which reads m's rows with negated scales (−δ_m). `merged_lora_batches` builds
that pair of batches from per-token slots.

    merge = merge_slot_(model, slot, budget_bytes=...)
    hidden = model(input_ids, positions, attention, merged_lora_batches(token_slots, merge))
    unmerge_(model, merge)

Dense base: each touched slice becomes (W in fp32 + δ in fp32), cast once, after its rows were copied to host memory;
unmerge copies them back, so W returns bit for bit (subtracting δ again would drift in bf16).
NF4 base: re-quantizing W + δ would be lossy, so the layer gets a separate dense copy, dequantize(W) + δ, swapped in
for its NF4 module; unmerge swaps the NF4 module back and the copy is released. Those copies must fit `budget_bytes`.

The slot's rows must stay as they are while it is merged (the compensation term reads them): the caller keeps the
adapter pinned in its slot until `unmerge_`.
"""

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch
from torch import nn

from lora_server.kernels.lora_batch import NO_SLOT, LoraBatch
from lora_server.model.lora_linear import DenseBase, LoraLinear, SliceWeights

logger = logging.getLogger(__name__)


class MergeBudgetError(ValueError):
    """The dense copies an NF4 base needs for a merge do not fit the device budget given."""


class DequantizableBase(Protocol):
    """A quantized base (server.model.nf4.Nf4Base): its effective dense weight, and its bias."""

    bias: torch.Tensor | None

    def dequantized_weight(self) -> torch.Tensor: ...


@dataclass(frozen=True)
class _SliceSnapshot:
    linear: LoraLinear
    lo: int
    hi: int
    host_rows: torch.Tensor  # [hi - lo, in]: the base weight's rows lo:hi before the merge, in host memory


@dataclass
class MergedSlot:
    """What `unmerge_` needs to put the base back, and what batches need to compensate for the merge."""

    slot: int
    compensation_slot: int  # aliases `slot`'s rows with negated scales while merged
    snapshots: list[_SliceSnapshot] = field(repr=False)  # dense bases, changed in place
    swapped: list[tuple[LoraLinear, nn.Module]] = field(repr=False)  # quantized bases, each with its original module
    dense_copy_bytes: int  # device bytes of the dense copies of quantized layers, held until unmerge
    snapshot_bytes: int  # host bytes of the snapshots
    is_merged: bool = True


# ---------------------------------------------------------------------------------------------------- the math


def effective_weight(base: nn.Module) -> torch.Tensor:
    """The weight [out, in] a LoRA layer's base multiplies by, in the compute dtype: a dense base's own parameter
    (not a copy), or a quantized base's weight dequantized."""
    return base.weight.data if isinstance(base, DenseBase) else base.dequantized_weight()


def add_deltas_(weight: torch.Tensor, slice_offsets: Sequence[int], slices: Sequence[SliceWeights]) -> None:
    """weight [out, in] += scale·B·A on each slice's rows (lo:hi), in place: summed in fp32, rounded once."""
    for k, weights in enumerate(slices):
        if weights is None:
            continue
        a, b, scale = weights  # a: [rank, in], b: [hi - lo, rank]
        rows = weight[slice_offsets[k] : slice_offsets[k + 1]]
        rows.copy_(torch.addmm(rows.float(), b.float(), a.float(), alpha=scale))


# ---------------------------------------------------------------------------------------------------- merge / unmerge


def lora_linears(model: nn.Module) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear)]


def merge_device_bytes(model: nn.Module, slot: int) -> int:
    """Device bytes a merge of `slot` would add: the dense copies of the quantized layers it touches (a dense base is
    changed in place, which costs only a transient fp32 copy of one slice)."""
    return sum(_dense_copy_bytes(linear) for linear in lora_linears(model)
               if _is_targeted(linear, slot) and not isinstance(linear.base, DenseBase))


def merge_slot_(model: nn.Module, slot: int, *, budget_bytes: int | None = None) -> MergedSlot:
    """Merge the adapter loaded in `slot` into every base weight it targets; see the module docstring.

    `budget_bytes` caps the device bytes of dense copies of quantized layers (None: no cap). Raises
    MergeBudgetError, before changing anything, when they would not fit."""
    started = time.perf_counter()
    linears = lora_linears(model)
    assert linears and linears[0].lora_a is not None, "allocate a LoRA pool and load the adapter first"
    compensation_slot = linears[0].compensation_slot
    assert 0 <= slot < compensation_slot, f"slot {slot} is not one of the {compensation_slot} adapter slots"
    for linear in linears:
        assert linear.compensation_slot == compensation_slot
        assert not any(linear.slot_ranks[compensation_slot]), "another slot is merged: unmerge it first"
    targeted = [linear for linear in linears if _is_targeted(linear, slot)]
    assert targeted, f"slot {slot} holds no adapter"

    needed = merge_device_bytes(model, slot)
    if budget_bytes is not None and needed > budget_bytes:
        raise MergeBudgetError(f"merging slot {slot} into the NF4 base needs {needed / 2**20:.1f} MiB of dense copies "
                               f"of its layers, over the merge budget of {budget_bytes / 2**20:.1f} MiB; serve the "
                               "adapter unmerged, or raise the budget")

    merged = MergedSlot(slot=slot, compensation_slot=compensation_slot, snapshots=[], swapped=[],
                        dense_copy_bytes=needed, snapshot_bytes=0)
    for linear in targeted:
        slices = linear.slot_slices(slot)
        if isinstance(linear.base, DenseBase):
            merged.snapshots += _snapshot_slices(linear, slices)
            add_deltas_(linear.base.weight.data, linear.slice_offsets, slices)
        else:
            merged.swapped.append((linear, linear.base))
            linear.base = _merged_dense_copy(linear.base, linear.slice_offsets, slices)
        linear.alias_slot(compensation_slot, slot, scale_factor=-1.0)
    merged.snapshot_bytes = sum(s.host_rows.numel() * s.host_rows.element_size() for s in merged.snapshots)
    logger.info("merged slot %d into %d layers in %.1f ms (%.1f MiB host snapshot, %.1f MiB dense copies)", slot,
                len(targeted), (time.perf_counter() - started) * 1e3, merged.snapshot_bytes / 2**20, needed / 2**20)
    return merged


def unmerge_(model: nn.Module, merged: MergedSlot) -> None:
    """Restore every base weight `merge_slot_` changed, bit for bit, and free the compensation slot."""
    assert merged.is_merged, f"slot {merged.slot} was already unmerged"
    for snapshot in merged.snapshots:
        snapshot.linear.base.weight.data[snapshot.lo : snapshot.hi].copy_(snapshot.host_rows)  # a copy, never W − δ
    for linear, original in merged.swapped:
        linear.base = original  # the dense copy is released with the module
    for linear in lora_linears(model):
        linear.clear_slot(merged.compensation_slot)
    merged.is_merged = False
    logger.info("unmerged slot %d", merged.slot)


def _is_targeted(linear: LoraLinear, slot: int) -> bool:
    return any(linear.slot_ranks[slot])


def _snapshot_slices(linear: LoraLinear, slices: Sequence[SliceWeights]) -> list[_SliceSnapshot]:
    weight = linear.base.weight.data
    snapshots = []
    for k, weights in enumerate(slices):
        if weights is None:
            continue
        lo, hi = linear.slice_offsets[k], linear.slice_offsets[k + 1]
        # Pageable, not pinned: a snapshot can be most of the model, and pinning that much host memory per merge
        # would cost more than the slower copies it saves.
        host_rows = weight[lo:hi].to("cpu", copy=True)
        snapshots.append(_SliceSnapshot(linear, lo, hi, host_rows))
    return snapshots


def _dense_copy_bytes(linear: LoraLinear) -> int:
    return linear.out_features * linear.in_features * linear.lora_a.element_size()  # the pool's, i.e. compute, dtype


def _merged_dense_copy(base: DequantizableBase, slice_offsets: Sequence[int],
                       slices: Sequence[SliceWeights]) -> DenseBase:
    weight = effective_weight(base)  # [out, in] in the compute dtype: what the quantized layer multiplies by
    add_deltas_(weight, slice_offsets, slices)
    with torch.device("meta"):  # no throwaway allocation: the parameters are replaced just below
        dense = DenseBase(weight.shape[1], weight.shape[0], bias=False)
    dense.weight = nn.Parameter(weight, requires_grad=False)
    dense.bias = base.bias  # shared with the quantized module, never changed
    return dense


# ---------------------------------------------------------------------------------------------------- batches


def merged_lora_batches(token_slots: Sequence[int], merged: MergedSlot,
                        device: torch.device | str = "cpu") -> tuple[LoraBatch, LoraBatch]:
    """(own-term batch, compensation batch) for a forward pass while `merged` is in place: the runs of
    `merged_slot_lists` (see kernels.lora_batch). In a step ordered by adapter, the compensation batch is the few
    runs around the merged adapter's tokens, each a view of x and out."""
    own, compensation = merged_slot_lists(token_slots, merged)
    return LoraBatch.build(own, device), LoraBatch.build(compensation, device)


def merged_slot_lists(token_slots: Sequence[int], merged: MergedSlot) -> tuple[list[int], list[int]]:
    """(own slots, compensation slots) per token while `merged` is in place.

    Tokens of the merged slot get neither term (the base already holds their adapter); every other token, base-only
    ones included, gets the compensation term −δ_m; tokens of other slots also keep their own term."""
    assert merged.is_merged
    own = [NO_SLOT if slot == merged.slot else slot for slot in token_slots]
    compensation = [NO_SLOT if slot == merged.slot else merged.compensation_slot for slot in token_slots]
    return own, compensation
