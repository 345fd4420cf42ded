"""Paged decode attention in Triton: each new token attends to its own sequence's keys where they lie in the cache.

The torch path (server.model.paged_cache) gathers every sequence's keys and values into a padded tensor per layer, so
each step copies the KV cache once more than it reads it. Here one program per (token, query head) walks its
sequence's block table and reads each block in place, with an online softmax in fp32 (no padded copy, no mask
tensor): the bytes a decode step moves are the cache's own.

Semantics (row i of the decode group, context length L = context_lens[i], query head h, its KV head h // group, as
SDPA's enable_gqa pairs them; position p lives at entry (p % block_size) of block block_tables[i, p // block_size]):
    out[i, h] = softmax_p(q[i, h] · k[p] / sqrt(head_dim)) @ v[p]     over p < L (and p >= L - window with a window)
"""

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, block_tables_ptr, context_lens_ptr,
                         stride_q_row, stride_q_head, stride_k_entry, stride_k_head, stride_v_entry, stride_v_head,
                         stride_out_row, stride_out_head, stride_table_row, sm_scale, window,
                         HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                         GROUP: tl.constexpr, HAS_WINDOW: tl.constexpr):
    row = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    context_len = tl.load(context_lens_ptr + row)
    dims = tl.arange(0, BLOCK_D)
    dim_mask = dims < HEAD_DIM
    q = tl.load(q_ptr + row * stride_q_row + head * stride_q_head + dims, mask=dim_mask, other=0.0).to(tl.float32)
    q = q * sm_scale
    first = 0
    if HAS_WINDOW:
        first = tl.maximum(context_len - window, 0)
    offsets = tl.arange(0, BLOCK_SIZE)
    running_max = -float("inf")
    running_sum = 0.0
    acc = tl.zeros([BLOCK_D], dtype=tl.float32)
    for block_index in range(first // BLOCK_SIZE, tl.cdiv(context_len, BLOCK_SIZE)):
        block = tl.load(block_tables_ptr + row * stride_table_row + block_index).to(tl.int64)
        positions = block_index * BLOCK_SIZE + offsets  # [BLOCK_SIZE]
        live = (positions < context_len) & (positions >= first)
        entries = block * BLOCK_SIZE + offsets
        load_mask = live[:, None] & dim_mask[None, :]
        k = tl.load(k_ptr + entries[:, None] * stride_k_entry + kv_head * stride_k_head + dims[None, :],
                    mask=load_mask, other=0.0).to(tl.float32)  # [BLOCK_SIZE, BLOCK_D]
        scores = tl.where(live, tl.sum(k * q[None, :], 1), -float("inf"))  # [BLOCK_SIZE]
        # Every visited block holds at least one live position, so new_max is finite.
        new_max = tl.maximum(running_max, tl.max(scores, 0))
        weights = tl.exp(scores - new_max)
        rescale = tl.exp(running_max - new_max)
        v = tl.load(v_ptr + entries[:, None] * stride_v_entry + kv_head * stride_v_head + dims[None, :],
                    mask=load_mask, other=0.0).to(tl.float32)
        acc = acc * rescale + tl.sum(weights[:, None] * v, 0)
        running_sum = running_sum * rescale + tl.sum(weights, 0)
        running_max = new_max
    out = acc / running_sum
    tl.store(out_ptr + row * stride_out_row + head * stride_out_head + dims,
             out.to(out_ptr.dtype.element_ty), mask=dim_mask)


# A custom op, so that a compiled forward calls the kernel as one opaque node (the compiler does not trace Triton).
@torch.library.custom_op("lora_server::paged_decode", mutates_args=())
def paged_decode_op(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                    context_lens: torch.Tensor, block_size: int, sliding_window: int) -> torch.Tensor:
    """`paged_decode_triton` with sliding_window 0 meaning none (a custom op takes no optional int here)."""
    return paged_decode_triton(q, k_cache, v_cache, block_tables, context_lens, block_size, sliding_window or None)


@paged_decode_op.register_fake
def _(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
      context_lens: torch.Tensor, block_size: int, sliding_window: int) -> torch.Tensor:
    return torch.empty_like(q)


def paged_decode_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
                        context_lens: torch.Tensor, block_size: int, sliding_window: int | None) -> torch.Tensor:
    """q [num_rows, num_heads, head_dim]; k_cache/v_cache [num_entries, num_kv_heads, head_dim] (one layer);
    block_tables [num_rows, max_blocks] and context_lens [num_rows] (each >= 1), int32 or int64 -> [num_rows, num_heads,
    head_dim] in q's dtype."""
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[1]
    assert num_heads % num_kv_heads == 0, (num_heads, num_kv_heads)
    assert block_size & (block_size - 1) == 0, f"block size {block_size} must be a power of two"
    assert k_cache.stride(2) == 1 and v_cache.stride(2) == 1 and q.stride(2) == 1, "head_dim must be contiguous"
    out = torch.empty_like(q)
    if num_rows == 0:
        return out
    _paged_decode_kernel[(num_rows, num_heads)](
        q, k_cache, v_cache, out, block_tables, context_lens,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), v_cache.stride(0), v_cache.stride(1),
        out.stride(0), out.stride(1), block_tables.stride(0), head_dim ** -0.5, sliding_window or 0,
        HEAD_DIM=head_dim, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_SIZE=block_size,
        GROUP=num_heads // num_kv_heads, HAS_WINDOW=sliding_window is not None,
    )
    return out
