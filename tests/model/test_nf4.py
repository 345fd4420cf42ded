"""The NF4 pass: 4-bit bases compute exactly what their dequantized weights would, at under a third of the bytes."""

import torch
import transformers

from lora_server.adapters_store import load_peft_adapter
from lora_server.engine.build import describe_base_model
from lora_server.kernels.lora_batch import NO_SLOT, LoraBatch
from lora_server.model.attention import ContiguousKVCache, SequenceChunk
from lora_server.model.loader import load_model
from lora_server.model.nf4 import Nf4Base, quantize_nf4_
from tests.engine.offline_reference import load_adapters_into_slots
from tests.model.test_vs_transformers import our_logits
from tests.reference import add_random_lora, assert_close_relative, save_random_hf_model


def test_nf4_equals_dense_model_with_dequantized_weights(tmp_path):
    save_random_hf_model(tmp_path, "LlamaForCausalLM", hidden_size=128, intermediate_size=256, seed=5)
    nf4_model = load_model(tmp_path, torch.device("cpu"), torch.float32)
    dense_bytes, nf4_bytes = quantize_nf4_(nf4_model)
    dequantized_model = load_model(tmp_path, torch.device("cpu"), torch.float32)
    original_model = load_model(tmp_path, torch.device("cpu"), torch.float32)
    for nf4_linear, dense_linear in zip(nf4_model.lora_linears(), dequantized_model.lora_linears(), strict=True):
        assert isinstance(nf4_linear.base, Nf4Base)
        dense_linear.base.weight.copy_(nf4_linear.base.dequantized_weight())

    sequences = [torch.randint(0, 97, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 17)]
    for nf4, dequantized, original in zip(our_logits(nf4_model, sequences), our_logits(dequantized_model, sequences),
                                          our_logits(original_model, sequences), strict=True):
        assert_close_relative(nf4, dequantized, tol=1e-4)
        # Quantization did change the weights: the dense original differs by far more than the tolerance.
        assert (nf4 - original).abs().max() > 1e-3

    assert nf4_bytes <= 0.30 * dense_bytes, (nf4_bytes, dense_bytes)
    # Embeddings, norms and LM head stay in the compute dtype.
    assert nf4_model.embed_tokens.weight.dtype == torch.float32
    assert nf4_model.norm.weight.dtype == torch.float32


def test_lora_on_nf4_base_is_computed_in_the_compute_dtype(tmp_path):
    """The LoRA term on a 4-bit base equals the same term on the dequantized dense base, per token in one batch."""
    save_random_hf_model(tmp_path / "base", "LlamaForCausalLM", hidden_size=128, intermediate_size=256, seed=6)
    add_random_lora(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "lora", seed=7)
    nf4_model = load_model(tmp_path / "base", torch.device("cpu"), torch.float32)
    quantize_nf4_(nf4_model)
    dense_model = load_model(tmp_path / "base", torch.device("cpu"), torch.float32)
    for nf4_linear, dense_linear in zip(nf4_model.lora_linears(), dense_model.lora_linears(), strict=True):
        dense_linear.base.weight.copy_(nf4_linear.base.dequantized_weight())
    adapter = load_peft_adapter(tmp_path / "lora", describe_base_model(dense_model.config))

    seq = torch.randint(0, 97, (11,), generator=torch.Generator().manual_seed(8)).tolist()
    outputs = []
    for model in (nf4_model, dense_model):
        slot = load_adapters_into_slots(model, {"lora": adapter})["lora"]
        c = model.config
        cache = ContiguousKVCache(c.num_layers, 2, len(seq), c.num_kv_heads, c.head_dim, torch.float32, "cpu")
        cache.set_batch((SequenceChunk(0, 0, len(seq), 0), SequenceChunk(1, len(seq), len(seq), 0)))
        lora = LoraBatch.build([slot] * len(seq) + [NO_SLOT] * len(seq))
        outputs.append(model.compute_logits(model(torch.tensor(seq * 2), torch.arange(len(seq)).repeat(2), cache,
                                                  lora)))
    assert_close_relative(outputs[0], outputs[1], tol=1e-4)
    with_lora, without = outputs[0].split(len(seq))
    assert (with_lora - without).abs().max() > 1e-2
    assert nf4_model.layers[0].self_attn.qkv_proj.lora_a.dtype == torch.float32  # never 4-bit
