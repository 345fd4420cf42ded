"""Segmented LoRA shrink in Triton: y[t, k, :rank] = scale · x[t] @ Aᵀ for each run's slot and each slice k.

Semantics (a run of slot s is rows t0:t1 of x and y; k a slice, r = rank[s][k], a = row_start[s]):
    for each run, for t in t0:t1, for k in slices:
        y[t, k, :r] = scale[s][k] · x[t] @ lora_a[k, a : a + r]ᵀ          (fp32; y[t, k, r:] is left unwritten)
Layout of lora_a and the slot tables: see `kernels.lora_weights`; runs: `kernels.lora_batch`.

Grid: (segment, token tile of the segment, slice × rank block). A segment is a run: its rows of x are read at
segment_start + offs directly, no token indirection. A program computes one [BLOCK_M, BLOCK_R] tile of y and exits at
once if its tile starts past its segment's end, past its slot's rank, or its slot is NO_SLOT (a `TokenSlots` row
of no adapter), so a rank-4 slot launched beside a rank-64 slot costs one rank block, not four.

Decode vs prefill, one rule shared with `kernels.lora_expand` (`block_m_for`):
    max_segment_len <= 4: BLOCK_M = next_power_of_2(max_segment_len) in {1, 2, 4}, CUDA-core multiply-and-sum
                          (the BGMV shape: a streaming GEMV per token, no idle rows to carry)
    max_segment_len < 128: BLOCK_M = 16, tensor cores (tl.dot)
    otherwise:             BLOCK_M = 64, tensor cores (tl.dot): fewer re-reads of A per token of a long prefill
Why: the work is memory-bound either way (masked rows fetch nothing), but a 16-row mma tile with one live row still
carries 16 rows of registers and shared memory per program (compiled for sm_90: 128 registers a thread and 8 KiB of
shared memory, against 64 and 0.5 KiB for the 1-row variant), which caps how many programs an SM keeps in flight.
With at most 4 rows a plain multiply-and-sum is cheap: ≤ 4 FMAs per weight element loaded, far under what the CUDA
cores sustain per byte of HBM. Block sizes per tier: `SHRINK_CONFIGS`, chosen by compiling, not yet by timing.
"""

import torch
import triton
import triton.language as tl

from lora_server.kernels.lora_batch import SegmentTables

DECODE_MAX_SEGMENT_LEN = 4  # longest segment still handled by the CUDA-core (BGMV-like) variant
LONG_SEGMENT_LEN = 128  # from here on, 64-row tiles
BLOCK_R = 16  # rank block: the smallest tl.dot operand width, and the unit of work a slot's rank is charged in
MAX_GRID_YZ = 65535  # CUDA's limit on grid dimensions 1 and 2
HALF_DTYPES = (torch.float16, torch.bfloat16)


# BLOCK_M: (BLOCK_K, num_warps). Picked so no variant spills and fp16/bf16 ones stay at ≤ 128 registers a thread on
# sm_80/sm_90 (ahead-of-time compile, `cuobjdump -res-usage`), which keeps several programs resident per SM. Not yet
# tuned by timing: `python -m lora_server.kernels.bench` on the target GPU is the place to do that.
SHRINK_CONFIGS = {1: (128, 4), 2: (128, 4), 4: (64, 4), 16: (128, 4), 64: (64, 8)}


def block_m_for(max_segment_len: int) -> int:
    """Token tile height for a batch whose longest segment has `max_segment_len` tokens (see module docstring)."""
    assert max_segment_len >= 1
    if max_segment_len <= DECODE_MAX_SEGMENT_LEN:
        return triton.next_power_of_2(max_segment_len)
    return 16 if max_segment_len < LONG_SEGMENT_LEN else 64


