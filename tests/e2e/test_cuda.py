"""On a CUDA device (`make gpu-check`; skipped without one): the engine with its Triton LoRA kernels, Triton paged
decode and prefill, with and without CUDA graphs, generates the same greedy tokens as the CPU engine (torch paths,
checked against transformers + PEFT elsewhere) on a random Llama with mixed adapters, base-only rows and heterogeneous
ranks in every batch."""

import random
from pathlib import Path

import pytest
import torch

from lora_server.adapters_store import LORA_TARGET_MODULES, AdapterStore
from lora_server.adapters_store.bench import make_upload
from lora_server.engine.bench import write_checkpoint
from lora_server.engine.build import EngineOptions, base_description, open_engine
from lora_server.engine.request import EngineRequest
from lora_server.engine.sampler import SamplingParams

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (make gpu-check)")]


def greedy_tokens(model_dir: Path, store: AdapterStore, device: str, requests: list[EngineRequest],
                  cuda_graphs: str = "off") -> tuple[list, int]:
    """Each request's greedy tokens, and how many steps replayed a CUDA graph."""
    options = EngineOptions(device=device, dtype="float32", max_num_seqs=16, max_adapters_on_device=8,
                            max_lora_rank=32, merge_policy="off", cuda_graphs=cuda_graphs)
    engine = open_engine(model_dir, store, options)
    replays = []
    graphs = engine.runner.decode_graphs
    if graphs is not None:
        run = graphs.run
        graphs.run = lambda *args: replays.append(1) or run(*args)
    try:
        return [completion.token_ids for completion in engine.generate(requests)], len(replays)
    finally:
        engine.close()


def test_cuda_engine_matches_cpu_engine(tmp_path):
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 products as the CPU computes them: ties stay ties
    model_dir = tmp_path / "model"
    write_checkpoint(model_dir, hidden=256, layers=2, vocab=512, max_len=256)
    store = AdapterStore.open(tmp_path / "store", base_description(model_dir))
    base = base_description(model_dir)
    for k, rank in enumerate((8, 16, 32, 4)):
        store.put("default", f"a{k}", make_upload(base, rank, LORA_TARGET_MODULES, seed=k))
    rng = random.Random(0)
    adapters = [None, "a0", "a1", "a2", "a3"]
    requests = [EngineRequest([rng.randrange(512) for _ in range(rng.randint(3, 40))],
                              SamplingParams(max_new_tokens=12), adapter_id=adapters[i % len(adapters)],
                              request_id=str(i)) for i in range(20)]
    cpu, _ = greedy_tokens(model_dir, store, "cpu", requests)
    eager, no_replays = greedy_tokens(model_dir, store, "cuda", requests, cuda_graphs="off")
    graphed, replays = greedy_tokens(model_dir, store, "cuda", requests, cuda_graphs="on")
    assert eager == cpu
    assert graphed == cpu
    assert no_replays == 0 and replays >= 10, (no_replays, replays)  # 20 requests of 12 tokens, 16 at once
