"""Paged decode attention: the Triton kernel (compiled on a GPU, else under Triton's interpreter) and the torch path
of PagedKVCache, each against an fp64 loop over every row's own positions, through scattered block tables."""

import random

import pytest
import torch

from lora_server.kernels.paged_decode import paged_decode_triton
from lora_server.model.paged_cache import PagedKVCache, PagedSequenceChunk

BLOCK_SIZE = 4


def reference(q, k_cache, v_cache, block_tables, context_lens, sliding_window):
    """fp64: row i's query heads against positions [max(0, L - window), L) of its own sequence."""
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[1]
    out = torch.empty(q.shape, dtype=torch.float64)
    for i, context_len in enumerate(context_lens):
        first = 0 if sliding_window is None else max(context_len - sliding_window, 0)
        entries = [block_tables[i][p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(first, context_len)]
        for h in range(num_heads):
            kv = h // (num_heads // num_kv_heads)
            keys, values = k_cache[entries, kv].double(), v_cache[entries, kv].double()
            scores = keys @ q[i, h].double() / q.shape[2] ** 0.5
            out[i, h] = torch.softmax(scores, 0) @ values
    return out


def random_case(seed: int, num_heads: int, num_kv_heads: int, head_dim: int, device):
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    num_blocks = 64
    # Lengths across block boundaries: one key, a full block, one past it, and long ragged ones.
    context_lens = [1, BLOCK_SIZE, BLOCK_SIZE + 1, 2 * BLOCK_SIZE - 1] + [rng.randint(1, 40) for _ in range(4)]
    free = list(range(num_blocks))
    rng.shuffle(free)  # scattered blocks: a wrong table cannot go unnoticed
    block_tables = [[free.pop() for _ in range(-(-n // BLOCK_SIZE))] for n in context_lens]
    k_cache = torch.randn(num_blocks * BLOCK_SIZE, num_kv_heads, head_dim, generator=generator).to(device)
    v_cache = torch.randn(num_blocks * BLOCK_SIZE, num_kv_heads, head_dim, generator=generator).to(device)
    q = torch.randn(len(context_lens), num_heads, head_dim, generator=generator).to(device)
    return q, k_cache, v_cache, block_tables, context_lens


# fp32 keys and values, accumulated in fp32: only the summation order differs from fp64. fp16/bf16: q, k and v
# rounded on input (2^-11, 2^-8 relative), then the output rounded once.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 4, 16), (8, 2, 24), (6, 1, 8)])
@pytest.mark.parametrize("sliding_window", [None, 5])
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_triton_paged_decode_matches_fp64(kernel_device, num_heads, num_kv_heads, head_dim, sliding_window, dtype):
    if dtype != torch.float32 and kernel_device.type != "cuda":
        pytest.skip("half precision runs on a GPU only (make gpu-check); the interpreter checks fp32")
    seed = random.randrange(1 << 30)
    q, k_cache, v_cache, block_tables, context_lens = random_case(seed, num_heads, num_kv_heads, head_dim,
                                                                  kernel_device)
    q, k_cache, v_cache = q.to(dtype), k_cache.to(dtype), v_cache.to(dtype)
    max_blocks = max(map(len, block_tables))
    tables = torch.tensor([t + [0] * (max_blocks - len(t)) for t in block_tables], dtype=torch.int32,
                          device=kernel_device)
    lens = torch.tensor(context_lens, dtype=torch.int32, device=kernel_device)
    got = paged_decode_triton(q, k_cache, v_cache, tables, lens, BLOCK_SIZE, sliding_window)
    expected = reference(q.cpu(), k_cache.cpu(), v_cache.cpu(), block_tables, context_lens, sliding_window)
    assert got.dtype == dtype
    torch.testing.assert_close(got.cpu().double(), expected, atol=TOLERANCE[dtype], rtol=TOLERANCE[dtype],
                               msg=f"seed {seed}")


@pytest.mark.parametrize("sliding_window", [None, 5])
def test_torch_decode_path_matches_fp64_and_needs_no_device_reads(sliding_window):
    seed = random.randrange(1 << 30)
    q, k_cache, v_cache, block_tables, context_lens = random_case(seed, 8, 2, 16, "cpu")
    cache = PagedKVCache(1, 64, BLOCK_SIZE, 2, 16, torch.float32, "cpu", sliding_window, attention_backend="torch")
    # Each row's new token is its last position: write it through attend(), the rest of the history beforehand.
    k_new = torch.stack([k_cache[t[(n - 1) // BLOCK_SIZE] * BLOCK_SIZE + (n - 1) % BLOCK_SIZE]
                         for t, n in zip(block_tables, context_lens, strict=True)])
    v_new = torch.stack([v_cache[t[(n - 1) // BLOCK_SIZE] * BLOCK_SIZE + (n - 1) % BLOCK_SIZE]
                         for t, n in zip(block_tables, context_lens, strict=True)])
    cache.k_cache[0, : len(k_cache)], cache.v_cache[0, : len(v_cache)] = k_cache, v_cache  # the scratch block past them
    cache.set_batch([PagedSequenceChunk(i, 1, n - 1, t)
                     for i, (t, n) in enumerate(zip(block_tables, context_lens, strict=True))])
    got = cache.attend(0, q, k_new, v_new)
    expected = reference(q, k_cache, v_cache, block_tables, context_lens, sliding_window)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")


def test_attention_backend_is_checked():
    with pytest.raises(ValueError, match="unknown attention backend"):
        PagedKVCache(1, 4, BLOCK_SIZE, 1, 8, torch.float32, "cpu", attention_backend="flash")
    assert PagedKVCache(1, 4, BLOCK_SIZE, 1, 8, torch.float32, "cpu").attention_backend == "torch"


@pytest.mark.parametrize("attention_backend", ["torch", "triton"])  # triton: under the interpreter without a GPU
def test_entries_no_row_owns_are_never_read(attention_backend):
    """Every cache entry outside the rows' own positions (unwritten block tails, block 0, free blocks) is NaN, as a
    previous owner (a broken adapter's request) may leave it: no row's output may turn NaN (masked weights are 0, and
    0 · NaN is NaN, so such entries must not be read at all)."""
    seed = random.randrange(1 << 30)
    q, k_cache, v_cache, block_tables, context_lens = random_case(seed, 8, 2, 16, "cpu")
    owned = torch.zeros(k_cache.shape[0], dtype=torch.bool)
    for table, n in zip(block_tables, context_lens, strict=True):
        owned[[table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(n)]] = True
    k_cache[~owned], v_cache[~owned] = float("nan"), float("nan")
    cache = PagedKVCache(1, 64, BLOCK_SIZE, 2, 16, torch.float32, "cpu", attention_backend=attention_backend)
    cache.k_cache[0, : len(k_cache)], cache.v_cache[0, : len(v_cache)] = k_cache, v_cache  # the scratch block past them
    last = [t[(n - 1) // BLOCK_SIZE] * BLOCK_SIZE + (n - 1) % BLOCK_SIZE
            for t, n in zip(block_tables, context_lens, strict=True)]
    cache.set_batch([PagedSequenceChunk(i, 1, n - 1, t)
                     for i, (t, n) in enumerate(zip(block_tables, context_lens, strict=True))])
    got = cache.attend(0, q, k_cache[last], v_cache[last])
    expected = reference(q, k_cache, v_cache, block_tables, context_lens, None)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-5, msg=f"seed {seed}")
