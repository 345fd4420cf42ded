"""The step a CUDA graph captures (server.model.cuda_graphs) equals the plain decode step: static buffers padded to a
bucket, every token its own LoRA run read from device memory, padding rows confined to the scratch block. On CPU the
step runs uncaptured (capture=False), which is the same Python and the same kernels; on CUDA the captured graph is
replayed (the `cuda` test below, run by make gpu-check).
"""

import random
import sys

import pytest
import torch

from lora_server.kernels.lora_batch import NO_SLOT, LoraBatch
from lora_server.model import bench_graphs
from lora_server.model.cuda_graphs import DecodeGraphs, graph_buckets
from lora_server.model.paged_cache import PagedKVCache, PagedSequenceChunk
from tests.engine.residency_helpers import TINY, random_adapter
from tests.model.test_compiled_forward import BLOCK_SIZE, NUM_BLOCKS, loaded_model, prefill

MAX_ROWS = 12  # buckets 1, 2, 4, 8, 12
MAX_BLOCKS = 6
MAX_LORA_RANK = 16


def test_buckets_cover_every_batch_size_with_little_padding():
    assert graph_buckets(1) == (1,)
    assert graph_buckets(12) == (1, 2, 4, 8, 12)
    assert graph_buckets(64) == (1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64)
    for max_rows in (1, 5, 8, 33, 256):
        buckets = graph_buckets(max_rows)
        for n in range(1, max_rows + 1):
            bucket = next(b for b in buckets if b >= n)
            assert bucket - n < max(8, n), (max_rows, n, bucket)


def test_capture_is_refused_off_cuda():
    cache = PagedKVCache(TINY.num_layers, 8, BLOCK_SIZE, TINY.num_kv_heads, TINY.head_dim, torch.float32, "cpu")
    with pytest.raises(ValueError, match="CUDA graphs need a CUDA device"):
        DecodeGraphs(loaded_model("torch"), cache, 4, 4, 8, capture=True)


def run_steps(lora_backend: str, device: torch.device, capture: bool, seed: int) -> None:
    """Six decode steps of shifting mixes, each through DecodeGraphs and through the plain forward from the same cache
    state: outputs equal, the same K/V written, and nothing else of the cache touched but the scratch block."""
    rng = random.Random(seed)
    model = loaded_model(lora_backend, device)
    attention_backend = "triton" if lora_backend == "triton" else "torch"
    cache = PagedKVCache(TINY.num_layers, NUM_BLOCKS, BLOCK_SIZE, TINY.num_kv_heads, TINY.head_dim, torch.float32,
                         device, attention_backend=attention_backend)
    graphs = DecodeGraphs(model, cache, MAX_ROWS, MAX_BLOCKS, MAX_LORA_RANK, capture, num_lora_batches=(0, 1, 2))
    free = list(range(NUM_BLOCKS))
    rng.shuffle(free)
    num_seqs = 10
    lengths = [rng.randint(1, 13) for _ in range(num_seqs)]
    tables = [[free.pop() for _ in range(MAX_BLOCKS)] for _ in range(num_seqs)]
    prompts = [[rng.randrange(TINY.vocab_size) for _ in range(n)] for n in lengths]
    prefill(model, cache, prompts, [rng.choice([NO_SLOT, 0, 1, 2]) for _ in range(num_seqs)], tables)
    scratch = slice(cache.scratch_block * BLOCK_SIZE, (cache.scratch_block + 1) * BLOCK_SIZE)

    # (sequences in the step, how its LoRA is given): bucket sizes 4, 8, 1, 12 with padding 1, 3, 0, 2; a step of
    # base-only rows; an adapter loaded between steps; two LoRA batches as while an adapter is merged.
    plan = [(3, "one"), (5, "one"), (1, "one"), (10, "none"), (10, "one"), (7, "two")]
    for step, (num_active, lora_kind) in enumerate(plan):
        if step == 4:  # a new adapter in slot 3 after the buffers and tables were first used
            adapter = random_adapter(MAX_LORA_RANK, seed=seed % 1000)
            model.load_lora_slot(3, 14, adapter.modules)  # rows 14-29, after the three loaded ones
        active = sorted(rng.sample(range(num_seqs), num_active))
        own = [NO_SLOT] * num_active if lora_kind == "none" else [rng.choice([NO_SLOT, 0, 1, 2, 3][: 4 + (step >= 4)])
                                                                   for _ in active]
        slot_lists = [] if lora_kind == "none" else [own]
        if lora_kind == "two":  # any second set of terms adds up, as a merged adapter's compensation does
            slot_lists.append([rng.choice([NO_SLOT, 2]) for _ in active])
        ids = [rng.randrange(TINY.vocab_size) for _ in active]
        chunks = [PagedSequenceChunk(n, 1, lengths[i], tables[i]) for n, i in enumerate(active)]

        k_before, v_before = cache.k_cache.clone(), cache.v_cache.clone()
        cache.set_batch(chunks)
        batches = tuple(LoraBatch.build(slots, device) for slots in slot_lists)
        eager = model(torch.tensor(ids, device=device), torch.tensor([lengths[i] for i in active], device=device),
                      cache, batches or None)
        k_eager, v_eager = cache.k_cache.clone(), cache.v_cache.clone()
        cache.k_cache.copy_(k_before)
        cache.v_cache.copy_(v_before)

        assert graphs.can_run(chunks, len(slot_lists))
        got = graphs.run(ids, chunks, slot_lists)
        where = f"step {step}, seed {seed}"
        # Tolerances of fp32 summation order, relative to the largest value: the graph's LoRA term is the per-token
        # gather, the plain one the runs (K/V entries reach ~60 in this tiny random model, so 1e-5 of that is 6e-4).
        # A row read or written in the wrong place is off by O(1) or more.
        torch.testing.assert_close(got, eager, rtol=1e-4, atol=1e-4, msg=where)
        for name, cache_now, expected in (("K", cache.k_cache, k_eager), ("V", cache.v_cache, v_eager)):
            outside = torch.ones(cache_now.shape[1], dtype=torch.bool)
            outside[scratch] = False
            scale = float(expected.abs().max())
            torch.testing.assert_close(cache_now[:, outside], expected[:, outside], rtol=1e-4, atol=2e-5 * scale,
                                       msg=f"{name} writes, {where}")
        for i in active:
            lengths[i] += 1


