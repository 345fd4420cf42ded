"""Segmented LoRA, Triton and plain torch, against a float64 per-token loop on random batches.

Each case mixes ranks 1-64 in one row pool (slots placed out of order, with gaps of random rows between them), slots
with no tokens, tokens with no slot, slices of different widths, and any hidden size; its tokens come interleaved
(many short runs), sorted by slot (as the engine orders a step) or in long runs. Triton's expand is handed a y that is
NaN outside each token's [:rank] columns, and tokens without a slot must come back bit-identical on every path.
"""

import pytest
import torch
from hypothesis import given, settings

from lora_server.kernels.lora_batch import NO_SLOT, LoraBatch
from lora_server.kernels.lora_expand import lora_expand_triton
from lora_server.kernels.lora_gather import lora_gathered_torch
from lora_server.kernels.lora_shrink import block_m_for, lora_shrink_triton
from lora_server.kernels.lora_torch import lora_runs_torch
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

TORCH_PATHS = ("runs", "gathered")  # kernels.lora_torch on every run; kernels.lora_gather on every run gathered


def rank_mask(case: LoraCase, y: torch.Tensor) -> torch.Tensor:
    """[num_tokens, num_slices, max_rank] bool: the entries of y that carry a value (column < the token's rank)."""
    ranks = torch.tensor([case.ranks[s] if s != NO_SLOT else [0] * len(case.slice_sizes) for s in case.token_slots])
    return torch.arange(y.shape[2])[None, None, :] < ranks[:, :, None]


def run_and_check(case: LoraCase, device: torch.device, path: str, tensors: dict | None = None) -> None:
    """One of "triton" (shrink, then expand: y is checked too), "runs" or "gathered" (the torch paths); on
    `tensors`, or else the case's own."""
    tensors = case.tensors(device) if tensors is None else tensors
    inputs_before = {name: t.clone() for name, t in tensors.items()}
    batch, weights = case.batch(device), case.weights(tensors)
    x, out = tensors["x"], tensors["out"]
    expected = reference(case, inputs_before)

    if path == "triton":
        y = lora_shrink_triton(x, weights.lora_a, batch, weights.device_row_starts, weights.device_ranks,
                               weights.device_scales, weights.max_rank)
        # y is as wide as the largest rank loaded, the reference as the largest in the batch: no rank reaches past.
        assert y.shape[2] >= expected["y"].shape[2]
        valid = rank_mask(case, y.cpu())
        y_batch, valid_batch = y.cpu()[:, :, : expected["y"].shape[2]], valid[:, :, : expected["y"].shape[2]]
        assert_close_to_reference(y_batch[valid_batch], expected["y"][valid_batch], expected["y_abs"][valid_batch],
                                  Y_TOLERANCE, "y")
        # Expand may read only y[t, k, :rank] of tokens with a slot: everything else is NaN.
        y_poisoned = torch.full_like(y, float("nan"))
        y_poisoned[valid.to(device)] = y[valid.to(device)]
        lora_expand_triton(y_poisoned, weights.lora_bt, out, batch, weights.device_row_starts, weights.device_ranks,
                           weights.device_slice_offsets)
    elif path == "runs":
        lora_runs_torch(x, out, weights, batch.segments)
    elif path == "gathered":
        gathered = batch.split_runs(max_gathered_len=case.num_tokens).gathered  # every run, whatever its length
        assert (gathered is None) == (not batch.has_lora)
        if gathered is not None:
            lora_gathered_torch(x, out, weights, gathered)
    else:
        raise AssertionError(path)

    has_slot = torch.tensor([s != NO_SLOT for s in case.token_slots])
    assert torch.equal(out.cpu()[~has_slot], inputs_before["out"].cpu()[~has_slot]), "a token without a slot changed"
    assert_close_to_reference(out.cpu()[has_slot], expected["out"][has_slot], expected["out_abs"][has_slot],
                              TOLERANCE[case.dtype], f"out ({case.dtype}, {path})")
    for name in ("x", "lora_a", "lora_bt"):
        unchanged = torch.allclose(tensors[name], inputs_before[name], rtol=0, atol=0, equal_nan=True)
        assert unchanged, f"{name} was written to"


# ---------------------------------------------------------------- property tests


@settings(max_examples=25, deadline=None)
@given(case=lora_cases())
def test_triton_matches_float64_reference(case, kernel_device):
    run_and_check(case, kernel_device, "triton")


@pytest.mark.parametrize("path", TORCH_PATHS)
@settings(max_examples=40, deadline=None)
@given(case=lora_cases())
def test_torch_paths_match_float64_reference(case, path):
    """The run path on views, and the gathered path on every run at once (whatever the run lengths: garbage rows
    between and after slots, mixed ranks and per-slice ranks of 0 must not leak into any token)."""
    run_and_check(case, torch.device("cpu"), path)


# ---------------------------------------------------------------- each token-tile height, each dtype

MIXED_RANKS = [[1, 1, 1], [4, 4, 4], [8, 0, 8], [16, 16, 16], [17, 17, 17], [33, 0, 0], [64, 64, 64], [5, 9, 2]]
GQA = (72, 24, 24)  # q wider than k and v, none a multiple of a block


