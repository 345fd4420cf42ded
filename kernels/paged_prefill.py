"""Varlen paged prefill attention in Triton: every new token of every chunk in one launch, keys read in place.

The torch path (server.model.paged_cache) gathers each chunk's whole history into a new tensor and builds a mask, in
every layer: one SDPA per chunk, or one over all of them padded when they are alike. Here one program per (query tile,
query head) walks its chunk's key positions in tiles, finds each key's cache entry through the block table, and keeps
an online softmax in fp32: no gather, no mask tensor, no loop on the host. A query tile is up to BLOCK_Q consecutive
new tokens of one chunk; `prefill_tiles` lists them on the host once per step.

Semantics (chunk c: query_lens[c] new tokens at rows query_starts[c].. of q and out, at positions start_positions[c]..;
position p's K/V at entry block_tables[c, p // block_size] * block_size + p % block_size; query head h reads KV head
h // group, as SDPA's enable_gqa pairs them; window W as transformers defines it, the query itself included):
    for c, for i < query_lens[c], row = query_starts[c] + i, P = start_positions[c] + i:
        out[row, h] = softmax_p(q[row, h] · k[p] / sqrt(head_dim)) @ v[p]     over p <= P (and p > P - W)
Rows of out that belong to no chunk (decode rows, say) are left as they were.
"""

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

BLOCK_Q = 16  # new tokens per query tile: the smallest tl.dot tile, so a short chunk wastes at most 15 rows
BLOCK_N = 32  # keys per inner step: two fp16 [32, 128] K/V tiles are 16 KiB, leaving shared memory to pipeline
MIN_DOT = 16  # tl.dot needs every tile dimension >= 16: head dims below it are padded with masked zeros
INDEX_DTYPES = (torch.int32, torch.int64)


def prefill_tiles(query_lens: Sequence[int], block_q: int) -> tuple[list[int], list[int]]:
    """The grid's query tiles, built on the host from the scheduler's integers: for each tile, its chunk index and
    the offset of its first query within the chunk (a multiple of block_q). A chunk of n tokens gets ceil(n / block_q)
    tiles; a chunk of 0 tokens gets none."""
    tile_chunks: list[int] = []
    tile_offsets: list[int] = []
    for chunk, query_len in enumerate(query_lens):
        assert query_len >= 0, (chunk, query_len)
        for offset in range(0, query_len, block_q):
            tile_chunks.append(chunk)
            tile_offsets.append(offset)
    return tile_chunks, tile_offsets