# triton: both Triton paths (LoRA and paged decode) under the interpreter, about 14 s.
@pytest.mark.parametrize("lora_backend", ["torch", pytest.param("triton", marks=pytest.mark.slow)])
def test_the_captured_step_equals_the_plain_one(lora_backend):
    run_steps(lora_backend, torch.device("cpu"), capture=False, seed=random.randrange(1 << 30))


def test_a_step_the_graphs_cannot_take_says_so():
    cache = PagedKVCache(TINY.num_layers, 8, BLOCK_SIZE, TINY.num_kv_heads, TINY.head_dim, torch.float32, "cpu")
    graphs = DecodeGraphs(loaded_model("torch"), cache, 4, 4, 8, capture=False)
    decode = [PagedSequenceChunk(i, 1, 3, [i]) for i in range(4)]
    assert graphs.can_run(decode, 1) and graphs.can_run(decode, 0)
    assert not graphs.can_run([*decode, PagedSequenceChunk(4, 1, 3, [4])], 1)  # more rows than the largest bucket
    assert not graphs.can_run([PagedSequenceChunk(0, 2, 0, [0])], 1)  # a prefill chunk
    assert not graphs.can_run(decode, 2)  # no graph for two LoRA batches was asked for


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU (make gpu-check)")
@pytest.mark.parametrize("lora_backend", ["torch", "triton"])
def test_graph_replay_equals_eager_on_cuda(lora_backend):
    run_steps(lora_backend, torch.device("cuda"), capture=True, seed=random.randrange(1 << 30))


def test_the_graph_benchmark_runs_its_table(monkeypatch, capsys):
    """`python -m lora_server.model.bench_graphs --quick` on CPU: the same code as on the GPU, uncaptured."""
    monkeypatch.setattr(sys, "argv", ["bench_graphs", "--device", "cpu", "--quick"])
    bench_graphs.main()
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [row.split("|")[1].strip() for row in rows] == ["1", "4"], rows
    assert all(float(row.split("|")[4].strip().rstrip("×")) > 0 for row in rows)
