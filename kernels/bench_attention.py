"""The paged attention kernels against the bytes they must read: decode (`kernels.paged_decode`) and prefill
(`kernels.paged_prefill`), each beside a plain-torch baseline that gathers the same keys and runs SDPA.

    python -m lora_server.kernels.bench_attention             # CUDA: bf16, 32 query / 8 KV heads of 128, blocks of 16
    python -m lora_server.kernels.bench_attention --quick     # small shapes, a smoke run (CPU: Triton only if
                                                              # TRITON_INTERPRET=1, and then slowly)

Decode, per row: its context's K and V, read once (2 · context · kv_heads · head_dim · dtype size bytes), is the
bound; "GB/s" divides those bytes by the time, "% copy" compares that with a large device copy measured in the same
run (one read and one write per byte). Prefill: the causal FLOPs, 4 · Σ_chunks Σ_queries visible keys · heads ·
head_dim, in TFLOP/s. The baseline gathers each row's keys into a padded tensor (what the torch backend of
server.model.paged_cache does) and runs one SDPA, so its time includes the copy the kernels exist to avoid.
"""

import argparse
import os
import random
from collections.abc import Callable

import torch
import torch.nn.functional as F

from lora_server.kernels.bench import make_timer, measure_peak_bandwidth

BLOCK_SIZE = 16


def make_cache(num_entries: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device: torch.device):
    k = torch.randn(num_entries, kv_heads, head_dim, device=device).to(dtype)
    return k, torch.randn_like(k)


def scattered_tables(num_rows: int, blocks_per_row: int, device: torch.device, rng: random.Random) -> torch.Tensor:
    """[num_rows, blocks_per_row] int32: every row its own blocks, shuffled over the cache (as the block manager
    leaves them after a while)."""
    blocks = list(range(num_rows * blocks_per_row))
    rng.shuffle(blocks)
    return torch.tensor(blocks, dtype=torch.int32, device=device).view(num_rows, blocks_per_row)


