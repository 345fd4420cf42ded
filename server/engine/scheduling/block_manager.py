"""Blocks of the paged KV cache: which sequence owns which block, and where each token position lives (its cache
index: the flat cache holds num_blocks * block_size entries per layer).

A sequence's block table grows as its tokens are computed (`allocate`: a prefill chunk, or one decode token) and is
returned whole when it finishes or is preempted (`free`). No prefix sharing: a block has at most one owner.
"""

from collections import deque

from lora_server.engine.scheduling.sequence import Sequence


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int = 16) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks ({num_blocks}) and block_size ({block_size}) must be positive")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))
        self._owner: dict[int, int] = {}  # used block id -> seq_id

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return len(self._owner)

    def num_blocks_needed(self, seq: Sequence, num_new_tokens: int) -> int:
        """Blocks to add to hold the computed tokens plus `num_new_tokens` more."""
        num_positions = seq.num_computed_tokens + num_new_tokens
        return max(-(-num_positions // self.block_size) - len(seq.block_table), 0)

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self.num_blocks_needed(seq, num_new_tokens) <= len(self._free)

    def num_allocatable_tokens(self, seq: Sequence) -> int:
        """The most new tokens `seq` could take now: the rest of its own blocks plus every free one."""
        own = len(seq.block_table) * self.block_size - seq.num_computed_tokens
        return own + len(self._free) * self.block_size

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Grow seq's block table to hold num_computed_tokens + num_new_tokens (a decode appends with 1)."""
        needed = self.num_blocks_needed(seq, num_new_tokens)
        assert needed <= len(self._free), f"sequence {seq.seq_id} needs {needed} blocks, {len(self._free)} free"
        for _ in range(needed):
            block = self._free.popleft()
            self._owner[block] = seq.seq_id
            seq.block_table.append(block)

    def free(self, seq: Sequence) -> None:
        """Return every block of `seq` (finished or preempted); its table is emptied."""
        for block in seq.block_table:
            assert self._owner.pop(block) == seq.seq_id, f"block {block} is not sequence {seq.seq_id}'s"
            self._free.append(block)
        seq.block_table = []

    def cache_indices(self, seq: Sequence, start: int, stop: int) -> list[int]:
        """Where positions [start, stop) of `seq` live in the flat cache: position p is entry p % block_size of block
        block_table[p // block_size]. (The model runner computes the same on the device for a whole step.)"""
        size, table = self.block_size, seq.block_table
        assert stop <= len(table) * size, f"position {stop - 1} of sequence {seq.seq_id} has no block"
        return [table[p // size] * size + p % size for p in range(start, stop)]

    def check_invariants(self, seqs: list[Sequence]) -> None:
        """Every block is free xor owned by exactly the sequence whose table holds it; `seqs` are all live ones."""
        assert len(self._free) + len(self._owner) == self.num_blocks, "blocks leaked or double-freed"
        assert not set(self._free) & self._owner.keys(), "a block is both free and used"
        in_tables = [(block, seq.seq_id) for seq in seqs for block in seq.block_table]
        assert len(in_tables) == len(self._owner) and dict(in_tables) == self._owner, "block tables disagree"