@triton.jit
def _lora_shrink_kernel(
    x_ptr, lora_a_ptr, y_ptr,
    segment_slots_ptr, segment_starts_ptr, segment_lens_ptr,
    slot_row_starts_ptr, slot_ranks_ptr, slot_scales_ptr,
    in_features, max_rank,
    stride_xm, stride_xk,
    stride_as, stride_ar, stride_ak,
    stride_ym, stride_ys, stride_yr,
    stride_slot,
    NUM_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    segment = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_sr = tl.program_id(2)
    slice_id = pid_sr % NUM_SLICES
    r0 = (pid_sr // NUM_SLICES) * BLOCK_R

    seg_len = tl.load(segment_lens_ptr + segment)
    if pid_m * BLOCK_M >= seg_len:  # past this segment's last token
        return
    slot = tl.load(segment_slots_ptr + segment)
    if slot < 0:  # NO_SLOT: a token of no adapter in a `TokenSlots` batch (a `LoraBatch` has no such runs)
        return
    # Clamped to y's width so a stale max_rank can never write outside y.
    rank = tl.minimum(tl.load(slot_ranks_ptr + slot * stride_slot + slice_id), max_rank)
    if r0 >= rank:  # past this slot's rank (or the slot skips this slice)
        return
    row_start = tl.load(slot_row_starts_ptr + slot)
    scale = tl.load(slot_scales_ptr + slot * stride_slot + slice_id)
    seg_start = tl.load(segment_starts_ptr + segment)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_r = tl.arange(0, BLOCK_R)
    offs_k = tl.arange(0, BLOCK_K)
    mask_m = offs_m < seg_len
    mask_r = offs_r < rank - r0
    token_ids = seg_start.to(tl.int64) + offs_m  # the run's rows of x and y; masked past its end

    # x tile [BLOCK_M, BLOCK_K]: consecutive rows of the run. A tile [BLOCK_K, BLOCK_R]: rows r0.. of this slot,
    # transposed. Tiles are a base pointer plus small int32 offsets: 64-bit pointer tiles cost registers.
    x_rows = x_ptr + token_ids * stride_xm
    a_base = lora_a_ptr + slice_id.to(tl.int64) * stride_as + (row_start + r0).to(tl.int64) * stride_ar
    a_offs = offs_k[:, None] * stride_ak + offs_r[None, :] * stride_ar

    acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
    for k0 in range(0, in_features, BLOCK_K):
        mask_k = offs_k < in_features - k0
        x = tl.load(x_rows[:, None] + (k0 + offs_k)[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :],
                    other=0.0)
        a = tl.load(a_base + k0 * stride_ak + a_offs, mask=mask_k[:, None] & mask_r[None, :], other=0.0)
        if USE_DOT:
            if UPCAST_DOT:
                x = x.to(tl.float32)
                a = a.to(tl.float32)
            acc = tl.dot(x, a, acc, input_precision=DOT_PRECISION)
        else:  # [BLOCK_M, BLOCK_K, 1] * [1, BLOCK_K, BLOCK_R], summed over k: a GEMV per token on CUDA cores
            acc += tl.sum(x.to(tl.float32)[:, :, None] * a.to(tl.float32)[None, :, :], axis=1)
    acc *= scale

    y_ptrs = y_ptr + token_ids[:, None] * stride_ym + slice_id * stride_ys + (r0 + offs_r)[None, :] * stride_yr
    tl.store(y_ptrs, acc, mask=mask_m[:, None] & mask_r[None, :])


# TRITON_INTERPRET=1 at import time makes @triton.jit build an interpreted function that runs on CPU tensors.
INTERPRETED = not isinstance(_lora_shrink_kernel, triton.runtime.JITFunction)


def lora_shrink_triton(
    x: torch.Tensor,
    lora_a: torch.Tensor,
    batch: SegmentTables,
    slot_row_starts: torch.Tensor,
    slot_ranks: torch.Tensor,
    slot_scales: torch.Tensor,
    max_rank: int,
) -> torch.Tensor:
    """x [num_tokens, in] -> y [num_tokens, num_slices, max_rank] fp32.

    `max_rank` must be at least the rank of every slot in the batch (`LoraWeights.max_rank` is). Only y[t, k, :rank]
    of tokens in a run is written; the rest is uninitialised and `lora_expand_triton` never reads it.
    """
    # ---- shapes, strides and dtypes this launcher assumes
    assert x.dim() == 2 and lora_a.dim() == 3, (x.shape, lora_a.shape)
    num_tokens, in_features = x.shape
    num_slices = lora_a.shape[0]
    assert lora_a.shape[2] == in_features, f"lora_a {tuple(lora_a.shape)} does not match x {tuple(x.shape)}"
    assert x.dtype == lora_a.dtype and x.dtype in (torch.float32, *HALF_DTYPES), (x.dtype, lora_a.dtype)
    assert batch.num_tokens == num_tokens, (batch.num_tokens, num_tokens)
    check_slot_tables(slot_row_starts, slot_ranks, num_slices)
    assert slot_scales.dtype == torch.float32 and slot_scales.shape == slot_ranks.shape and slot_scales.is_contiguous()
    check_lora_batch(batch)
    for t in (lora_a, batch.segment_slots, slot_row_starts, slot_ranks, slot_scales):
        assert t.device == x.device, f"tensors on {t.device} and {x.device}"
    assert max_rank >= 0
    # Tile offsets inside the kernel are int32 (row and token bases are int64).
    assert in_features * max(x.stride(1), lora_a.stride(2)) + BLOCK_R * lora_a.stride(1) < 2**31, "int32 offsets"

    y = torch.empty(num_tokens, num_slices, max_rank, dtype=torch.float32, device=x.device)
    if batch.num_segments == 0 or max_rank == 0 or in_features == 0:
        return y

    # ---- block config and grid
    block_m = block_m_for(batch.max_segment_len)
    use_dot = block_m >= 16
    # Triton's interpreter multiplies bf16 dot operands as their raw uint16 bits (triton-lang/triton#11584, "not
    # supported yet"): there, and only there, the operands go to fp32 first, which is exact.
    upcast_dot = INTERPRETED and x.dtype == torch.bfloat16
    block_k, num_warps = SHRINK_CONFIGS[block_m]
    if x.dtype == torch.float32 and block_m == 16:
        block_k //= 2  # fp32 tiles take twice the registers
    num_rank_blocks = triton.cdiv(max_rank, BLOCK_R)
    grid = (batch.num_segments, triton.cdiv(batch.max_segment_len, block_m), num_slices * num_rank_blocks)
    assert grid[1] <= MAX_GRID_YZ and grid[2] <= MAX_GRID_YZ, grid
    _lora_shrink_kernel[grid](
        x, lora_a, y,
        batch.segment_slots, batch.segment_starts, batch.segment_lens,
        slot_row_starts, slot_ranks, slot_scales,
        in_features, max_rank,
        x.stride(0), x.stride(1),
        lora_a.stride(0), lora_a.stride(1), lora_a.stride(2),
        y.stride(0), y.stride(1), y.stride(2),
        slot_ranks.stride(0),
        NUM_SLICES=num_slices,
        BLOCK_M=block_m, BLOCK_R=BLOCK_R, BLOCK_K=block_k,
        USE_DOT=use_dot,
        # fp32 weights get exact fp32 products; fp16/bf16 operands are exact in any precision.
        DOT_PRECISION="ieee" if x.dtype == torch.float32 or upcast_dot else "tf32",
        UPCAST_DOT=upcast_dot,
        num_warps=num_warps,
    )
    return y


def check_slot_tables(slot_row_starts: torch.Tensor, slot_ranks: torch.Tensor, num_slices: int) -> None:
    assert slot_row_starts.dtype == torch.int32 and slot_row_starts.dim() == 1 and slot_row_starts.is_contiguous()
    assert slot_ranks.dtype == torch.int32 and slot_ranks.is_contiguous(), (slot_ranks.dtype, slot_ranks.stride())
    assert slot_ranks.shape == (slot_row_starts.shape[0], num_slices), (slot_ranks.shape, num_slices)


def check_lora_batch(batch: SegmentTables) -> None:
    """The kernels index the segment tables with unit stride, read them as int32, and trust the runs to be rows of
    x, y and out: the last run ends inside the batch (`runs_end`, a host number)."""
    for t in (batch.segment_slots, batch.segment_starts, batch.segment_lens):
        assert t.dtype == torch.int32 and t.is_contiguous() and t.shape == (batch.num_segments,), (t.dtype, t.shape)
    assert batch.runs_end <= batch.num_tokens, "runs past the batch's end"
