"""The torch backend's two prefill forms, the padded SDPA (alike chunks) and the loop (one SDPA per chunk), against
an fp64 loop over each query's own visible keys: continued prefills (start > 0), GQA, a sliding window, decode rows
between the chunks, and NaN in every cache entry no chunk owns (a padded key or query must never read one)."""

import random

import pytest
import torch

from lora_server.model import paged_cache
from lora_server.model.paged_cache import PagedKVCache, PagedSequenceChunk

BLOCK_SIZE = 4
NUM_HEADS, NUM_KV_HEADS, HEAD_DIM = 8, 2, 16


def reference(q, k_cache, v_cache, chunks, window):
    out = {}
    for chunk in chunks:
        table = chunk.block_table
        for i in range(chunk.num_tokens):
            position = chunk.start_position + i
            first = 0 if window is None else max(position - window + 1, 0)
            entries = [table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(first, position + 1)]
            row = chunk.token_start + i
            for h in range(NUM_HEADS):
                kv = h // (NUM_HEADS // NUM_KV_HEADS)
                scores = k_cache[entries, kv].double() @ q[row, h].double() / HEAD_DIM ** 0.5
                out[row, h] = torch.softmax(scores, 0) @ v_cache[entries, kv].double()
    return out


@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("form", ["padded", "loop"])
def test_prefill_forms_match_fp64(form, window, monkeypatch):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    if form == "loop":
        monkeypatch.setattr(paged_cache, "PADDED_PREFILL_MAX_WORK", 0.0)
    num_blocks = 48
    free = list(range(num_blocks))
    rng.shuffle(free)
    # Three continued prefills of 6, 6 and 5 tokens from position 9 (alike: padded, the last chunk padded by a row
    # past the batch's end), a decode row between two of them.
    start = 9
    layout = [("chunk", 6), ("decode", 1), ("chunk", 6), ("chunk", 5)]
    chunks, decode, row = [], [], 0
    for kind, num_tokens in layout:
        table = [free.pop() for _ in range(-(-(start + num_tokens) // BLOCK_SIZE))]
        if kind == "chunk":
            chunks.append(PagedSequenceChunk(row, num_tokens, start, table))
            row += num_tokens
        else:
            decode.append(PagedSequenceChunk(row, 1, 3, table))
            row += 1
    cache = PagedKVCache(1, num_blocks, BLOCK_SIZE, NUM_KV_HEADS, HEAD_DIM, torch.float32, "cpu", window,
                         attention_backend="torch")
    owned = torch.zeros(cache.k_cache.shape[1], dtype=torch.bool)
    for chunk in [*chunks, *decode]:
        owned[[chunk.block_table[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE
               for p in range(chunk.context_len)]] = True
    cache.k_cache[0] = torch.randn(cache.k_cache.shape[1:], generator=generator)
    cache.v_cache[0] = torch.randn(cache.v_cache.shape[1:], generator=generator)
    cache.k_cache[0, ~owned] = float("nan")
    cache.v_cache[0, ~owned] = float("nan")
    ordered = sorted([*chunks, *decode], key=lambda c: c.token_start)
    cache.set_batch(ordered)
    assert (cache.tables.padded_prefill is not None) == (form == "padded")
    assert bool(cache.tables.prefill) == (form == "loop")

    q = torch.randn(row, NUM_HEADS, HEAD_DIM, generator=generator)
    new_entries = cache.tables.slot_mapping
    k_new, v_new = cache.k_cache[0, new_entries].clone(), cache.v_cache[0, new_entries].clone()  # rewritten as is
    got = cache.attend(0, q, k_new, v_new)
    expected = reference(q, cache.k_cache[0], cache.v_cache[0], chunks, window)
    for (r, h), value in expected.items():
        torch.testing.assert_close(got[r, h].double(), value, atol=1e-5, rtol=1e-5, msg=f"row {r}, seed {seed}")
    assert torch.isfinite(got).all(), f"a NaN reached an output (seed {seed})"
