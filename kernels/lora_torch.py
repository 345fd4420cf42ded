"""Plain-torch segmented LoRA: the CPU path, and the oracle the Triton kernels are tested against.

Weight layout, per LoRA layer (one buffer pair shared by every slot; a slot owns rows, not a padded block):
    lora_a  [num_slices, total_rows, in]   A rows of every slice (q/k/v share x, so they share rows too)
    lora_bt [total_rows, out]             Bᵀ rows; slice k owns columns slice_offsets[k]:slice_offsets[k+1]
A slot is (row_start, rank per slice, scale per slice): its slice-k adapter is rows row_start:row_start+rank.

Semantics (t a token of slot s, r = rank[s][k]):
    shrink:  y[t, k, :r] = scale[s][k] · x[t] @ lora_a[k, row_start[s] : row_start[s] + r]ᵀ       (fp32)
    expand:  out[t, off_k : off_k + n_k] += y[t, k, :r] @ lora_bt[row_start[s] : row_start[s] + r, off_k : off_k + n_k]
One matmul per (segment, slice); slot tables are host lists so slicing never syncs with the device.
"""

from collections.abc import Sequence

import torch

from kernels.lora_batch import LoraBatch


def max_active_rank(batch: LoraBatch, slot_ranks: Sequence[Sequence[int]]) -> int:
    return max((max(slot_ranks[seg.slot]) for seg in batch.segments), default=0)


def lora_shrink_torch(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    batch: LoraBatch,
    slot_row_starts: Sequence[int],
    slot_ranks: Sequence[Sequence[int]],
    slot_scales: Sequence[Sequence[float]],
) -> torch.Tensor:
    """x [num_tokens, in] -> y [num_tokens, num_slices, max_rank] fp32 (rows of tokens without a slot are zero)."""
    num_slices = lora_a.shape[0]
    y = torch.zeros(x.shape[0], num_slices, max_active_rank(batch, slot_ranks), dtype=torch.float32, device=x.device)
    for seg in batch.segments:
        token_ids = batch.sorted_token_ids[seg.start : seg.start + seg.num_tokens]
        x_seg = x.index_select(0, token_ids).float()  # [seg_tokens, in]
        row = slot_row_starts[seg.slot]
        for k in range(num_slices):
            rank = slot_ranks[seg.slot][k]
            if rank == 0:
                continue
            a = lora_a[k, row : row + rank].float()  # [rank, in]
            y[token_ids, k, :rank] = slot_scales[seg.slot][k] * (x_seg @ a.T)
    return y


def lora_expand_torch(
    y: torch.Tensor,
    lora_bt: torch.Tensor,
    out: torch.Tensor,
    batch: LoraBatch,
    slot_row_starts: Sequence[int],
    slot_ranks: Sequence[Sequence[int]],
    slice_offsets: Sequence[int],
) -> None:
    """out [num_tokens, out_total] += y @ Bᵀ per token's slot and slice, in place."""
    for seg in batch.segments:
        token_ids = batch.sorted_token_ids[seg.start : seg.start + seg.num_tokens]
        row = slot_row_starts[seg.slot]
        delta = torch.zeros(seg.num_tokens, out.shape[1], dtype=torch.float32, device=out.device)
        for k in range(len(slice_offsets) - 1):
            rank = slot_ranks[seg.slot][k]
            if rank == 0:
                continue
            lo, hi = slice_offsets[k], slice_offsets[k + 1]
            bt = lora_bt[row : row + rank, lo:hi].float()  # [rank, n_k]
            delta[:, lo:hi] = y[token_ids, k, :rank] @ bt
        out.index_add_(0, token_ids, delta.to(out.dtype))