def decode_case(dtype: torch.dtype, tokens_per_slot: int, interleave: bool = False) -> LoraCase:
    """Every slot one run of a few tokens (1: decode with every sequence on its own adapter), no-slot tokens too;
    interleaved, a slot's tokens are not adjacent: as many runs as tokens."""
    order = [3, 0, 6, 1, 7, 2, 5, 4]
    if interleave:  # round robin
        token_slots = [s for _ in range(tokens_per_slot) for s in order] + [NO_SLOT, NO_SLOT]
    else:
        token_slots = [s for s in order for _ in range(tokens_per_slot)] + [NO_SLOT, NO_SLOT]
    return make_case(dtype, 129, GQA, MIXED_RANKS, token_slots, seed=1, gaps=[0, 5, 1, 0, 7, 2, 0, 3])


def prefill_case(dtype: torch.dtype, long_len: int) -> LoraCase:
    """A long run, a shorter one, then single tokens of other slots and tokens with no slot, interleaved."""
    tail = [2] * 9 + [0, 4, NO_SLOT, 1, NO_SLOT]
    token_slots = [NO_SLOT] + [6] * long_len + tail[::3] + tail[1::3] + tail[2::3] + [6] * 5
    return make_case(dtype, 77, GQA, MIXED_RANKS, token_slots, seed=2, gaps=[2, 0, 4, 1, 0, 0, 3, 1])


TILE_CASES = {  # name: (case builder, the token-tile height it must exercise)
    "decode, 1 token per slot": (lambda dtype: decode_case(dtype, 1), 1),
    "decode, 2 tokens per slot": (lambda dtype: decode_case(dtype, 2), 2),
    "decode, 3 tokens per slot": (lambda dtype: decode_case(dtype, 3), 4),
    "decode, 3 tokens per slot, interleaved": (lambda dtype: decode_case(dtype, 3, interleave=True), 1),
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


@pytest.mark.parametrize("path", TORCH_PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", TILE_CASES)
def test_torch_paths_on_every_run_shape(name, dtype, path):
    run_and_check(TILE_CASES[name][0](dtype), torch.device("cpu"), path)


def test_block_m_follows_the_longest_segment():
    assert [block_m_for(n) for n in (1, 2, 3, 4, 5, 16, 127, 128, 4096)] == [1, 2, 4, 4, 16, 16, 16, 64, 64]


# ---------------------------------------------------------------- edges


def test_triton_batch_without_lora_tokens_changes_nothing(kernel_device):
    case = make_case(torch.float16, 40, GQA, MIXED_RANKS, [NO_SLOT] * 5)
    tensors = case.tensors(kernel_device)
    batch, weights, out_before = case.batch(kernel_device), case.weights(tensors), tensors["out"].clone()
    y = lora_shrink_triton(tensors["x"], weights.lora_a, batch, weights.device_row_starts, weights.device_ranks,
                           weights.device_scales, max_rank=0)
    assert y.shape == (5, 3, 0)
    lora_expand_triton(y, weights.lora_bt, tensors["out"], batch, weights.device_row_starts, weights.device_ranks,
                       weights.device_slice_offsets)
    assert torch.equal(tensors["out"], out_before)


def test_launchers_reject_what_they_do_not_assume(kernel_device):
    case = make_case(torch.float32, 16, (8,), [[4]], [0, 0])
    tensors = case.tensors(kernel_device)
    weights, batch = case.weights(tensors), LoraBatch.build([0, 0], device=kernel_device)
    with pytest.raises(AssertionError):  # int64 ranks
        lora_shrink_triton(tensors["x"], weights.lora_a, batch, weights.device_row_starts,
                           weights.device_ranks.long(), weights.device_scales, 4)
    with pytest.raises(AssertionError):  # x and lora_a of different dtypes
        lora_shrink_triton(tensors["x"].half(), weights.lora_a, batch, weights.device_row_starts,
                           weights.device_ranks, weights.device_scales, 4)
    with pytest.raises(AssertionError):  # a batch of 2 tokens for 3 rows of x
        lora_shrink_triton(torch.cat([tensors["x"], tensors["x"][:1]]), weights.lora_a, batch,
                           weights.device_row_starts, weights.device_ranks, weights.device_scales, 4)
    y = lora_shrink_triton(tensors["x"], weights.lora_a, batch, weights.device_row_starts, weights.device_ranks,
                           weights.device_scales, 4)
    with pytest.raises(AssertionError):  # an fp16 y
        lora_expand_triton(y.half(), weights.lora_bt, tensors["out"], batch, weights.device_row_starts,
                           weights.device_ranks, weights.device_slice_offsets)


@pytest.mark.parametrize("path", ["triton", *TORCH_PATHS])
def test_nan_rows_of_an_unused_slot_stay_out(path, kernel_device):
    """A broken adapter (NaN weights) sits right after a low-rank slot in the pool: the gathered form pads that slot
    to the set's largest rank with the broken adapter's rows, and no path may let them into any token."""
    ranks = [[4, 4, 4], [16, 16, 16], [16, 16, 16]]  # slot 2 is the broken one, placed right after slot 0
    token_slots = [1, 0, NO_SLOT, 0, 1, 1]
    case = make_case(torch.float32, 33, GQA, ranks, token_slots, seed=7, gaps=[0, 0, 0], order=[1, 0, 2])
    assert case.row_starts[2] == case.row_starts[0] + 4
    device = kernel_device if path == "triton" else torch.device("cpu")
    poisoned = case.tensors(device)
    row = case.row_starts[2]
    poisoned["lora_a"][:, row : row + 16] = float("nan")
    poisoned["lora_bt"][row : row + 16] = float("nan")
    run_and_check(case, device, path, tensors=poisoned)
