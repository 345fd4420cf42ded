"""End to end: adapters brought in by Residency give the same forward pass as the offline path's fixed slots."""

import copy

import pytest
import torch

from lora_server.engine.adapters.keys import AdapterKey, AdapterLoadError
from lora_server.engine.adapters.residency import Residency, ResidencyConfig
from lora_server.kernels.lora_batch import NO_SLOT, LoraBatch
from lora_server.model.attention import ContiguousKVCache, SequenceChunk
from lora_server.model.llama import LlamaModel
from tests.engine.offline_reference import load_adapters_into_slots
from tests.engine.residency_helpers import TINY, FakeSource, page_budget, random_adapter, tiny_model


def prefill(model: LlamaModel, prompts: list[list[int]], slots: list[int]) -> torch.Tensor:
    """Hidden states [num_tokens, hidden] of one flat prefill of every prompt, each with its own slot."""
    cache = ContiguousKVCache(TINY.num_layers, len(prompts), 16, TINY.num_kv_heads, TINY.head_dim, torch.float32,
                              "cpu")
    chunks, ids, positions, token_slots, start = [], [], [], [], 0
    for row, (prompt, slot) in enumerate(zip(prompts, slots, strict=True)):
        chunks.append(SequenceChunk(cache_row=row, token_start=start, num_tokens=len(prompt), start_position=0))
        ids += prompt
        positions += range(len(prompt))
        token_slots += [slot] * len(prompt)
        start += len(prompt)
    cache.set_batch(tuple(chunks))
    return model(torch.tensor(ids), torch.tensor(positions), cache, LoraBatch.build(token_slots))


def test_residency_slots_match_the_offline_slots():
    model = tiny_model()
    reference = copy.deepcopy(model)
    mixed = random_adapter(8, seed=3, module_ranks={"q_proj": 4, "down_proj": 16})
    adapters = {AdapterKey("t", "x", 1): random_adapter(4, seed=1), AdapterKey("t", "y", 1): random_adapter(16, seed=2),
                AdapterKey("t", "z", 1): mixed}
    generator = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, TINY.vocab_size, (n,), generator=generator).tolist() for n in (5, 3, 7, 4)]

    offline_slots = load_adapters_into_slots(reference, {str(k): a for k, a in adapters.items()})
    expected = prefill(reference, prompts, [offline_slots[str(k)] for k in adapters] + [NO_SLOT])

    config = ResidencyConfig(device_budget_bytes=page_budget(model, 8), host_budget_bytes=0, num_slots=4)
    with Residency(model, FakeSource(adapters), config) as residency:
        missing = residency.acquire(AdapterKey("t", "w", 1))  # a load that fails must not disturb the others
        slots = [residency.acquire(k).result(timeout=10) for k in adapters]  # slots and rows differ from offline's
        with pytest.raises(AdapterLoadError, match="t/w@1"):
            missing.result(timeout=10)
        ours = prefill(model, prompts, slots + [NO_SLOT])
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
        base = prefill(model, prompts, [NO_SLOT] * 4)
        assert not torch.allclose(ours[:5], base[:5], atol=1e-3)  # the adapters really change the output
        torch.testing.assert_close(ours[-4:], base[-4:], rtol=0, atol=0)  # the base request is untouched
        for k in adapters:
            residency.release(k)
        residency.release(AdapterKey("t", "w", 1))
