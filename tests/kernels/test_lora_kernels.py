"""Segmented LoRA shrink/expand, Triton and plain torch, against a float64 per-token loop on random batches.

Each case mixes ranks 1-64 in one row pool (slots placed out of order, with gaps of random rows between them), slots
with no tokens, tokens with no slot, slices of different widths, and any hidden size. Expand is handed a y that is
NaN outside each token's [:rank] columns, and tokens without a slot must come back bit-identical.
"""

import pytest
import torch
from hypothesis import given, settings

from kernels.lora_batch import NO_SLOT, LoraBatch
from kernels.lora_expand import lora_expand_triton
from kernels.lora_gather import lora_gathered_torch
from kernels.lora_shrink import block_m_for, lora_shrink_triton
from kernels.lora_torch import lora_expand_torch, lora_shrink_torch, max_active_rank
from tests.kernels.lora_cases import (
    DTYPES,
    TOLERANCE,
    Y_TOLERANCE,
    LoraCase,
    assert_close_to_reference,
    lora_cases,
    make_case,
    reference,
)


def rank_mask(case: LoraCase, y: torch.Tensor) -> torch.Tensor:
    """[num_tokens, num_slices, max_rank] bool: the entries of y that carry a value (column < the token's rank)."""
    ranks = torch.tensor([case.ranks[s] if s != NO_SLOT else [0] * len(case.slice_sizes) for s in case.token_slots])
    return torch.arange(y.shape[2])[None, None, :] < ranks[:, :, None]


def run_and_check(case: LoraCase, device: torch.device, backend: str) -> None:
    tensors = case.tensors(device)
    inputs_before = {name: t.clone() for name, t in tensors.items()}
    batch = case.batch(device)
    host, tables = case.host_tables(), case.device_tables(device)
    x, lora_a, lora_bt, out = tensors["x"], tensors["lora_a"], tensors["lora_bt"], tensors["out"]

    if backend == "triton":
        max_rank = max_active_rank(batch, host["slot_ranks_host"])
        y = lora_shrink_triton(x, lora_a, batch, tables["slot_row_starts"], tables["slot_ranks"],
                               tables["slot_scales"], max_rank)
    else:
        y = lora_shrink_torch(x, lora_a, batch, host["slot_row_starts_host"], host["slot_ranks_host"],
                              host["slot_scales_host"])
    expected = reference(case, inputs_before)
    valid = rank_mask(case, y.cpu())
    assert_close_to_reference(y.cpu()[valid], expected["y"][valid], expected["y_abs"][valid], Y_TOLERANCE, "y")

    # Expand may read only y[t, k, :rank] of tokens with a slot: everything else is NaN.
    y_poisoned = torch.full_like(y, float("nan"))
    y_poisoned[valid.to(device)] = y[valid.to(device)]
    if backend == "triton":
        lora_expand_triton(y_poisoned, lora_bt, out, batch, tables["slot_row_starts"], tables["slot_ranks"],
                           tables["slice_offsets"])
    else:
        lora_expand_torch(y_poisoned, lora_bt, out, batch, host["slot_row_starts_host"], host["slot_ranks_host"],
                          host["slice_offsets_host"])

    has_slot = torch.tensor([s != NO_SLOT for s in case.token_slots])
    assert torch.equal(out.cpu()[~has_slot], inputs_before["out"].cpu()[~has_slot]), "a token without a slot changed"
    assert_close_to_reference(out.cpu()[has_slot], expected["out"][has_slot], expected["out_abs"][has_slot],
                              TOLERANCE[case.dtype], f"out ({case.dtype})")
    for name in ("x", "lora_a", "lora_bt"):
        assert torch.equal(tensors[name], inputs_before[name]), f"{name} was written to"


# ---------------------------------------------------------------- property tests


@settings(max_examples=25, deadline=None)
@given(case=lora_cases())
def test_triton_matches_float64_reference(case, kernel_device):
    run_and_check(case, kernel_device, "triton")


@settings(max_examples=40, deadline=None)
@given(case=lora_cases())
def test_torch_path_matches_float64_reference(case):
    run_and_check(case, torch.device("cpu"), "torch")


# ---------------------------------------------------------------- each token-tile height, each dtype

MIXED_RANKS = [[1, 1, 1], [4, 4, 4], [8, 0, 8], [16, 16, 16], [17, 17, 17], [33, 0, 0], [64, 64, 64], [5, 9, 2]]
GQA = (72, 24, 24)  # q wider than k and v, none a multiple of a block


def decode_case(dtype: torch.dtype, tokens_per_slot: int) -> LoraCase:
    """Every slot a few tokens (1 token each: decode with every sequence on its own adapter), no-slot tokens too."""
    order = [3, 0, 6, 1, 7, 2, 5, 4]
    token_slots = [s for s in order for _ in range(tokens_per_slot)] + [NO_SLOT, NO_SLOT]
    token_slots = token_slots[1::2] + token_slots[::2]  # interleave, so a slot's tokens are not adjacent
    return make_case(dtype, 129, GQA, MIXED_RANKS, token_slots, seed=1, gaps=[0, 5, 1, 0, 7, 2, 0, 3])


