"""Segmented LoRA expand in Triton: out[t, slice k] += y[t, k, :rank] @ Bᵀ rows of each run's slot, in place.

Semantics (a run of slot s is rows t0:t1; k a slice, r = rank[s][k], a = row_start[s], lo:hi = slice k's columns):
    for each run, for t in t0:t1, for k in slices:
        out[t, lo:hi] += y[t, k, :r] @ lora_bt[a : a + r, lo:hi]          (fp32 sum, rounded once into out)
Rows in no run (tokens without a slot) are never read or written. Layout: `kernels.lora_weights`, `kernels.lora_batch`.

Grid: (segment, token tile of the segment, column tile of out). A segment is a run: its rows of y and out are read
at segment_start + offs directly. A column tile may straddle slices of any width; the program walks the (few) slices,
and for each slice that meets its columns loops over the slot's rank in blocks of BLOCK_R: the loop bound is the
slot's own rank, so a rank-4 slot costs one block beside a rank-64 slot. All slices add into one fp32 accumulator,
then one read-modify-write of out: each element of out belongs to one program (runs never overlap).

Token tile height follows `kernels.lora_shrink.block_m_for` (decode: ≤ 4 rows on CUDA cores; prefill: 16 or 64 rows
on tensor cores). On tensor cores, y (fp32) meets Bᵀ converted to fp32 in a tf32 mma for fp16/bf16 layers: fp16 and
bf16 weights are exact in tf32, and y keeps tf32's 10 mantissa bits, no fewer than an fp16 or bf16 output holds.
"""

import torch
import triton
import triton.language as tl

from lora_server.kernels.lora_batch import SegmentTables
from lora_server.kernels.lora_shrink import HALF_DTYPES, MAX_GRID_YZ, block_m_for, check_lora_batch, check_slot_tables

BLOCK_R = 16  # rank block: the smallest tl.dot reduction width worth an mma, and the unit a slot's rank is charged in
# BLOCK_M: (BLOCK_N, num_warps), chosen as in `kernels.lora_shrink.SHRINK_CONFIGS` (no spills, ≤ 128 registers).
EXPAND_CONFIGS = {1: (128, 4), 2: (128, 4), 4: (64, 4), 16: (128, 4), 64: (64, 8)}


