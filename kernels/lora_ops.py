"""Backend-agnostic LoRA entry point: out += the LoRA term of every token's own slot, by plain torch or by Triton.

Semantics (t a token of slot s, k a slice, r = rank[s][k], a = row_start[s], lo:hi = slice k's columns):
    y[t, k, :r]    = scale[s][k] · x[t] @ lora_a[k, a : a + r]ᵀ            (fp32)
    out[t, lo:hi] += y[t, k, :r] @ lora_bt[a : a + r, lo:hi]
The "torch" backend is `kernels.lora_torch` (host slot tables); "triton" is `kernels.lora_shrink` +
`kernels.lora_expand` (device slot tables). Both are given to `apply_lora` so the caller never converts per call.
"""

import os
from collections.abc import Sequence
from importlib.util import find_spec

import torch

from kernels.lora_batch import LoraBatch
from kernels.lora_gather import lora_gathered_torch
from kernels.lora_torch import lora_expand_torch, lora_shrink_torch, max_active_rank

LORA_BACKENDS = ("auto", "triton", "torch")
# The torch backend gathers per-token weights for segments this short (decodes), and runs one matmul per segment
# for longer ones (prefill). Why 2: on CPU a segment's few matmuls cost ~50 µs of overhead, about what gathering two
# tokens' rows of a 7B-sized layer costs; measured with server.engine.bench (see the engine's benchmark notes).
GATHER_MAX_SEGMENT_TOKENS = 2


def split_short_segments(batch: LoraBatch) -> tuple[tuple[torch.Tensor, torch.Tensor] | None, LoraBatch | None]:
    """(token ids and slots of the short segments, or None; a LoraBatch of the long segments, or None)."""
    short = [seg for seg in batch.segments if seg.num_tokens <= GATHER_MAX_SEGMENT_TOKENS]
    if not short:
        return None, batch
    if len(short) == len(batch.segments):
        token_ids = batch.sorted_token_ids
        return (token_ids, batch.token_slots[token_ids]), None
    token_ids = torch.cat([batch.sorted_token_ids[seg.start: seg.start + seg.num_tokens] for seg in short])
    long = LoraBatch.from_segments(batch, [seg for seg in batch.segments if seg.num_tokens > GATHER_MAX_SEGMENT_TOKENS])
    return (token_ids, batch.token_slots[token_ids]), long


def resolve_lora_backend(name: str, device: torch.device) -> str:
    """Resolve a configured backend name ("auto", "triton" or "torch") to the one that runs on `device`."""
    if name not in LORA_BACKENDS:
        raise ValueError(f"unknown LoRA backend {name!r}; choose one of {', '.join(LORA_BACKENDS)}")
    device = torch.device(device)
    if name == "auto":
        return "triton" if device.type == "cuda" and find_spec("triton") is not None else "torch"
    if name == "triton":
        if find_spec("triton") is None:
            raise ValueError("LoRA backend 'triton' needs the triton package, which is not installed")
        if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError(
                f"LoRA backend 'triton' runs on CUDA devices, not {device.type}; on CPU only under Triton's "
                "interpreter (TRITON_INTERPRET=1, for tests: slow). Use 'torch' or 'auto' here."
            )
    return name


def apply_lora(
    backend: str,
    x: torch.Tensor,
    out: torch.Tensor,
    lora_a: torch.Tensor,
    lora_bt: torch.Tensor,
    batch: LoraBatch,
    *,
    slot_row_starts_host: Sequence[int],
    slot_ranks_host: Sequence[Sequence[int]],
    slot_scales_host: Sequence[Sequence[float]],
    slice_offsets_host: Sequence[int],
    slot_row_starts: torch.Tensor,
    slot_ranks: torch.Tensor,
    slot_scales: torch.Tensor,
    slice_offsets: torch.Tensor,
    max_rank: int | None = None,
) -> None:
    """out [num_tokens, out_features] += LoRA(x [num_tokens, in]) for each token's slot, in place.

    `backend` is a resolved one ("torch" or "triton", see `resolve_lora_backend`). The host and device slot tables
    must describe the same slots: the torch path reads the host ones, the Triton path the device ones (int32 row
    starts [num_slots], int32 ranks and fp32 scales [num_slots, num_slices], int32 slice offsets [num_slices + 1]).
    `max_rank` may be any bound on the ranks of the batch's slots (say, the largest rank loaded in this layer, kept
    up to date by the layer): by default it is computed exactly, a Python loop over the batch's segments per call.
    """
    if not batch.has_lora:
        return
    if max_rank is None:
        max_rank = max_active_rank(batch, slot_ranks_host)
    if max_rank == 0:  # every slot in the batch skips this layer
        return
    if backend == "torch":
        short, long = split_short_segments(batch)
        if short is not None:
            token_ids, token_slots = short
            lora_gathered_torch(x, out, lora_a, lora_bt, token_ids, token_slots, slot_row_starts, slot_ranks,
                                slot_scales, slice_offsets_host, max_rank)
        if long is not None:
            y = lora_shrink_torch(x, lora_a, long, slot_row_starts_host, slot_ranks_host, slot_scales_host)
            lora_expand_torch(y, lora_bt, out, long, slot_row_starts_host, slot_ranks_host, slice_offsets_host)
    elif backend == "triton":
        # Imported on first use: @triton.jit reads TRITON_INTERPRET when the kernel module is imported, and a
        # CPU-only server never pays for importing triton.
        from kernels.lora_expand import lora_expand_triton
        from kernels.lora_shrink import lora_shrink_triton

        y = lora_shrink_triton(x, lora_a, batch, slot_row_starts, slot_ranks, slot_scales, max_rank)
        lora_expand_triton(y, lora_bt, out, batch, slot_row_starts, slot_ranks, slice_offsets)
    else:
        raise ValueError(f"apply_lora needs a resolved backend ('torch' or 'triton'), got {backend!r}")