def prefill_case(dtype: torch.dtype, long_len: int) -> LoraCase:
    """A long segment, a short one, single tokens of other slots and tokens with no slot, interleaved."""
    token_slots = [6] * long_len + [2] * 9 + [0, 4, NO_SLOT, 1, NO_SLOT]
    token_slots = token_slots[::3] + token_slots[1::3] + token_slots[2::3]
    return make_case(dtype, 77, GQA, MIXED_RANKS, token_slots, seed=2, gaps=[2, 0, 4, 1, 0, 0, 3, 1])


TILE_CASES = {  # name: (case builder, the token-tile height it must exercise)
    "decode, 1 token per slot": (lambda dtype: decode_case(dtype, 1), 1),
    "decode, 2 tokens per slot": (lambda dtype: decode_case(dtype, 2), 2),
    "decode, 3 tokens per slot": (lambda dtype: decode_case(dtype, 3), 4),
    "short prefill": (lambda dtype: prefill_case(dtype, 40), 16),
    "long prefill": (lambda dtype: prefill_case(dtype, 150), 64),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", TILE_CASES)
def test_triton_every_token_tile_height(name, dtype, kernel_device):
    build, block_m = TILE_CASES[name]
    case = build(dtype)
    assert block_m_for(case.batch("cpu").max_segment_len) == block_m
    run_and_check(case, kernel_device, "triton")


def test_block_m_follows_the_longest_segment():
    assert [block_m_for(n) for n in (1, 2, 3, 4, 5, 16, 127, 128, 4096)] == [1, 2, 4, 4, 16, 16, 16, 64, 64]


# ---------------------------------------------------------------- edges


def test_triton_batch_without_lora_tokens_changes_nothing(kernel_device):
    case = make_case(torch.float16, 40, GQA, MIXED_RANKS, [NO_SLOT] * 5)
    tensors, tables = case.tensors(kernel_device), case.device_tables(kernel_device)
    batch, out_before = case.batch(kernel_device), tensors["out"].clone()
    y = lora_shrink_triton(tensors["x"], tensors["lora_a"], batch, tables["slot_row_starts"], tables["slot_ranks"],
                           tables["slot_scales"], max_rank=0)
    assert y.shape == (5, 3, 0)
    lora_expand_triton(y, tensors["lora_bt"], tensors["out"], batch, tables["slot_row_starts"], tables["slot_ranks"],
                       tables["slice_offsets"])
    assert torch.equal(tensors["out"], out_before)


def test_launchers_reject_tables_of_the_wrong_dtype(kernel_device):
    case = make_case(torch.float32, 16, (8,), [[4]], [0, 0])
    tensors, tables = case.tensors(kernel_device), case.device_tables(kernel_device)
    batch = LoraBatch.build([0, 0], device=kernel_device)
    with pytest.raises(AssertionError):
        lora_shrink_triton(tensors["x"], tensors["lora_a"], batch, tables["slot_row_starts"],
                           tables["slot_ranks"].long(), tables["slot_scales"], 4)
    with pytest.raises(AssertionError):
        lora_shrink_triton(tensors["x"].half(), tensors["lora_a"], batch, tables["slot_row_starts"],
                           tables["slot_ranks"], tables["slot_scales"], 4)


# ---------------------------------------------------------------- the torch backend's gathered path (decode)


def run_gathered_and_check(case: LoraCase) -> None:
    device = torch.device("cpu")
    tensors = case.tensors(device)
    inputs_before = {name: t.clone() for name, t in tensors.items()}
    batch, host, tables = case.batch(device), case.host_tables(), case.device_tables(device)
    max_rank = max_active_rank(batch, host["slot_ranks_host"])
    if max_rank:
        lora_gathered_torch(tensors["x"], tensors["out"], tensors["lora_a"], tensors["lora_bt"], batch.sorted_token_ids,
                            batch.token_slots[batch.sorted_token_ids], tables["slot_row_starts"],
                            tables["slot_ranks"], tables["slot_scales"], host["slice_offsets_host"], max_rank)
    expected = reference(case, inputs_before)
    has_slot = torch.tensor([s != NO_SLOT for s in case.token_slots])
    assert torch.equal(tensors["out"][~has_slot], inputs_before["out"][~has_slot]), "a token without a slot changed"
    assert_close_to_reference(tensors["out"][has_slot], expected["out"][has_slot], expected["out_abs"][has_slot],
                              TOLERANCE[case.dtype], f"out ({case.dtype})")


@settings(max_examples=40, deadline=None)
@given(case=lora_cases())
def test_gathered_torch_path_matches_float64_reference(case):
    """Every segment gathered at once (the decode path), whatever the segment lengths: garbage rows between and
    after slots, mixed ranks and per-slice ranks of 0 must not leak into any token."""
    run_gathered_and_check(case)
