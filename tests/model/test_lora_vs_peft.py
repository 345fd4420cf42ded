"""Our per-token LoRA against PEFT: random adapters (A and B both non-zero) made by PEFT at test time, several of
them mixed in one batch with base-only sequences; each sequence's logits match PEFT's for its own adapter."""

import pytest
import torch
import transformers

from lora_server.adapters_store import load_peft_adapter
from lora_server.engine.build import describe_base_model
from lora_server.engine.sampler import SamplingParams
from lora_server.kernels.lora_batch import NO_SLOT, LoraBatch
from lora_server.model.attention import ContiguousKVCache, SequenceChunk
from lora_server.model.loader import load_model
from tests.engine.offline_reference import GenerationRequest, generate, load_adapters_into_slots
from tests.reference import add_random_lora, assert_close_relative, hf_logits, save_random_hf_model

ADAPTERS = {
    "plain": dict(r=8, lora_alpha=16),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "patterned": dict(r=8, lora_alpha=8, rank_pattern={"o_proj": 2, "mlp.up_proj": 16},
                      alpha_pattern={"gate_proj": 32}),
    "rank64": dict(r=64, lora_alpha=16, target_modules=["k_proj", "up_proj"]),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random Llama, PEFT adapters on it, and PEFT's logits for a few sequences under each adapter."""
    root = tmp_path_factory.mktemp("lora")
    save_random_hf_model(root / "base", "LlamaForCausalLM", tie_word_embeddings=False, seed=11)
    generator = torch.Generator().manual_seed(12)
    sequences = [torch.randint(0, 97, (n,), generator=generator).tolist() for n in (13, 6, 21)]
    reference = {None: [hf_logits(transformers.LlamaForCausalLM.from_pretrained(root / "base"), s) for s in sequences]}
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        hf_model = transformers.LlamaForCausalLM.from_pretrained(root / "base")
        peft_model = add_random_lora(hf_model, root / name, seed=100 + seed, **kwargs)
        reference[name] = [hf_logits(peft_model, s) for s in sequences]
    return root, sequences, reference


@pytest.fixture(scope="module")
def loaded(checkpoint):
    root, _, _ = checkpoint
    model = load_model(root / "base", torch.device("cpu"), torch.float32)
    base = describe_base_model(model.config)
    adapters = {name: load_peft_adapter(root / name, base) for name in ADAPTERS}
    return model, adapters


def test_mixed_batch_matches_peft(checkpoint, loaded):
    _, sequences, reference = checkpoint
    model, adapters = loaded
    slots = load_adapters_into_slots(model, adapters)
    # Every (adapter or base, sequence) pair in one flat batch, adapters interleaved.
    jobs = [(name, i) for i in range(len(sequences)) for name in (None, *ADAPTERS)]
    chunks, ids, positions, token_slots, start = [], [], [], [], 0
    for row, (name, i) in enumerate(jobs):
        seq = sequences[i]
        chunks.append(SequenceChunk(row, start, len(seq), 0))
        ids += seq
        positions += range(len(seq))
        token_slots += [NO_SLOT if name is None else slots[name]] * len(seq)
        start += len(seq)
    c = model.config
    cache = ContiguousKVCache(c.num_layers, len(jobs), 32, c.num_kv_heads, c.head_dim, torch.float32, "cpu")
    cache.set_batch(tuple(chunks))
    hidden = model(torch.tensor(ids), torch.tensor(positions), cache, LoraBatch.build(token_slots))
    logits = model.compute_logits(hidden).split([c.num_tokens for c in chunks])
    for (name, i), ours in zip(jobs, logits, strict=True):
        assert_close_relative(ours, reference[name][i])
        if name is not None:  # the adapter made a visible difference, so the comparison means something
            assert (reference[name][i] - reference[None][i]).abs().max() > 1e-2


def test_scales_follow_peft_rules(loaded):
    _, adapters = loaded
    rslora = adapters["rslora"].modules[(0, "q_proj")]
    assert rslora.scale == pytest.approx(8 / 4**0.5)
    patterned = adapters["patterned"].modules
    assert patterned[(1, "o_proj")].rank == 2 and patterned[(1, "o_proj")].scale == pytest.approx(8 / 2)
    assert patterned[(0, "up_proj")].rank == 16 and patterned[(0, "gate_proj")].scale == pytest.approx(32 / 8)


def test_mixed_batch_generation_equals_each_request_alone(checkpoint, loaded):
    _, sequences, _ = checkpoint
    model, adapters = loaded
    requests = [GenerationRequest(seq, name, SamplingParams(max_new_tokens=8))
                for seq in sequences for name in (None, *ADAPTERS)]
    together = generate(model, requests, adapters, eos_token_ids=())
    for request, result in zip(requests, together, strict=True):
        alone = generate(model, [request], adapters, eos_token_ids=())[0]
        assert alone.token_ids == result.token_ids and len(alone.token_ids) == 8
    # Different adapters really do generate differently here.
    assert len({tuple(r.token_ids) for r in together[: 1 + len(ADAPTERS)]}) > 1
