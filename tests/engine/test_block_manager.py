"""The paged KV cache's block manager: grow by chunks and by single tokens, free, slots; random use never leaks."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lora_server.engine.scheduling.block_manager import BlockManager
from lora_server.engine.scheduling.sequence import Sequence


def make_seq(seq_id: int, num_prompt: int = 1) -> Sequence:
    return Sequence(seq_id=seq_id, prompt_token_ids=list(range(num_prompt)), max_new_tokens=8)


def compute(blocks: BlockManager, seq: Sequence, num_tokens: int) -> None:
    """What a scheduled step does to a sequence: allocate, then the model computes the tokens."""
    blocks.allocate(seq, num_tokens)
    seq.num_computed_tokens += num_tokens


def test_allocate_append_free():
    blocks = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(0, num_prompt=6)
    assert blocks.num_blocks_needed(seq, 6) == 2
    compute(blocks, seq, 6)  # prefill: positions 0..5 in two blocks
    assert len(seq.block_table) == 2 and blocks.num_free_blocks == 6 and blocks.num_used_blocks == 2
    compute(blocks, seq, 1)  # decode appends: positions 6 and 7 still fit the second block
    compute(blocks, seq, 1)
    assert len(seq.block_table) == 2
    compute(blocks, seq, 1)  # position 8 opens a third
    assert len(seq.block_table) == 3 and blocks.num_free_blocks == 5
    blocks.check_invariants([seq])
    blocks.free(seq)
    assert seq.block_table == [] and blocks.num_free_blocks == 8
    blocks.check_invariants([seq])


def test_can_allocate_counts_room_left_in_own_blocks():
    blocks = BlockManager(num_blocks=3, block_size=4)
    a, b = make_seq(0), make_seq(1)
    compute(blocks, a, 5)  # two blocks, three slots spare in the second
    assert blocks.num_allocatable_tokens(a) == 3 + 4
    assert blocks.can_allocate(a, 7) and not blocks.can_allocate(a, 8)
    assert blocks.can_allocate(b, 4) and not blocks.can_allocate(b, 5)
    compute(blocks, b, 4)
    assert blocks.num_free_blocks == 0 and blocks.can_allocate(a, 3) and not blocks.can_allocate(a, 4)
    with pytest.raises(AssertionError):
        blocks.allocate(b, 1)


def test_cache_indices_follow_the_block_table():
    blocks = BlockManager(num_blocks=4, block_size=4)
    a, b = make_seq(0), make_seq(1)
    compute(blocks, a, 3)
    compute(blocks, b, 4)
    compute(blocks, a, 3)  # a: blocks 0 and 2, b: block 1
    assert a.block_table == [0, 2] and b.block_table == [1]
    assert blocks.cache_indices(a, 0, 6) == [0, 1, 2, 3, 8, 9]
    assert blocks.cache_indices(a, 5, 6) == [9] and blocks.cache_indices(b, 3, 4) == [7]
    with pytest.raises(AssertionError):
        blocks.cache_indices(b, 0, 5)


def test_refuses_bad_sizes():
    with pytest.raises(ValueError):
        BlockManager(num_blocks=0)
    with pytest.raises(ValueError):
        BlockManager(num_blocks=4, block_size=0)


@settings(max_examples=150, deadline=None)
@given(num_blocks=st.integers(1, 12), block_size=st.sampled_from([1, 2, 4, 16]),
       ops=st.lists(st.tuples(st.integers(0, 3), st.booleans(), st.integers(1, 40)), max_size=60))
def test_random_use_never_leaks_or_shares(num_blocks, block_size, ops):
    blocks = BlockManager(num_blocks, block_size)
    seqs = [make_seq(i) for i in range(4)]
    for index, is_free, num_tokens in ops:
        seq = seqs[index]
        if is_free:
            blocks.free(seq)
            seq.num_computed_tokens = 0
        elif blocks.can_allocate(seq, num_tokens):
            assert num_tokens <= blocks.num_allocatable_tokens(seq)
            compute(blocks, seq, num_tokens)
            assert len(seq.block_table) * block_size - block_size < seq.num_computed_tokens  # no spare block
        else:
            assert num_tokens > blocks.num_allocatable_tokens(seq)
        blocks.check_invariants(seqs)
        indices = [i for seq in seqs for i in blocks.cache_indices(seq, 0, seq.num_computed_tokens)]
        assert len(indices) == len(set(indices)) and all(0 <= i < num_blocks * block_size for i in indices)
    for seq in seqs:
        blocks.free(seq)
    assert blocks.num_free_blocks == num_blocks
