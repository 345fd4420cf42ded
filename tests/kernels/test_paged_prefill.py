"""Varlen paged prefill attention (kernels.paged_prefill), on the GPU when there is one, else under Triton's
interpreter: several ragged chunks per launch, continued prefills, scattered block tables, GQA, sliding windows, block
sizes 1..16, against an fp64 loop over each query's own visible keys. Every cache entry no chunk owns is NaN and every
row no chunk owns holds a sentinel, so a kernel that reads or writes outside its chunk fails."""

import random
from dataclasses import dataclass

import pytest
import torch

from lora_server.kernels.paged_prefill import BLOCK_Q, paged_prefill_triton, prefill_tiles

SENTINEL = 1234.5  # in every row of out that belongs to no chunk (decode rows): the kernel must leave it there
# fp32 inputs accumulated in fp32: only the summation order differs from fp64. fp16/bf16: q, k, v rounded on input
# (2^-11, 2^-8 relative), the softmax weights rounded once for the second dot, the output rounded once.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@dataclass
class PrefillCase:
    q: torch.Tensor  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor  # [num_entries, num_kv_heads, head_dim]: NaN in every entry no chunk owns
    v_cache: torch.Tensor
    owned_rows: torch.Tensor  # [num_tokens] bool: rows of q/out that belong to some chunk
    query_starts: list[int]
    query_lens: list[int]
    start_positions: list[int]
    block_tables: list[list[int]]  # padded with block 0 to one width


