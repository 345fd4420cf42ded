"""Per-step LoRA metadata: which adapter slot each token uses, as *runs* of consecutive tokens of one slot.

Built once per forward pass (one host-to-device copy) and read by every LoRA layer. A run (a segment) is a maximal
range of consecutive tokens with the same slot; tokens with NO_SLOT belong to no run. A run's tokens are rows
token_start : token_start + num_tokens of x and out themselves, so every kernel works on views, with no token
indirection. Any order of tokens is valid: a batch whose adapters are interleaved just has more, shorter runs. The
engine orders each step's sequences by adapter, so that each adapter's tokens form one run.

A *slot* is where an adapter's weights sit in each layer's row pool (see `kernels.lora_weights`); it is not the
adapter's id, which the engine maps to a slot.

`TokenSlots` is the other form a step's LoRA batch takes: one slot per token on the device and nothing on the host,
for a step captured in a CUDA graph, whose launches must not depend on which adapters the step mixes. Both forms
expose the same segment tables (`SegmentTables`), which is all the Triton kernels read.
"""

from dataclasses import dataclass, field
from typing import Protocol

import torch

NO_SLOT = -1  # a token that uses no adapter


@dataclass(frozen=True)
class LoraSegment:
    """Host-side view of one run: rows token_start : token_start + num_tokens of x and out, all of `slot`."""

    slot: int
    token_start: int
    num_tokens: int

    @property
    def token_end(self) -> int:
        return self.token_start + self.num_tokens


@dataclass(frozen=True)
class GatheredTokens:
    """The tokens of a batch's short runs, concatenated: what the torch path's gathered form reads, built once per
    step (see `LoraBatch.split_runs`) so that no layer rebuilds it."""

    token_ids: torch.Tensor  # [num_gathered] int64: rows of x and out, ascending
    token_slots: torch.Tensor  # [num_gathered] int64: the slot of each of those rows
    block: tuple[int, int] | None  # (start, end) when token_ids is exactly start..end-1: x and out rows are a view
    slots: tuple[int, ...]  # the distinct slots among them, host side (for the largest rank, per layer)

    @property
    def num_tokens(self) -> int:
        return self.token_ids.shape[0]


@dataclass(frozen=True)
class RunSplit:
    """A batch's runs split by length: long ones (one matmul per run, on views) and short ones (gathered)."""

    long_segments: tuple[LoraSegment, ...]
    gathered: GatheredTokens | None  # None when no run is short


class SegmentTables(Protocol):
    """What the Triton LoRA kernels launch over: runs as device tables, and the host numbers that size the grid."""

    num_tokens: int
    num_segments: int  # columns of the tables: the grid's first dimension
    max_segment_len: int  # the longest run: the grid's second dimension and the tile height
    runs_end: int  # one past the last row any run covers (checked against the batch on the host)
    segment_slots: torch.Tensor  # [num_segments] int32: each run's slot (NO_SLOT: the run adds nothing)
    segment_starts: torch.Tensor  # [num_segments] int32: its first row in x and out
    segment_lens: torch.Tensor  # [num_segments] int32: its number of rows