@triton.jit
def _paged_prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, block_tables_ptr,
                          query_starts_ptr, query_lens_ptr, start_positions_ptr, tile_chunks_ptr, tile_offsets_ptr,
                          stride_q_row, stride_q_head, stride_k_entry, stride_k_head, stride_v_entry, stride_v_head,
                          stride_out_row, stride_out_head, stride_table_row, qk_scale, window,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                          BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr, GROUP: tl.constexpr,
                          HAS_WINDOW: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    chunk = tl.load(tile_chunks_ptr + tile).to(tl.int64)
    tile_offset = tl.load(tile_offsets_ptr + tile).to(tl.int32)
    query_start = tl.load(query_starts_ptr + chunk).to(tl.int64)
    query_len = tl.load(query_lens_ptr + chunk).to(tl.int32)
    start_position = tl.load(start_positions_ptr + chunk).to(tl.int32)

    offs_q = tile_offset + tl.arange(0, BLOCK_Q)  # queries of this tile, as offsets within the chunk
    live_q = offs_q < query_len
    query_positions = start_position + offs_q  # [BLOCK_Q]
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q_mask = live_q[:, None] & dim_mask[None, :]
    rows = query_start + offs_q  # int64: rows of q and out
    q = tl.load(q_ptr + rows[:, None] * stride_q_row + head * stride_q_head + dims[None, :], mask=q_mask,
                other=0.0)  # [BLOCK_Q, BLOCK_D]
    if UPCAST_DOT:
        q = q.to(tl.float32)

    # Keys any query of the tile may see: [lo, hi). Tiles wholly outside it are never visited.
    hi = start_position + tl.minimum(tile_offset + BLOCK_Q, query_len)  # past the tile's last query position
    lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(start_position + tile_offset - window + 1, 0)  # the first query's oldest visible key
    table_row = block_tables_ptr + chunk * stride_table_row
    offs_n = tl.arange(0, BLOCK_N)
    running_max = tl.full([BLOCK_Q], -float("inf"), dtype=tl.float32)
    running_sum = tl.zeros([BLOCK_Q], dtype=tl.float32)
    acc = tl.zeros([BLOCK_Q, BLOCK_D], dtype=tl.float32)
    for key_start in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
        key_positions = key_start + offs_n  # [BLOCK_N]
        # Only [lo, hi) is read: every position there is this chunk's own, written entry; anything else in the
        # cache (a block's unwritten tail, a free block) may hold a previous owner's NaN, and 0 · NaN is NaN.
        live_n = (key_positions >= lo) & (key_positions < hi)
        blocks = tl.load(table_row + key_positions // BLOCK_SIZE, mask=live_n, other=0).to(tl.int64)
        entries = blocks * BLOCK_SIZE + key_positions % BLOCK_SIZE
        kv_mask = live_n[:, None] & dim_mask[None, :]
        k = tl.load(k_ptr + entries[:, None] * stride_k_entry + kv_head * stride_k_head + dims[None, :],
                    mask=kv_mask, other=0.0)  # [BLOCK_N, BLOCK_D]
        v = tl.load(v_ptr + entries[:, None] * stride_v_entry + kv_head * stride_v_head + dims[None, :],
                    mask=kv_mask, other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
            v = v.to(tl.float32)
        scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale  # [BLOCK_Q, BLOCK_N], log2 units
        visible = live_n[None, :] & (key_positions[None, :] <= query_positions[:, None])
        if HAS_WINDOW:
            visible = visible & (key_positions[None, :] > query_positions[:, None] - window)
        scores = tl.where(visible, scores, -float("inf"))
        new_max = tl.maximum(running_max, tl.max(scores, 1))
        # A query that sees no key yet (padding rows, or its window starts past this tile) keeps max -inf: shift by
        # 0 instead, so its weights are exp2(-inf) = 0 rather than exp2(-inf - -inf) = NaN.
        shift = tl.where(new_max == -float("inf"), 0.0, new_max)
        weights = tl.exp2(scores - shift[:, None])
        rescale = tl.exp2(running_max - shift)
        acc = acc * rescale[:, None] + tl.dot(weights.to(v.dtype), v, input_precision=DOT_PRECISION)
        running_sum = running_sum * rescale + tl.sum(weights, 1)
        running_max = new_max
    # Every live query sees at least itself, so its sum is > 0; padding rows are masked out of the store.
    out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
    tl.store(out_ptr + rows[:, None] * stride_out_row + head * stride_out_head + dims[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_mask)


# TRITON_INTERPRET=1 at import time makes @triton.jit build an interpreted function that runs on CPU tensors.
INTERPRETED = not isinstance(_paged_prefill_kernel, triton.runtime.JITFunction)


def paged_prefill_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                         block_tables: torch.Tensor, query_starts: torch.Tensor, query_lens: torch.Tensor,
                         start_positions: torch.Tensor, tile_chunks: torch.Tensor, tile_offsets: torch.Tensor,
                         block_size: int, sliding_window: int | None, block_q: int = BLOCK_Q) -> None:
    """Writes every chunk's rows of out in place (other rows untouched). q/out [num_tokens, num_heads, head_dim];
    k_cache/v_cache [num_entries, num_kv_heads, head_dim] (one layer, this step's K/V already written);
    block_tables [num_chunks, max_blocks]; query_starts/query_lens/start_positions [num_chunks];
    tile_chunks/tile_offsets [num_tiles] from `prefill_tiles(query_lens, block_q)`. Tables: int32 or int64, on q's
    device. Reads no tensor on the host, so a compiled or captured forward can call it."""
    num_tokens, num_heads, head_dim = q.shape
    num_entries, num_kv_heads, _ = k_cache.shape
    num_chunks = query_starts.shape[0]
    num_tiles = tile_chunks.shape[0]
    # ---- shapes, strides, dtypes
    assert out.shape == q.shape and out.dtype == q.dtype, (out.shape, q.shape, out.dtype, q.dtype)
    assert k_cache.shape == v_cache.shape == (num_entries, num_kv_heads, head_dim), (k_cache.shape, v_cache.shape)
    assert k_cache.dtype == v_cache.dtype == q.dtype, (q.dtype, k_cache.dtype, v_cache.dtype)
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert num_entries % block_size == 0, (num_entries, block_size)
    assert block_size >= 1 and block_size & (block_size - 1) == 0, f"block size {block_size} must be a power of two"
    assert block_q >= MIN_DOT and block_q & (block_q - 1) == 0, f"block_q {block_q}: a power of two >= {MIN_DOT}"
    assert sliding_window is None or sliding_window >= 1, sliding_window
    for x in (q, k_cache, v_cache, out):
        assert x.stride(2) == 1, "head_dim must be contiguous"
    assert block_tables.dim() == 2 and block_tables.shape[0] == num_chunks and block_tables.stride(1) == 1, (
        block_tables.shape, block_tables.stride())
    assert tile_offsets.shape == (num_tiles,), (tile_chunks.shape, tile_offsets.shape)
    for table in (query_starts, query_lens, start_positions, tile_chunks, tile_offsets, block_tables):
        assert table.dtype in INDEX_DTYPES and table.device == q.device, (table.dtype, table.device, q.device)
    for table in (query_starts, query_lens, start_positions, tile_chunks, tile_offsets):
        assert table.dim() == 1 and table.stride(0) == 1, (table.shape, table.stride())
    for x in (k_cache, v_cache, out):
        assert x.device == q.device, (x.device, q.device)
    if num_tiles == 0:
        return
    # ---- block config and grid
    # Triton's interpreter multiplies bf16 dot operands as their raw uint16 bits (triton-lang/triton#11584): there,
    # and only there, the operands go to fp32 first, which is exact.
    upcast_dot = INTERPRETED and q.dtype == torch.bfloat16
    _paged_prefill_kernel[(num_tiles, num_heads)](
        q, k_cache, v_cache, out, block_tables,
        query_starts, query_lens, start_positions, tile_chunks, tile_offsets,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0),
        head_dim ** -0.5 * 1.4426950408889634, sliding_window or 0,  # scale in log2 units: the kernel uses exp2
        HEAD_DIM=head_dim, BLOCK_D=max(MIN_DOT, triton.next_power_of_2(head_dim)), BLOCK_SIZE=block_size,
        BLOCK_Q=block_q, BLOCK_N=BLOCK_N, GROUP=num_heads // num_kv_heads, HAS_WINDOW=sliding_window is not None,
        # fp32 operands would go through TF32 on tensor cores by default (10-bit mantissa): ask for full fp32.
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or upcast_dot else "tf32", UPCAST_DOT=upcast_dot,
    )


# A custom op, so that a compiled forward calls the kernel as one opaque node (the compiler does not trace Triton).
@torch.library.custom_op("lora_server::paged_prefill", mutates_args=("out",))
def paged_prefill_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                     block_tables: torch.Tensor, query_starts: torch.Tensor, query_lens: torch.Tensor,
                     start_positions: torch.Tensor, tile_chunks: torch.Tensor, tile_offsets: torch.Tensor,
                     block_size: int, sliding_window: int, block_q: int) -> None:
    """`paged_prefill_triton` with sliding_window 0 meaning none (a custom op takes no optional int here)."""
    paged_prefill_triton(q, k_cache, v_cache, out, block_tables, query_starts, query_lens, start_positions,
                         tile_chunks, tile_offsets, block_size, sliding_window or None, block_q)


@paged_prefill_op.register_fake
def _(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor, block_tables: torch.Tensor,
      query_starts: torch.Tensor, query_lens: torch.Tensor, start_positions: torch.Tensor, tile_chunks: torch.Tensor,
      tile_offsets: torch.Tensor, block_size: int, sliding_window: int, block_q: int) -> None:
    return None
