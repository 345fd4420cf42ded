"""The paged KV cache against transformers: chunked prefills and decodes of several sequences share forward passes,
with their blocks scattered over the cache in random order; every position's logits match one full prefill. Both
attention backends: torch, and Triton (one launch per layer for the prefill chunks, one for the decodes)."""

import random

import pytest
import torch

from lora_server.model.loader import load_model
from lora_server.model.paged_cache import PagedKVCache, PagedSequenceChunk
from tests.reference import assert_close_relative, hf_logits, save_random_hf_model

BLOCK_SIZE = 4


@pytest.mark.parametrize("attention_backend", ["torch", "triton"])  # triton: under the interpreter without a GPU
def test_chunked_prefill_and_decode_through_scattered_blocks(tmp_path, attention_backend):
    hf_model = save_random_hf_model(tmp_path, "MistralForCausalLM", sliding_window=6, seed=4)
    model = load_model(tmp_path, torch.device("cpu"), torch.float32)
    c = model.config
    generator = torch.Generator().manual_seed(5)
    sequences = [torch.randint(0, 97, (n,), generator=generator).tolist() for n in (25, 19, 20)]
    free_blocks = list(range(40))
    random.Random(6).shuffle(free_blocks)  # blocks out of order, so a wrong block table cannot go unnoticed
    block_tables: list[list[int]] = [[] for _ in sequences]
    cache = PagedKVCache(c.num_layers, 40, BLOCK_SIZE, c.num_kv_heads, c.head_dim, torch.float32, "cpu",
                         c.sliding_window, attention_backend=attention_backend)
    computed = [0, 0, 0]  # positions of each sequence already in the cache
    logits_by_seq: list[list[torch.Tensor]] = [[] for _ in sequences]
    # Per step: how many new tokens each sequence feeds (0 = sits out): chunked prefills beside decodes. The first
    # step's chunks are alike (the torch backend pads them into one SDPA), the next ones are not (one SDPA each).
    plan = [(4, 4, 4), (3, 7, 0), (5, 1, 0), (7, 1, 10)] + [(1, 1, 1)] * 6
    forms = []

    for step in plan:
        chunks, ids, positions, start = [], [], [], 0
        for i, n in enumerate(step):
            if n == 0:
                continue
            end = computed[i] + n
            while len(block_tables[i]) * BLOCK_SIZE < end:
                block_tables[i].append(free_blocks.pop())
            chunks.append(PagedSequenceChunk(start, n, computed[i], list(block_tables[i])))
            ids += sequences[i][computed[i]:end]
            positions += range(computed[i], end)
            start += n
        cache.set_batch(tuple(chunks))
        tables = cache.tables
        forms.append("launch" if tables.prefill_launch else "padded" if tables.padded_prefill else
                     "loop" if tables.prefill else "decode")
        logits = model.compute_logits(model(torch.tensor(ids), torch.tensor(positions), cache))
        active = [i for i, n in enumerate(step) if n]
        for i, chunk_logits in zip(active, logits.split([step[i] for i in active]), strict=True):
            logits_by_seq[i] += list(chunk_logits)
            computed[i] += step[i]

    assert computed == [len(s) for s in sequences]
    prefill_forms = ["launch"] * 4 if attention_backend == "triton" else ["padded", "loop", "loop", "loop"]
    assert forms == prefill_forms + ["decode"] * 6
    for seq, rows in zip(sequences, logits_by_seq, strict=True):
        assert_close_relative(torch.stack(rows), hf_logits(hf_model, seq))