def random_case(rng: random.Random, num_heads: int, num_kv_heads: int, head_dim: int, block_size: int,
                query_lens: list[int], start_positions: list[int]) -> PrefillCase:
    generator = torch.Generator().manual_seed(rng.randrange(1 << 30))
    context_lens = [s + n for s, n in zip(start_positions, query_lens, strict=True)]
    needed = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(needed) + 3  # spare blocks: free, NaN, never to be read
    free = list(range(num_blocks))
    rng.shuffle(free)  # scattered blocks: a wrong table cannot go unnoticed
    tables = [[free.pop() for _ in range(n)] for n in needed]
    width = max(needed)
    block_tables = [t + [0] * (width - len(t)) for t in tables]
    num_entries = num_blocks * block_size
    k_cache = torch.randn(num_entries, num_kv_heads, head_dim, generator=generator, dtype=torch.float64)
    v_cache = torch.randn(num_entries, num_kv_heads, head_dim, generator=generator, dtype=torch.float64)
    owned = torch.zeros(num_entries, dtype=torch.bool)
    for table, n in zip(tables, context_lens, strict=True):
        owned[[table[p // block_size] * block_size + p % block_size for p in range(n)]] = True
    # A previous owner (a broken adapter's request) may leave NaN anywhere the chunks don't own, block tails included.
    k_cache[~owned], v_cache[~owned] = float("nan"), float("nan")
    # The flat batch: each chunk's rows after 0-2 rows of no chunk's (decode rows, attended elsewhere).
    query_starts, num_tokens = [], 0
    for n in query_lens:
        num_tokens += rng.randint(0, 2)
        query_starts.append(num_tokens)
        num_tokens += n
    num_tokens += rng.randint(0, 2)
    owned_rows = torch.zeros(num_tokens, dtype=torch.bool)
    for start, n in zip(query_starts, query_lens, strict=True):
        owned_rows[start : start + n] = True
    q = torch.randn(num_tokens, num_heads, head_dim, generator=generator, dtype=torch.float64)
    return PrefillCase(q, k_cache, v_cache, owned_rows, query_starts, query_lens, start_positions, block_tables)


def reference(case: PrefillCase, block_size: int, sliding_window: int | None) -> torch.Tensor:
    """fp64, one query at a time over exactly the keys it may see; rows of no chunk hold SENTINEL."""
    q, k_cache, v_cache = case.q.double(), case.k_cache.double(), case.v_cache.double()
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[1]
    out = torch.full(q.shape, SENTINEL, dtype=torch.float64)
    for c, table in enumerate(case.block_tables):
        for i in range(case.query_lens[c]):
            position = case.start_positions[c] + i
            first = 0 if sliding_window is None else max(position - sliding_window + 1, 0)
            entries = [table[p // block_size] * block_size + p % block_size for p in range(first, position + 1)]
            row = case.query_starts[c] + i
            for h in range(num_heads):
                kv = h // (num_heads // num_kv_heads)
                scores = k_cache[entries, kv] @ q[row, h] / q.shape[2] ** 0.5
                out[row, h] = torch.softmax(scores, 0) @ v_cache[entries, kv]
    return out


def device_tables(case: PrefillCase, block_q: int, dtype: torch.dtype, device: torch.device) -> dict:
    tile_chunks, tile_offsets = prefill_tiles(case.query_lens, block_q)
    names = ("block_tables", "query_starts", "query_lens", "start_positions")
    tables = {name: torch.tensor(getattr(case, name), dtype=dtype, device=device) for name in names}
    tables["tile_chunks"] = torch.tensor(tile_chunks, dtype=dtype, device=device)
    tables["tile_offsets"] = torch.tensor(tile_offsets, dtype=dtype, device=device)
    return tables


def ragged_chunks(rng: random.Random, block_size: int) -> tuple[list[int], list[int]]:
    """(query_lens, start_positions): one token; a query tile ±1; a cache block ±1; a long one; the rest continue
    earlier prefills (start > 0, some starting mid-block) or start at 0."""
    query_lens = [1, BLOCK_Q - 1, BLOCK_Q + 1, max(block_size - 1, 1), block_size + 1, rng.randint(2 * BLOCK_Q, 48)]
    start_positions = [rng.choice([0, rng.randint(1, 24)]) for _ in query_lens]
    start_positions[0] = rng.randint(1, 24)  # a one-token continuation: a decode-like chunk through the prefill path
    start_positions[2] = 0
    start_positions[5] = rng.randint(1, 24)  # a long continued prefill: its window skips whole key tiles
    return query_lens, start_positions


def assert_matches(got: torch.Tensor, case: PrefillCase, block_size: int, sliding_window: int | None,
                   dtype: torch.dtype, seed: int) -> None:
    expected = reference(case, block_size, sliding_window)
    got = got.cpu().double()
    assert (got[~case.owned_rows] == SENTINEL).all(), f"rows of no chunk were written (seed {seed})"
    torch.testing.assert_close(got[case.owned_rows], expected[case.owned_rows], atol=TOLERANCE[dtype],
                               rtol=TOLERANCE[dtype], msg=lambda m: f"seed {seed}: {m}")


@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(4, 4, 16), (8, 2, 24), (6, 1, 8)])
@pytest.mark.parametrize("sliding_window", [None, 5])
@pytest.mark.parametrize("dtype", list(TOLERANCE), ids=str)
def test_paged_prefill_matches_fp64(kernel_device, num_heads, num_kv_heads, head_dim, block_size, sliding_window,
                                    dtype):
    if dtype != torch.float32 and kernel_device.type != "cuda":
        pytest.skip("half precision runs on a GPU only (make gpu-check); the interpreter checks fp32")
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    query_lens, start_positions = ragged_chunks(rng, block_size)
    case = random_case(rng, num_heads, num_kv_heads, head_dim, block_size, query_lens, start_positions)
    case.q, case.k_cache, case.v_cache = case.q.to(dtype), case.k_cache.to(dtype), case.v_cache.to(dtype)
    out = torch.full(case.q.shape, SENTINEL, dtype=dtype, device=kernel_device)
    tables = device_tables(case, BLOCK_Q, torch.int32, kernel_device)
    paged_prefill_triton(case.q.to(kernel_device), case.k_cache.to(kernel_device), case.v_cache.to(kernel_device),
                         out, block_size=block_size, sliding_window=sliding_window, **tables)
    assert_matches(out, case, block_size, sliding_window, dtype, seed)


@pytest.mark.parametrize("sliding_window", [0, 7])  # the op's 0: no window
def test_custom_op_int64_tables_wider_tiles(kernel_device, sliding_window):
    """Through torch.ops.lora_server.paged_prefill, with int64 tables and 32-query tiles."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    block_size, block_q = 4, 32
    query_lens = [rng.randint(1, 70) for _ in range(3)]
    start_positions = [rng.randint(0, 20) for _ in range(3)]
    case = random_case(rng, 4, 2, 16, block_size, query_lens, start_positions)
    case.q, case.k_cache, case.v_cache = case.q.float(), case.k_cache.float(), case.v_cache.float()
    out = torch.full(case.q.shape, SENTINEL, dtype=torch.float32, device=kernel_device)
    tables = device_tables(case, block_q, torch.int64, kernel_device)
    torch.ops.lora_server.paged_prefill(
        case.q.to(kernel_device), case.k_cache.to(kernel_device), case.v_cache.to(kernel_device), out,
        tables["block_tables"], tables["query_starts"], tables["query_lens"], tables["start_positions"],
        tables["tile_chunks"], tables["tile_offsets"], block_size, sliding_window, block_q)
    assert_matches(out, case, block_size, sliding_window or None, torch.float32, seed)


def test_prefill_tiles_cover_every_query_once():
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    for block_q in (16, 32, 64):
        query_lens = [rng.choice([0, 1, block_q - 1, block_q, block_q + 1, rng.randint(1, 5 * block_q)])
                      for _ in range(rng.randint(0, 12))]
        tile_chunks, tile_offsets = prefill_tiles(query_lens, block_q)
        assert len(tile_chunks) == len(tile_offsets) == sum(-(-n // block_q) for n in query_lens), f"seed {seed}"
        covered = [(c, o + j) for c, o in zip(tile_chunks, tile_offsets, strict=True) for j in range(block_q)
                   if o + j < query_lens[c]]
        expected = [(c, i) for c, n in enumerate(query_lens) for i in range(n)]
        assert covered == expected, f"seed {seed}"  # in order, each query once, none past its chunk's end
        assert all(o % block_q == 0 and o < query_lens[c] for c, o in zip(tile_chunks, tile_offsets, strict=True))


def test_custom_op_schema_fake_and_fullgraph_compile(kernel_device):
    """opcheck: the declared mutation of out, the fake kernel, autograd registration. Then a forward that calls the op
    compiles as one graph (graph breaks fail) and writes what eager writes."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    block_size = 4
    case = random_case(rng, 4, 2, 16, block_size, [3, BLOCK_Q + 2], [0, rng.randint(1, 9)])
    q, k_cache, v_cache = (x.float().to(kernel_device) for x in (case.q, case.k_cache, case.v_cache))
    tables = device_tables(case, BLOCK_Q, torch.int64, kernel_device)
    order = ("block_tables", "query_starts", "query_lens", "start_positions", "tile_chunks", "tile_offsets")
    args = (q, k_cache, v_cache, *(tables[name] for name in order))

    def forward(q, k_cache, v_cache, *tables):
        out = torch.full(q.shape, SENTINEL, dtype=q.dtype, device=q.device)
        torch.ops.lora_server.paged_prefill(q, k_cache, v_cache, out, *tables, block_size, 3, BLOCK_Q)
        return out * 2

    out = torch.full(q.shape, SENTINEL, dtype=q.dtype, device=q.device)
    torch.library.opcheck(torch.ops.lora_server.paged_prefill.default,
                          (q, k_cache, v_cache, out, *args[3:], block_size, 3, BLOCK_Q))
    # aot_eager: dynamo + the fake kernel + functionalization of the mutation, without inductor's compile time.
    compiled = torch.compile(forward, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(*args), forward(*args), atol=0, rtol=0, msg=lambda m: f"seed {seed}: {m}")
    assert_matches(forward(*args) / 2, case, block_size, 3, torch.float32, seed)
