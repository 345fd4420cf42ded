"""LoraBatch: a step's tokens as runs (maximal ranges of one slot), the device tables, and the gathered set."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_server.kernels.lora_batch import NO_SLOT, LoraBatch, LoraSegment

token_slot_lists = st.lists(st.sampled_from([NO_SLOT, 0, 1, 2, 3, 7]), max_size=40)


def slots_of(batch: LoraBatch) -> list[int]:
    """The per-token slots a batch's runs describe."""
    token_slots = [NO_SLOT] * batch.num_tokens
    for seg in batch.segments:
        token_slots[seg.token_start : seg.token_end] = [seg.slot] * seg.num_tokens
    return token_slots


@settings(max_examples=200, deadline=None)
@given(token_slots=token_slot_lists)
def test_runs_are_maximal_ranges_of_one_slot_in_token_order(token_slots):
    batch = LoraBatch.build(token_slots)
    assert batch.num_tokens == len(token_slots)
    assert slots_of(batch) == token_slots
    for seg in batch.segments:
        assert seg.num_tokens > 0 and seg.slot != NO_SLOT
    for before, after in zip(batch.segments, batch.segments[1:], strict=False):
        assert before.token_end <= after.token_start, "runs overlap or are out of order"
        assert before.token_end < after.token_start or before.slot != after.slot, "two runs could be one"
    assert batch.max_segment_len == max((seg.num_tokens for seg in batch.segments), default=0)
    assert batch.has_lora == any(s != NO_SLOT for s in token_slots)
    assert batch.num_lora_tokens == sum(s != NO_SLOT for s in token_slots)
    # The device tables hold the same runs, as int32 views of one tensor (one transfer).
    for table, field in ((batch.segment_slots, "slot"), (batch.segment_starts, "token_start"),
                         (batch.segment_lens, "num_tokens")):
        assert table.dtype == torch.int32 and table.is_contiguous()
        assert table.tolist() == [getattr(seg, field) for seg in batch.segments]
        assert table.untyped_storage().data_ptr() == batch.segment_slots.untyped_storage().data_ptr()


def test_a_sorted_step_is_one_run_per_adapter():
    batch = LoraBatch.build([NO_SLOT, NO_SLOT, 4, 4, 4, 1, 9, 9])
    assert batch.segments == (LoraSegment(4, 2, 3), LoraSegment(1, 5, 1), LoraSegment(9, 6, 2))
    interleaved = LoraBatch.build([4, 1, 4, 9, 4])
    assert [seg.num_tokens for seg in interleaved.segments] == [1] * 5


@settings(max_examples=200, deadline=None)
@given(token_slots=token_slot_lists, max_gathered_len=st.integers(0, 5))
def test_split_runs_partitions_the_runs_and_gathers_the_short_ones(token_slots, max_gathered_len):
    batch = LoraBatch.build(token_slots)
    split = batch.split_runs(max_gathered_len)
    assert batch.split_runs(max_gathered_len) is split, "a step's split is computed once, then shared by every layer"
    short = [seg for seg in batch.segments if seg.num_tokens <= max_gathered_len]
    assert list(split.long_segments) == [seg for seg in batch.segments if seg.num_tokens > max_gathered_len]
    if not short:
        assert split.gathered is None
        return
    gathered = split.gathered
    token_ids = [t for seg in short for t in range(seg.token_start, seg.token_end)]
    assert gathered.token_ids.dtype == gathered.token_slots.dtype == torch.int64
    assert gathered.token_ids.tolist() == token_ids
    assert gathered.token_slots.tolist() == [token_slots[t] for t in token_ids]
    assert set(gathered.slots) == {seg.slot for seg in short} and len(set(gathered.slots)) == len(gathered.slots)
    if token_ids == list(range(token_ids[0], token_ids[-1] + 1)):
        assert gathered.block == (token_ids[0], token_ids[-1] + 1)
    else:
        assert gathered.block is None


def test_consecutive_one_token_runs_are_one_block():
    """As the engine orders a step: decodes of distinct adapters side by side, then a prefill run."""
    batch = LoraBatch.build([NO_SLOT, 3, 0, 5, 2, 2, 2, 2])
    gathered = batch.split_runs(1).gathered
    assert gathered.block == (1, 4) and gathered.slots == (3, 0, 5)
    assert batch.split_runs(1).long_segments == (LoraSegment(2, 4, 4),)
    assert LoraBatch.build([3, NO_SLOT, 0]).split_runs(1).gathered.block is None
