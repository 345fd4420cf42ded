"""The decode forward is one graph: a mixed LoRA batch (several adapters of different ranks, base-only rows) over a
paged KV cache runs under `torch.compile(fullgraph=True)` (a graph break raises), equals the eager forward, and a
later step with another mix of adapters and lengths reuses the compiled graph (server.model.compiled says why it can).
"aot_eager" traces and functionalises the graph (what inductor and CUDA graphs consume) without generating code, so
the test checks the graph, not a C++ compiler's speed.
"""

import random

import pytest
import torch
import torch._dynamo
import torch._dynamo.testing

from lora_server.kernels.lora_batch import NO_SLOT, LoraBatch
from lora_server.model.compiled import compile_decode_forward
from lora_server.model.paged_cache import PagedKVCache, PagedSequenceChunk
from tests.engine.residency_helpers import TINY, random_adapter, tiny_model

BLOCK_SIZE = 4
NUM_BLOCKS = 64


def loaded_model(lora_backend: str, device: torch.device | str = "cpu"):
    """The tiny model with three adapters in slots 0-2: ranks 2, 8, and 4 with v_proj at rank 1 and no down_proj
    (rows 0-13 of a 32-row pool; slot 3 is free)."""
    model = tiny_model(seed=1).to(device)
    model.allocate_lora_pool(total_rows=32, num_slots=4)
    model.set_lora_backend(lora_backend)
    row = 0
    for slot, (rank, module_ranks) in enumerate([(2, None), (8, None), (4, {"v_proj": 1})]):
        adapter = random_adapter(rank, seed=10 + slot, module_ranks=module_ranks)
        skipped = "down_proj" if slot == 2 else None
        model.load_lora_slot(slot, row, {key: m for key, m in adapter.modules.items() if key[1] != skipped})
        row += rank
    return model


def prefill(model, cache: PagedKVCache, prompts: list[list[int]], slots: list[int], tables: list[list[int]]):
    chunks, ids, positions, token_slots = [], [], [], []
    for prompt, slot, table in zip(prompts, slots, tables, strict=True):
        chunks.append(PagedSequenceChunk(len(ids), len(prompt), 0, table))
        ids += prompt
        positions += range(len(prompt))
        token_slots += [slot] * len(prompt)
    cache.set_batch(chunks)
    model(torch.tensor(ids), torch.tensor(positions), cache, LoraBatch.build(token_slots))


def decode_inputs(cache: PagedKVCache, rng: random.Random, lengths: list[int], slots: list[int],
                  tables: list[list[int]]):
    """One new token per sequence, ordered by slot as the engine orders them: (ids, positions, LoRA batch)."""
    order = sorted(range(len(lengths)), key=lambda i: slots[i])
    cache.set_batch([PagedSequenceChunk(n, 1, lengths[i], tables[i]) for n, i in enumerate(order)])
    ids = torch.tensor([rng.randrange(TINY.vocab_size) for _ in order])
    positions = torch.tensor([lengths[i] for i in order])
    return ids, positions, LoraBatch.build([slots[i] for i in order])


@pytest.mark.parametrize("lora_backend", ["torch", "triton"])  # triton: under the interpreter without a GPU
def test_decode_forward_is_one_graph_and_matches_eager(lora_backend):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    model = loaded_model(lora_backend)
    attention_backend = "triton" if lora_backend == "triton" else "torch"
    cache = PagedKVCache(TINY.num_layers, NUM_BLOCKS, BLOCK_SIZE, TINY.num_kv_heads, TINY.head_dim, torch.float32,
                         "cpu", attention_backend=attention_backend)
    free = list(range(NUM_BLOCKS))
    rng.shuffle(free)
    slots = [0, NO_SLOT, 1, 2, 1, 0, NO_SLOT, 2]
    lengths = [rng.randint(1, 17) for _ in slots]
    tables = [[free.pop() for _ in range(6)] for _ in slots]  # room for the prompt and the decodes
    prefill(model, cache, [[rng.randrange(TINY.vocab_size) for _ in range(n)] for n in lengths], slots, tables)

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = compile_decode_forward(model, backend=counter)
    for step in range(6 if lora_backend == "torch" else 3):  # the interpreter is slow: fewer steps
        # Each step another mix: adapters of sequences change, one sequence sits out, lengths grow.
        active = [i for i in range(len(slots)) if i != step % len(slots)]
        step_slots = [slots[i] if step == 0 else rng.choice([NO_SLOT, 0, 1, 2]) for i in active]
        # At least two runs: the compiler specialises sizes 0 and 1 (a step with one adapter compiles once more).
        step_slots[:2] = [0, 1] if step else step_slots[:2]
        ids, positions, batch = decode_inputs(cache, rng, [lengths[i] for i in active], step_slots,
                                              [tables[i] for i in active])
        k_before, v_before = cache.k_cache.clone(), cache.v_cache.clone()
        eager = model(ids, positions, cache, batch)
        k_eager, v_eager = cache.k_cache.clone(), cache.v_cache.clone()
        cache.k_cache.copy_(k_before)
        cache.v_cache.copy_(v_before)
        got = compiled(ids, positions, cache, batch)
        if step == 0:
            first_compiles = counter.frame_count
        torch.testing.assert_close(got, eager, rtol=1e-5, atol=1e-5, msg=f"step {step}, seed {seed}")
        torch.testing.assert_close(cache.k_cache, k_eager, msg=f"the compiled step wrote other K ({seed})")
        torch.testing.assert_close(cache.v_cache, v_eager, msg=f"the compiled step wrote other V ({seed})")
        for i in active:
            lengths[i] += 1
    # Each step has other runs and other context lengths: dynamic shapes, not a recompile each.
    assert counter.frame_count == first_compiles, f"recompiled after the first step (seed {seed})"