@triton.jit
def _lora_expand_kernel(
    y_ptr, lora_bt_ptr, out_ptr,
    segment_slots_ptr, segment_starts_ptr, segment_lens_ptr,
    slot_row_starts_ptr, slot_ranks_ptr, slice_offsets_ptr,
    out_features, max_rank,
    stride_ym, stride_ys, stride_yr,
    stride_btr, stride_btn,
    stride_om, stride_on,
    stride_slot,
    NUM_SLICES: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    segment = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)

    seg_len = tl.load(segment_lens_ptr + segment)
    if pid_m * BLOCK_M >= seg_len:  # past this segment's last token
        return
    slot = tl.load(segment_slots_ptr + segment)
    if slot < 0:  # NO_SLOT: a token of no adapter in a `TokenSlots` batch (a `LoraBatch` has no such runs)
        return
    row_start = tl.load(slot_row_starts_ptr + slot)
    seg_start = tl.load(segment_starts_ptr + segment)

    n0 = pid_n * BLOCK_N
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_r = tl.arange(0, BLOCK_R)
    mask_m = offs_m < seg_len
    token_ids = seg_start.to(tl.int64) + offs_m  # the run's rows of y and out; masked past its end

    # Tiles are a base pointer plus small int32 offsets (64-bit pointer tiles cost registers); the offsets are the
    # same for every slice and rank block, only the bases move.
    y_rows = y_ptr + token_ids * stride_ym  # [BLOCK_M]
    y_offs = offs_r * stride_yr  # [BLOCK_R]
    bt_offs = offs_r[:, None] * stride_btr + offs_n[None, :] * stride_btn  # [BLOCK_R, BLOCK_N]

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for slice_id in range(NUM_SLICES):  # a loop, not unrolled: one slice's tiles live at a time
        lo = tl.load(slice_offsets_ptr + slice_id)
        hi = tl.load(slice_offsets_ptr + slice_id + 1)
        # Clamped to y's width so a stale max_rank can never read outside y.
        rank = tl.minimum(tl.load(slot_ranks_ptr + slot * stride_slot + slice_id), max_rank)
        # A slice that misses this column tile gets no rank blocks at all.
        rank = tl.where((lo < n0 + BLOCK_N) & (hi > n0), rank, 0)
        mask_n = (offs_n >= lo) & (offs_n < hi)
        for r0 in range(0, rank, BLOCK_R):
            mask_r = offs_r < rank - r0
            # y tile [BLOCK_M, BLOCK_R] of this slice. Past the rank y is uninitialised: the mask keeps it out.
            y_tile = y_rows[:, None] + (slice_id * stride_ys + r0 * stride_yr) + y_offs[None, :]
            y = tl.load(y_tile, mask=mask_m[:, None] & mask_r[None, :], other=0.0)
            # Bᵀ tile [BLOCK_R, BLOCK_N]: rows row_start + r0.. of this slot, this slice's columns.
            bt_base = lora_bt_ptr + (row_start + r0).to(tl.int64) * stride_btr
            bt = tl.load(bt_base + bt_offs, mask=mask_r[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
            if USE_DOT:
                acc = tl.dot(y, bt, acc, input_precision=DOT_PRECISION)
            else:  # [BLOCK_M, BLOCK_R, 1] * [1, BLOCK_R, BLOCK_N], summed over r, on CUDA cores
                acc += tl.sum(y[:, :, None] * bt[None, :, :], axis=1)

    out_ptrs = out_ptr + token_ids[:, None] * stride_om + offs_n[None, :] * stride_on
    mask_out = mask_m[:, None] & (offs_n < out_features)[None, :]
    out = tl.load(out_ptrs, mask=mask_out, other=0.0)
    tl.store(out_ptrs, (out.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=mask_out)


def lora_expand_triton(
    y: torch.Tensor,
    lora_bt: torch.Tensor,
    out: torch.Tensor,
    batch: SegmentTables,
    slot_row_starts: torch.Tensor,
    slot_ranks: torch.Tensor,
    slice_offsets: torch.Tensor,
) -> None:
    """out [num_tokens, out_features] += y [num_tokens, num_slices, max_rank] @ Bᵀ per token's slot, in place.

    `y` comes from `lora_shrink_triton` with the same batch and slot tables: only y[t, k, :rank] is read.
    """
    # ---- shapes, strides and dtypes this launcher assumes
    assert y.dim() == 3 and lora_bt.dim() == 2 and out.dim() == 2, (y.shape, lora_bt.shape, out.shape)
    num_tokens, num_slices, max_rank = y.shape
    out_features = out.shape[1]
    assert y.dtype == torch.float32, y.dtype
    assert out.dtype == lora_bt.dtype and out.dtype in (torch.float32, *HALF_DTYPES), (out.dtype, lora_bt.dtype)
    assert out.shape[0] == num_tokens == batch.num_tokens, (out.shape, y.shape, batch.num_tokens)
    assert lora_bt.shape[1] == out_features, f"lora_bt {tuple(lora_bt.shape)} does not match out {tuple(out.shape)}"
    assert slice_offsets.dtype == torch.int32 and slice_offsets.shape == (num_slices + 1,), slice_offsets.shape
    assert slice_offsets.is_contiguous()
    check_slot_tables(slot_row_starts, slot_ranks, num_slices)
    check_lora_batch(batch)
    for t in (lora_bt, out, batch.segment_slots, slot_row_starts, slot_ranks, slice_offsets):
        assert t.device == y.device, f"tensors on {t.device} and {y.device}"
    # Tile offsets inside the kernel are int32 (row and token bases are int64).
    assert BLOCK_R * lora_bt.stride(0) + out_features * lora_bt.stride(1) < 2**31, "int32 offsets"
    assert num_slices * y.stride(1) + max_rank * y.stride(2) < 2**31, "int32 offsets"
    if batch.num_segments == 0 or max_rank == 0 or out_features == 0:
        return

    # ---- block config and grid
    block_m = block_m_for(batch.max_segment_len)
    use_dot = block_m >= 16
    block_n, num_warps = EXPAND_CONFIGS[block_m]
    if out.dtype == torch.float32 and block_m == 16:
        block_n //= 2  # fp32 tiles take twice the registers
    grid = (batch.num_segments, triton.cdiv(batch.max_segment_len, block_m), triton.cdiv(out_features, block_n))
    assert grid[1] <= MAX_GRID_YZ and grid[2] <= MAX_GRID_YZ, grid
    _lora_expand_kernel[grid](
        y, lora_bt, out,
        batch.segment_slots, batch.segment_starts, batch.segment_lens,
        slot_row_starts, slot_ranks, slice_offsets,
        out_features, max_rank,
        y.stride(0), y.stride(1), y.stride(2),
        lora_bt.stride(0), lora_bt.stride(1),
        out.stride(0), out.stride(1),
        slot_ranks.stride(0),
        NUM_SLICES=num_slices,
        BLOCK_M=block_m, BLOCK_R=BLOCK_R, BLOCK_N=block_n,
        USE_DOT=use_dot,
        # fp32 layers keep exact fp32 products; fp16/bf16 weights are exact in tf32 (see module docstring).
        DOT_PRECISION="ieee" if out.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )
