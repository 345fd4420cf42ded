"""`lora-server merge`: the exported checkpoint loads in transformers and equals PEFT's merge_and_unload of the same
adapter; from an NF4 base it equals PEFT's merge into the dequantized base, which the server's NF4 layers compute."""

import argparse
import copy
import json

import pytest
import torch
import transformers
from peft import PeftModel
from safetensors import safe_open

from lora_server.demo import tasks
from lora_server.demo.paths import DEMO_MODEL_DIR, demo_adapter_dirs
from lora_server.export import ExportError, add_merge_parser, run_merge
from lora_server.model.llama import PACKED_MODULES
from lora_server.model.loader import load_model
from lora_server.model.nf4 import quantize_nf4_
from tests.reference import add_random_lora, assert_close_relative, hf_logits, one_torch_thread, save_random_hf_model


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


def lora_server_merge(*argv: str) -> None:
    """`lora-server merge ARGV`, through the subcommand's own parser."""
    parser = argparse.ArgumentParser(prog="lora-server")
    add_merge_parser(parser.add_subparsers(dest="command", required=True))
    run_merge(parser.parse_args(["merge", *map(str, argv)]))


def peft_merged(base: transformers.PreTrainedModel, adapter_dir) -> transformers.PreTrainedModel:
    return PeftModel.from_pretrained(copy.deepcopy(base), adapter_dir).merge_and_unload().eval()


def random_tokens(n: int, vocab: int) -> list[int]:
    return torch.randint(0, vocab, (n,)).tolist()


def test_demo_export_matches_peft_and_generates_the_adapters_task(tmp_path):
    adapter_dir = demo_adapter_dirs()["upper"]
    lora_server_merge("--model", DEMO_MODEL_DIR, "--adapter", adapter_dir, "--out", tmp_path / "out")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    reference = peft_merged(transformers.LlamaForCausalLM.from_pretrained(DEMO_MODEL_DIR), adapter_dir)

    ours, theirs = exported.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor, theirs[name], rtol=1e-6, atol=1e-7, msg=name)
    tokens = random_tokens(40, exported.config.vocab_size)
    assert_close_relative(hf_logits(exported, tokens), hf_logits(reference, tokens), tol=1e-5)

    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (tmp_path / "out" / name).read_bytes() == (DEMO_MODEL_DIR / name).read_bytes()
    # The merged checkpoint does the adapter's task with no adapter in sight, tokenizer and all.
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = tasks.held_out_texts(1, seed=7)[0]
    prompt = tokenizer(tasks.make_prompt(text), return_tensors="pt")
    generated = exported.generate(**prompt, max_new_tokens=len(text) + 1, do_sample=False)
    assert tokenizer.decode(generated[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True) == text.upper()


def test_export_with_biases_in_bfloat16_and_shards(tmp_path):
    """Qwen2 (q/k/v biases), an adapter with rank and alpha patterns on some layers, written as bf16 shards."""
    hf_model = save_random_hf_model(tmp_path / "base", "Qwen2ForCausalLM", tie_word_embeddings=False, seed=41)
    add_random_lora(copy.deepcopy(hf_model), tmp_path / "lora", seed=42, r=8, lora_alpha=16,
                    rank_pattern={"v_proj": 2}, alpha_pattern={"down_proj": 4}, use_rslora=True)
    from lora_server.export import export_merged

    export_merged(tmp_path / "base", tmp_path / "lora", tmp_path / "out", dtype="bfloat16", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert json.loads((tmp_path / "out" / "config.json").read_text())["dtype"] == "bfloat16"

    exported = transformers.Qwen2ForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    reference = peft_merged(hf_model, tmp_path / "lora")
    theirs = reference.state_dict()
    for name, tensor in exported.state_dict().items():
        # W + δ summed in fp32 and rounded once to bf16: PEFT's fp32 merge, rounded, up to fp32 summation order.
        torch.testing.assert_close(tensor, theirs[name].to(torch.bfloat16).float(), rtol=8e-3, atol=1e-6, msg=name)
    tokens = random_tokens(30, 97)
    assert_close_relative(hf_logits(exported, tokens), hf_logits(reference, tokens), tol=3e-2)
    with safe_open(tmp_path / "out" / index["weight_map"]["model.layers.0.self_attn.q_proj.bias"], "pt") as shard:
        assert shard.get_tensor("model.layers.0.self_attn.q_proj.bias").dtype == torch.bfloat16


def test_export_from_nf4_base_matches_peft_merge_into_the_dequantized_base(tmp_path):
    hf_model = save_random_hf_model(tmp_path / "base", "LlamaForCausalLM", hidden_size=128, intermediate_size=256,
                                    tie_word_embeddings=False, seed=51)
    add_random_lora(copy.deepcopy(hf_model), tmp_path / "lora", seed=52, r=4, lora_alpha=8,
                    target_modules=["q_proj", "o_proj", "up_proj", "down_proj"])
    lora_server_merge("--model", tmp_path / "base", "--adapter", tmp_path / "lora", "--out", tmp_path / "nf4",
                      "--quantize", "nf4")
    lora_server_merge("--model", tmp_path / "base", "--adapter", tmp_path / "lora", "--out", tmp_path / "dense")
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "nf4").eval()

    # The reference: the server's NF4 base, dequantized into the transformers model, then PEFT's merge on top.
    nf4_model = load_model(tmp_path / "base", torch.device("cpu"), torch.float32)
    quantize_nf4_(nf4_model)
    dequantized = copy.deepcopy(hf_model)
    with torch.no_grad():
        for index, layer in enumerate(nf4_model.layers):
            hf_layer = dequantized.model.layers[index]
            for name, (packed, k) in PACKED_MODULES.items():
                linear = nf4_model.packed_linear(layer, packed)
                block = hf_layer.self_attn if packed in ("qkv_proj", "o_proj") else hf_layer.mlp
                weight = linear.base.dequantized_weight()[linear.slice_offsets[k] : linear.slice_offsets[k + 1]]
                getattr(block, name).weight.copy_(weight)
    reference = peft_merged(dequantized, tmp_path / "lora")
    tokens = random_tokens(30, 97)
    ours = hf_logits(exported, tokens)
    assert_close_relative(ours, hf_logits(reference, tokens), tol=1e-5)
    dense = hf_logits(transformers.LlamaForCausalLM.from_pretrained(tmp_path / "dense"), tokens)
    assert (ours - dense).abs().max() > 1e-3  # the NF4 base is not the dense one: the comparison above means something


def test_export_refuses_to_overwrite(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an empty directory"):
        lora_server_merge("--model", DEMO_MODEL_DIR, "--adapter", demo_adapter_dirs()["upper"], "--out",
                          tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
