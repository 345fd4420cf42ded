"""Plain-torch LoRA for many short segments (decode): gather each token's own A and Bᵀ rows, then batched matmuls.

The segmented torch path issues a few matmuls per segment, so a decode batch where every token has its own adapter
costs ~4 small ops per token and layer, all Python overhead on CPU. Here the whole set of tokens costs a fixed
handful of ops: rows are gathered per token (padded to the largest rank of the set, the padding masked out), which
reads each token's adapter weights once, as a BGMV kernel does.

Semantics (the same as kernels.lora_torch; t a token, s its slot, R the set's largest rank, r = rank[s][k]):
    y[t, k, j]     = scale[s][k] · x[t] @ lora_a[k, row_start[s] + j]    for j < r, else 0      (fp32)
    out[t, lo:hi] += y[t, k, :] @ lora_bt[row_start[s] : row_start[s] + R, lo:hi]
"""

from collections.abc import Sequence

import torch


def lora_gathered_torch(
    x: torch.Tensor,
    out: torch.Tensor,
    lora_a: torch.Tensor,
    lora_bt: torch.Tensor,
    token_ids: torch.Tensor,
    token_slots: torch.Tensor,
    slot_row_starts: torch.Tensor,
    slot_ranks: torch.Tensor,
    slot_scales: torch.Tensor,
    slice_offsets_host: Sequence[int],
    max_rank: int,
) -> None:
    """out[token_ids] += LoRA(x[token_ids]) for tokens of slots `token_slots` (same length as token_ids).

    x [num_tokens, in]; lora_a [num_slices, total_rows, in]; lora_bt [total_rows, out]; slot tables as in
    kernels.lora_ops (row starts [num_slots], ranks and scales [num_slots, num_slices]); max_rank bounds every rank.
    """
    num_slices, total_rows, _ = lora_a.shape
    num_tokens = token_ids.shape[0]
    slots = token_slots.long()
    offsets = torch.arange(max_rank, device=x.device)
    # Rows past the pool's end belong to no one and are masked below; clamp so the gather stays in bounds.
    rows = (slot_row_starts[slots].long()[:, None] + offsets).clamp_(max=total_rows - 1)  # [T, R]
    live = offsets[None, None, :] < slot_ranks[slots][:, :, None]  # [T, num_slices, R]

    x_tokens = x.index_select(0, token_ids).float()  # [T, in]
    a = lora_a.transpose(0, 1)[rows].float()  # [T, R, num_slices, in]
    y = torch.bmm(a.flatten(1, 2), x_tokens[:, :, None])  # [T, R * num_slices, 1]
    y = y.view(num_tokens, max_rank, num_slices).transpose(1, 2)  # [T, num_slices, R]
    # torch.where, not a multiply: padding rows may hold another adapter's weights (or anything).
    y = torch.where(live, y * slot_scales[slots][:, :, None], 0.0)

    bt = lora_bt[rows].float()  # [T, R, out]
    delta = torch.empty(num_tokens, lora_bt.shape[1], dtype=torch.float32, device=x.device)
    for k in range(num_slices):
        lo, hi = slice_offsets_host[k], slice_offsets_host[k + 1]
        # Masked like y: a padding row times a zero of y is still NaN when the row holds NaN (someone else's rows).
        bt_k = torch.where(live[:, k, :, None], bt[:, :, lo:hi], 0.0)  # [T, R, n_k]
        delta[:, lo:hi] = torch.bmm(y[:, k, None, :], bt_k)[:, 0]  # [T, n_k]
    out.index_add_(0, token_ids, delta.to(out.dtype))