def gathered_keys(block_tables: torch.Tensor, context_len: int) -> torch.Tensor:
    """[num_rows, context_len] int64 cache entries of positions 0..context_len-1 of each row."""
    positions = torch.arange(context_len, device=block_tables.device)
    return block_tables.long()[:, positions // BLOCK_SIZE] * BLOCK_SIZE + positions % BLOCK_SIZE


def decode_row(num_rows: int, context_len: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
               device: torch.device, timer: Callable, with_triton: bool, rng: random.Random) -> dict:
    blocks_per_row = -(-context_len // BLOCK_SIZE)
    k_cache, v_cache = make_cache(num_rows * blocks_per_row * BLOCK_SIZE, kv_heads, head_dim, dtype, device)
    tables = scattered_tables(num_rows, blocks_per_row, device, rng)
    context_lens = torch.full((num_rows,), context_len, dtype=torch.int32, device=device)
    q = torch.randn(num_rows, heads, head_dim, device=device).to(dtype)
    entries = gathered_keys(tables, context_len)

    def torch_decode() -> torch.Tensor:
        keys = k_cache[entries].transpose(1, 2)  # [rows, kv_heads, context, head_dim]: the copy
        values = v_cache[entries].transpose(1, 2)
        return F.scaled_dot_product_attention(q[:, :, None], keys, values, enable_gqa=True)[:, :, 0]

    row = {"bytes": 2 * num_rows * context_len * kv_heads * head_dim * k_cache.element_size(),
           "torch": timer(torch_decode)}
    if with_triton:
        from lora_server.kernels.paged_decode import paged_decode_triton

        def triton_decode() -> torch.Tensor:
            return paged_decode_triton(q, k_cache, v_cache, tables, context_lens, BLOCK_SIZE, None)

        torch.testing.assert_close(triton_decode().float(), torch_decode().float(), atol=3e-2, rtol=3e-2)
        row["triton"] = timer(triton_decode)
    return row


def prefill_row(num_chunks: int, chunk_len: int, heads: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                device: torch.device, timer: Callable, with_triton: bool, rng: random.Random) -> dict:
    blocks_per_row = -(-chunk_len // BLOCK_SIZE)
    k_cache, v_cache = make_cache(num_chunks * blocks_per_row * BLOCK_SIZE, kv_heads, head_dim, dtype, device)
    tables = scattered_tables(num_chunks, blocks_per_row, device, rng)
    q = torch.randn(num_chunks * chunk_len, heads, head_dim, device=device).to(dtype)
    entries = gathered_keys(tables, chunk_len)
    causal = torch.ones(chunk_len, chunk_len, dtype=torch.bool, device=device).tril()

    def torch_prefill() -> torch.Tensor:  # alike chunks padded into one SDPA: the torch backend's best case
        keys = k_cache[entries].transpose(1, 2)  # [chunks, kv_heads, chunk_len, head_dim]
        values = v_cache[entries].transpose(1, 2)
        queries = q.view(num_chunks, chunk_len, heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(queries, keys, values, attn_mask=causal, enable_gqa=True)
        return out.transpose(1, 2).reshape(-1, heads, head_dim)

    visible = num_chunks * chunk_len * (chunk_len + 1) // 2
    row = {"flops": 4 * visible * heads * head_dim, "torch": timer(torch_prefill)}
    if with_triton:
        from lora_server.kernels.paged_prefill import BLOCK_Q, paged_prefill_triton, prefill_tiles

        tile_chunks, tile_offsets = (torch.tensor(t, dtype=torch.int32, device=device)
                                     for t in prefill_tiles([chunk_len] * num_chunks, BLOCK_Q))
        starts = torch.arange(num_chunks, dtype=torch.int32, device=device) * chunk_len
        lens = torch.full((num_chunks,), chunk_len, dtype=torch.int32, device=device)
        zeros = torch.zeros_like(lens)
        out = torch.empty_like(q)

        def triton_prefill() -> torch.Tensor:
            paged_prefill_triton(q, k_cache, v_cache, out, tables, starts, lens, zeros, tile_chunks, tile_offsets,
                                 BLOCK_SIZE, None)
            return out

        torch.testing.assert_close(triton_prefill().float(), torch_prefill().float(), atol=3e-2, rtol=3e-2)
        row["triton"] = timer(triton_prefill)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--quick", action="store_true", help="small shapes: a smoke run")
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    with_triton = device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"
    timer = make_timer(device, cpu_runs=3 if args.quick else 10)
    heads, kv_heads, head_dim = (4, 2, 16) if args.quick else (32, 8, 128)
    decode_shapes = [(2, 32), (4, 48)] if args.quick else [(1, 1024), (16, 1024), (64, 256), (64, 1024), (64, 4096),
                                                           (256, 1024)]
    prefill_shapes = [(2, 32)] if args.quick else [(1, 512), (4, 512), (16, 128), (1, 4096)]
    rng = random.Random(0)
    peak = measure_peak_bandwidth(device, timer, (1 << 20) if args.quick else (1 << 30))
    columns = ["torch"] + (["triton"] if with_triton else [])
    print(f"# paged attention, {device.type} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'})"
          f", {dtype}, {heads} query / {kv_heads} KV heads of {head_dim}, blocks of {BLOCK_SIZE}; copy bandwidth "
          f"{peak / 1e9:.1f} GB/s")
    print("\n## decode: one token per row\n")
    print("| rows | context | K/V MB | " + " | ".join(f"{c} µs | {c} GB/s | {c} % copy" for c in columns) + " |")
    print("|---:|---:|---:|" + "---:|---:|---:|" * len(columns))
    for num_rows, context_len in decode_shapes:
        row = decode_row(num_rows, context_len, heads, kv_heads, head_dim, dtype, device, timer, with_triton, rng)
        cells = [f"{row[c] * 1e6:.1f} | {row['bytes'] / row[c] / 1e9:.1f} | {100 * row['bytes'] / row[c] / peak:.0f}%"
                 for c in columns]
        print(f"| {num_rows} | {context_len} | {row['bytes'] / 1e6:.1f} | " + " | ".join(cells) + " |")
    print("\n## prefill: alike chunks from position 0\n")
    print("| chunks | tokens each | " + " | ".join(f"{c} µs | {c} TFLOP/s" for c in columns) + " |")
    print("|---:|---:|" + "---:|---:|" * len(columns))
    for num_chunks, chunk_len in prefill_shapes:
        row = prefill_row(num_chunks, chunk_len, heads, kv_heads, head_dim, dtype, device, timer, with_triton, rng)
        cells = [f"{row[c] * 1e6:.1f} | {row['flops'] / row[c] / 1e12:.2f}" for c in columns]
        print(f"| {num_chunks} | {chunk_len} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
