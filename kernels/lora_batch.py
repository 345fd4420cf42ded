"""Per-batch LoRA metadata: which adapter slot each token uses, grouped into segments.

Built once per forward pass and shared by every LoRA layer. A *slot* is where an adapter's weights sit in each
layer's row pool (see `kernels.lora_torch`); it is not the adapter's id, which the engine maps to a slot.
"""

from dataclasses import dataclass

import torch

NO_SLOT = -1  # a token that uses no adapter


@dataclass(frozen=True)
class LoraSegment:
    """Host-side view of one segment: `num_tokens` tokens of `slot`, at `start` in `sorted_token_ids`."""

    slot: int
    start: int
    num_tokens: int


@dataclass(frozen=True)
class LoraBatch:
    token_slots: torch.Tensor  # [num_tokens] int32, slot per token or NO_SLOT
    sorted_token_ids: torch.Tensor  # [num_lora_tokens] int64: indices of tokens with a slot, grouped by slot
    segment_slots: torch.Tensor  # [num_segments] int32: the slot of each segment
    segment_starts: torch.Tensor  # [num_segments] int32: offset of each segment in sorted_token_ids
    segment_lens: torch.Tensor  # [num_segments] int32
    # Host copies, so the torch path and launch-time decisions never wait on the device.
    segments: tuple[LoraSegment, ...]
    max_segment_len: int

    @property
    def num_tokens(self) -> int:
        return self.token_slots.shape[0]

    @property
    def has_lora(self) -> bool:
        return bool(self.segments)

    @classmethod
    def build(cls, token_slots: list[int], device: torch.device | str = "cpu") -> "LoraBatch":
        """Group tokens by slot. Segments follow the order in which slots first appear (any order is valid)."""
        token_ids_by_slot: dict[int, list[int]] = {}
        for token_index, slot in enumerate(token_slots):
            if slot != NO_SLOT:
                assert slot >= 0, f"slot {slot} is neither NO_SLOT nor a valid slot"
                token_ids_by_slot.setdefault(slot, []).append(token_index)
        segments, sorted_ids, start = [], [], 0
        for slot, ids in token_ids_by_slot.items():
            segments.append(LoraSegment(slot=slot, start=start, num_tokens=len(ids)))
            sorted_ids.extend(ids)
            start += len(ids)

        def as_tensor(values: list[int], dtype: torch.dtype) -> torch.Tensor:
            return torch.tensor(values, dtype=dtype).to(device, non_blocking=True)

        return cls(
            token_slots=as_tensor(list(token_slots), torch.int32),
            sorted_token_ids=as_tensor(sorted_ids, torch.int64),
            segment_slots=as_tensor([s.slot for s in segments], torch.int32),
            segment_starts=as_tensor([s.start for s in segments], torch.int32),
            segment_lens=as_tensor([s.num_tokens for s in segments], torch.int32),
            segments=tuple(segments),
            max_segment_len=max((s.num_tokens for s in segments), default=0),
        )

    @classmethod
    def from_segments(cls, batch: "LoraBatch", segments: list[LoraSegment]) -> "LoraBatch":
        """A host-side sub-batch of `batch`'s segments (for the torch path, which reads only host fields and
        sorted_token_ids; the device segment tables are left empty)."""
        empty = batch.segment_slots[:0]
        return cls(token_slots=batch.token_slots, sorted_token_ids=batch.sorted_token_ids, segment_slots=empty,
                   segment_starts=empty, segment_lens=empty, segments=tuple(segments),
                   max_segment_len=max((s.num_tokens for s in segments), default=0))