@dataclass(frozen=True, eq=False)
class LoraBatch:
    num_tokens: int
    # Host copies, so the torch path and launch-time decisions never wait on the device.
    segments: tuple[LoraSegment, ...]  # the runs, in token order
    max_segment_len: int  # the longest run's num_tokens (0 without runs)
    # The runs as tables, one column per run: rows (slot, first row in x and out, number of rows), int32.
    device_table: torch.Tensor  # [3, num_segments] on the device, for the Triton kernels
    # The same on the host (CPU): what the compiled forward hands to the LoRA custom ops, which rebuild the batch
    # from it (see kernels.lora_ops).
    host_table: torch.Tensor  # [3, num_segments]
    # device_table's rows, as views made once per batch (every layer's launch reads them).
    segment_slots: torch.Tensor  # [num_segments]: the slot of each run
    segment_starts: torch.Tensor  # [num_segments]: its first row in x and out
    segment_lens: torch.Tensor  # [num_segments]: its number of rows
    # split_runs' results by gather limit: computed by the first layer that asks, reused by every other.
    _splits: dict[int, RunSplit] = field(default_factory=dict, repr=False)

    @property
    def has_lora(self) -> bool:
        return bool(self.segments)

    @property
    def num_segments(self) -> int:
        return len(self.segments)

    @property
    def runs_end(self) -> int:
        return self.segments[-1].token_end if self.segments else 0

    @property
    def num_lora_tokens(self) -> int:
        return sum(seg.num_tokens for seg in self.segments)

    @property
    def device(self) -> torch.device:
        return self.device_table.device

    @classmethod
    def build(cls, token_slots: list[int], device: torch.device | str = "cpu") -> "LoraBatch":
        """The runs of `token_slots` ([num_tokens] slot per token, or NO_SLOT), in token order."""
        segments: list[LoraSegment] = []
        run_slot, run_start = NO_SLOT, 0
        for token_index, slot in enumerate([*token_slots, NO_SLOT]):  # the sentinel closes the last run
            if slot == run_slot:
                continue
            if run_slot != NO_SLOT:
                segments.append(LoraSegment(slot=run_slot, token_start=run_start, num_tokens=token_index - run_start))
            assert slot >= NO_SLOT, f"slot {slot} is neither NO_SLOT nor a valid slot"
            run_slot, run_start = slot, token_index
        # One transfer for the three tables: rows of one int32 tensor, each a contiguous view.
        host_table = torch.tensor([[s.slot for s in segments], [s.token_start for s in segments],
                                   [s.num_tokens for s in segments]], dtype=torch.int32).view(3, len(segments))
        return cls._with_tables(len(token_slots), tuple(segments), host_table,
                                host_table.to(device, non_blocking=True))

    @classmethod
    def from_tables(cls, num_tokens: int, host_table: torch.Tensor, device_table: torch.Tensor) -> "LoraBatch":
        """The batch whose runs are the columns of host_table [3, num_segments] (slot, start, length), already
        copied to the device as device_table: how the LoRA custom ops get the batch back inside a compiled graph."""
        slots, starts, lens = host_table.tolist()
        segments = tuple(LoraSegment(slot, start, n) for slot, start, n in zip(slots, starts, lens, strict=True))
        return cls._with_tables(num_tokens, segments, host_table, device_table)

    @classmethod
    def _with_tables(cls, num_tokens: int, segments: tuple[LoraSegment, ...], host_table: torch.Tensor,
                     device_table: torch.Tensor) -> "LoraBatch":
        return cls(
            num_tokens=num_tokens,
            segments=segments,
            max_segment_len=max((s.num_tokens for s in segments), default=0),
            device_table=device_table,
            host_table=host_table,
            segment_slots=device_table[0],
            segment_starts=device_table[1],
            segment_lens=device_table[2],
        )

    def split_runs(self, max_gathered_len: int) -> RunSplit:
        """Runs of at most `max_gathered_len` tokens gathered into one set, the others kept as runs. Computed once
        per batch and limit: every layer of the step gets the same object."""
        split = self._splits.get(max_gathered_len)
        if split is None:
            split = self._splits[max_gathered_len] = self._split(max_gathered_len)
        return split

    def _split(self, max_gathered_len: int) -> RunSplit:
        short = [seg for seg in self.segments if seg.num_tokens <= max_gathered_len]
        long_segments = tuple(seg for seg in self.segments if seg.num_tokens > max_gathered_len)
        if not short:
            return RunSplit(long_segments, None)
        token_ids = [t for seg in short for t in range(seg.token_start, seg.token_end)]
        token_slots = [seg.slot for seg in short for _ in range(seg.num_tokens)]
        contiguous = token_ids[-1] - token_ids[0] + 1 == len(token_ids)  # ascending and distinct, so no gaps
        # One transfer for both: rows of one int64 tensor.
        table = torch.tensor([token_ids, token_slots], dtype=torch.int64).to(self.device, non_blocking=True)
        gathered = GatheredTokens(
            token_ids=table[0],
            token_slots=table[1],
            block=(token_ids[0], token_ids[-1] + 1) if contiguous else None,
            slots=tuple(dict.fromkeys(seg.slot for seg in short)),
        )
        return RunSplit(long_segments, gathered)


@dataclass(frozen=True, eq=False)
class TokenSlots:
    """A step's LoRA batch with nothing on the host: each token is its own run of one row, of the slot in `slots`
    (a token of NO_SLOT adds nothing, and neither does a padding row).

    Why: a CUDA graph replays its launches exactly as captured, so their grids may depend only on the number of
    tokens (the graph's batch-size bucket) and on `max_rank`, a bound fixed for the engine's life, never on which
    adapters a step mixes; the slots themselves are read by the kernels from device memory, which the runner
    rewrites before each replay. One row per run costs a re-read of an adapter's rows per token where a `LoraBatch`
    reads them once per run: the BGMV shape, which is what decode runs are on the GPU anyway."""

    slots: torch.Tensor  # [num_tokens] int32 on the device: each token's slot, or NO_SLOT
    max_rank: int  # at least every loaded slot's rank in every layer: y's width and the grid's rank blocks
    segment_starts: torch.Tensor  # [num_tokens] int32: 0, 1, ..., num_tokens - 1 (fixed)
    segment_lens: torch.Tensor  # [num_tokens] int32: all ones (fixed; NO_SLOT rows exit on their slot)

    @classmethod
    def over(cls, slots: torch.Tensor, max_rank: int) -> "TokenSlots":
        """The batch that reads `slots` ([num_tokens] int32, rewritten in place between steps)."""
        assert slots.dtype == torch.int32 and slots.dim() == 1 and slots.is_contiguous(), (slots.dtype, slots.shape)
        assert max_rank > 0
        num_tokens = slots.shape[0]
        starts = torch.arange(num_tokens, dtype=torch.int32, device=slots.device)
        return cls(slots, max_rank, starts, torch.ones_like(starts))

    @property
    def num_tokens(self) -> int:
        return self.slots.shape[0]

    @property
    def num_segments(self) -> int:
        return self.slots.shape[0]

    @property
    def max_segment_len(self) -> int:
        return 1

    @property
    def runs_end(self) -> int:
        return self.slots.shape[0]

    @property
    def segment_slots(self) -> torch.Tensor:
        return self.slots

    @property
    def device(self) -> torch.device:
        return self.slots.device
