"""Plain-torch LoRA for many short runs (decode): gather each token's own A and Bᵀ rows, then batched matmuls.

The run path (`kernels.lora_torch`) issues 1 + num_slices small ops per run, so a decode batch where every token has
its own adapter costs a few ops per token and layer, Python overhead on CPU. Here the whole set of tokens costs a
fixed handful of ops: rows are gathered per token (padded to the set's largest rank, the padding masked out), which
copies each token's adapter weights once, as a BGMV kernel reads them. `kernels.lora_ops` picks between the two.
The same gather, over every token and with a fixed rank bound, is the torch path of a `TokenSlots` batch.

Semantics (the same term as kernels.lora_torch; t a gathered token, s its slot, R the largest rank of the set's
slots in this layer, r = rank[s][k], a = row_start[s]):
    y[t, k, j]     = scale[s][k] · x[t] @ lora_a[k, a + j]    for j < r, else 0      (fp32)
    out[t, lo:hi] += y[t, k, :] @ lora_bt[a : a + R, lo:hi]                         (fp32, rounded into out once)
"""

import torch

from lora_server.kernels.lora_batch import GatheredTokens, TokenSlots
from lora_server.kernels.lora_weights import LoraWeights


def lora_gathered_torch(x: torch.Tensor, out: torch.Tensor, weights: LoraWeights, gathered: GatheredTokens) -> None:
    """out[token_ids] += LoRA(x[token_ids]), each gathered token with its own slot, in place.

    x [num_tokens, in], out [num_tokens, out_features]; `gathered` comes from the step's `LoraBatch.split_runs`.
    """
    max_rank = max(max(weights.ranks[slot], default=0) for slot in gathered.slots)
    if max_rank == 0:  # every slot of the set skips this layer
        return
    if gathered.block is not None:
        start, end = gathered.block
        _add_gathered_terms(x[start:end], out[start:end], weights, gathered.token_slots, max_rank)  # views: in place
        return
    out_tokens = out.index_select(0, gathered.token_ids)  # [G, out], a copy: written back below
    _add_gathered_terms(x.index_select(0, gathered.token_ids), out_tokens, weights, gathered.token_slots, max_rank)
    out.index_copy_(0, gathered.token_ids, out_tokens)


def lora_per_token_torch(x: torch.Tensor, out: torch.Tensor, weights: LoraWeights, token_slots: TokenSlots) -> None:
    """out += LoRA(x), every token with the slot `token_slots.slots` gives it (NO_SLOT: nothing), in place, with no
    host read of the batch: what a captured step runs on the torch backend (see kernels.lora_batch.TokenSlots)."""
    slots = token_slots.slots.long()
    has_slot = slots >= 0  # [T]
    # NO_SLOT rows read slot 0's rows (any valid slot), and their terms are masked to 0 in _add_gathered_terms.
    _add_gathered_terms(x, out, weights, slots.clamp(min=0), token_slots.max_rank, has_slot)


def _add_gathered_terms(x_tokens: torch.Tensor, out_tokens: torch.Tensor, weights: LoraWeights, slots: torch.Tensor,
                        max_rank: int, has_slot: torch.Tensor | None = None) -> None:
    """out_tokens [G, out] += LoRA(x_tokens [G, in]) with token g's slot slots[g] ([G] int64, valid slots), over
    ranks up to max_rank; tokens where has_slot ([G] bool) is False add nothing."""
    lora_a, lora_bt = weights.lora_a, weights.lora_bt
    num_slices, total_rows, in_features = lora_a.shape
    num_tokens = slots.shape[0]
    offsets = torch.arange(max_rank, device=x_tokens.device)  # [R]
    # Rows past the pool's end belong to no one and are masked below; clamp so the gather stays in bounds.
    rows = (weights.device_row_starts[slots].long()[:, None] + offsets).clamp_(max=total_rows - 1).flatten()  # [G*R]
    live = offsets < weights.device_ranks[slots][:, :, None]  # [G, S, R]
    if has_slot is not None:
        live &= has_slot[:, None, None]

    # index_select along a contiguous tensor's rows: whole rows copied, the cheapest gather torch has.
    a = lora_a.index_select(1, rows).view(num_slices, num_tokens, max_rank, in_features)  # [S, G, R, in]
    y = torch.matmul(a.float(), x_tokens.float()[:, :, None])  # [S, G, R, 1] fp32: one GEMV per (slice, token)
    y = y.view(num_slices, num_tokens, max_rank).transpose(0, 1)  # [G, S, R]
    # torch.where, not a multiply by the mask: padding rows may hold another adapter's weights (or anything).
    y = torch.where(live, y * weights.device_scales[slots][:, :, None], 0.0)  # [G, S, R]

    bt = lora_bt.index_select(0, rows).view(num_tokens, max_rank, -1)  # [G, R, out]
    slice_offsets = weights.slice_offsets
    for k in range(num_slices):
        lo, hi = slice_offsets[k], slice_offsets[k + 1]
        # Masked too: padding rows of Bᵀ may hold another adapter's NaN or inf, and 0 · NaN is NaN.
        bt_k = torch.where(live[:, k, :, None], bt[:, :, lo:hi], 0.0)  # [G, R, n_k]
        # bmm then add, not baddbmm_ into out's strided columns, which loops over tokens (measured ~1.6x slower).
        delta = torch.bmm(y[:, k, None, :], bt_k.float())  # [G, 1, n_k] fp32
        out_tokens[:, lo:hi].add_(delta[:, 0])  # rounded into out once
