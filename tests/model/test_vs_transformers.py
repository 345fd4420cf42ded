"""Our decoder against transformers on random tiny checkpoints: logits within 1e-4 relative in fp32."""

import pytest
import torch

from lora_server.model.attention import ContiguousKVCache, SequenceChunk
from lora_server.model.config import ModelConfigError
from lora_server.model.loader import load_model
from tests.reference import assert_close_relative, hf_logits, save_random_hf_model

CASES = {
    "llama": ("LlamaForCausalLM", {}),
    "llama_untied_bias": ("LlamaForCausalLM", {"tie_word_embeddings": False, "attention_bias": True,
                                               "mlp_bias": True, "head_dim": 24}),
    "llama3_rope": ("LlamaForCausalLM", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
                                                             "factor": 8.0, "low_freq_factor": 1.0,
                                                             "high_freq_factor": 4.0,
                                                             "original_max_position_embeddings": 16}}),
    "linear_rope": ("LlamaForCausalLM", {"rope_parameters": {"rope_type": "linear", "rope_theta": 10000.0,
                                                             "factor": 4.0}}),
    "mistral_window": ("MistralForCausalLM", {"sliding_window": 7}),
    "qwen2": ("Qwen2ForCausalLM", {"tie_word_embeddings": True}),
}


def our_logits(model, sequences: list[list[int]]) -> list[torch.Tensor]:
    """Run all sequences together in one flat prefill batch; return each one's logits [len, vocab]."""
    config = model.config
    cache = ContiguousKVCache(config.num_layers, len(sequences), max(map(len, sequences)), config.num_kv_heads,
                              config.head_dim, torch.float32, "cpu", config.sliding_window)
    chunks, start = [], 0
    for row, seq in enumerate(sequences):
        chunks.append(SequenceChunk(cache_row=row, token_start=start, num_tokens=len(seq), start_position=0))
        start += len(seq)
    cache.set_batch(tuple(chunks))
    ids = torch.tensor([t for seq in sequences for t in seq])
    positions = torch.tensor([p for seq in sequences for p in range(len(seq))])
    logits = model.compute_logits(model(ids, positions, cache))
    return list(logits.split([len(s) for s in sequences]))


@pytest.mark.parametrize("case", CASES)
def test_logits_match_transformers(case, tmp_path):
    architecture, overrides = CASES[case]
    hf_model = save_random_hf_model(tmp_path, architecture, seed=len(case), **overrides)
    model = load_model(tmp_path, torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(hash(case) % 1000)
    # Lengths beyond the Mistral window (7) and the llama3 original context (16) exercise both.
    sequences = [torch.randint(0, 97, (n,), generator=generator).tolist() for n in (23, 5, 40)]
    for ours, seq in zip(our_logits(model, sequences), sequences, strict=True):
        assert_close_relative(ours, hf_logits(hf_model, seq))


def test_batched_decode_matches_prefill(tmp_path):
    """Prefill three prompts of different lengths together, then decode them token by token in one batch: each
    sequence's logits equal one full prefill of it (Mistral window 5, so decode also crosses the window)."""
    hf_model = save_random_hf_model(tmp_path, "MistralForCausalLM", sliding_window=5)
    model = load_model(tmp_path, torch.device("cpu"), torch.float32)
    generator = torch.Generator().manual_seed(3)
    prompt_lens, num_decode = (4, 1, 7), 9
    sequences = [torch.randint(0, 97, (n + num_decode,), generator=generator).tolist() for n in prompt_lens]
    c = model.config
    cache = ContiguousKVCache(c.num_layers, 3, max(map(len, sequences)), c.num_kv_heads, c.head_dim, torch.float32,
                              "cpu", c.sliding_window)
    chunks = [SequenceChunk(row, sum(prompt_lens[:row]), n, 0) for row, n in enumerate(prompt_lens)]
    cache.set_batch(tuple(chunks))
    ids = torch.tensor([t for seq, n in zip(sequences, prompt_lens, strict=True) for t in seq[:n]])
    positions = torch.tensor([p for n in prompt_lens for p in range(n)])
    logits = model.compute_logits(model(ids, positions, cache))
    per_seq = [list(chunk) for chunk in logits.split(prompt_lens)]
    for step in range(num_decode):
        positions = [n + step for n in prompt_lens]
        cache.set_batch(tuple(SequenceChunk(row, row, 1, pos) for row, pos in enumerate(positions)))
        ids = torch.tensor([seq[pos] for seq, pos in zip(sequences, positions, strict=True)])
        step_logits = model.compute_logits(model(ids, torch.tensor(positions), cache))
        for row in range(3):
            per_seq[row].append(step_logits[row])
    for seq, logits_rows in zip(sequences, per_seq, strict=True):
        assert_close_relative(torch.stack(logits_rows), hf_logits(hf_model, seq))


def test_unsupported_architecture_is_refused(tmp_path):
    save_random_hf_model(tmp_path)
    config_path = tmp_path / "config.json"
    config_path.write_text(config_path.read_text().replace("LlamaForCausalLM", "GPT2LMHeadModel"))
    with pytest.raises(ModelConfigError, match="GPT2LMHeadModel"):
        load_model(tmp_path, torch.device("cpu"), torch.float32)


def test_missing_tensor_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    save_random_hf_model(tmp_path)
    tensors = load_file(tmp_path / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ModelConfigError, match="layers.1.gate_up_proj"):
        load_model(tmp_path, torch.device("cpu"), torch.float32)
