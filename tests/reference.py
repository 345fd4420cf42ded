"""Trusted references for the tests: tiny random checkpoints and adapters made by transformers and PEFT at test time."""

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model

TINY_DIMS = dict(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5)


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """For tests on tiny tensors: extra intra-op threads only add overhead, and spin badly on a busy 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def save_random_hf_model(out_dir: Path, architecture: str = "LlamaForCausalLM", seed: int = 0,
                         **overrides) -> transformers.PreTrainedModel:
    """Create a random tiny HF model of `architecture`, save it to out_dir, and return it (fp32, eval mode)."""
    config_class = {
        "LlamaForCausalLM": transformers.LlamaConfig,
        "MistralForCausalLM": transformers.MistralConfig,
        "Qwen2ForCausalLM": transformers.Qwen2Config,
    }[architecture]
    torch.manual_seed(seed)
    config = config_class(**{**TINY_DIMS, **overrides})
    model = getattr(transformers, architecture)(config).eval()
    with torch.no_grad():  # HF inits norms to ones and biases to zeros: randomise them so a mix-up is visible
        for name, param in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
    model.save_pretrained(out_dir)
    return model


def add_random_lora(hf_model, out_dir: Path, seed: int, adapter_name: str = "default", **lora_kwargs):
    """Wrap hf_model with a PEFT LoRA whose A and B are both random, save it to out_dir; returns the PEFT model."""
    torch.manual_seed(seed)
    config = LoraConfig(**{"r": 8, "lora_alpha": 16, "target_modules": "all-linear", **lora_kwargs})
    peft_model = get_peft_model(hf_model, config, adapter_name=adapter_name).eval()
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name or "lora_A" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    peft_model.save_pretrained(out_dir)
    return peft_model


def hf_logits(hf_model, token_ids: list[int]) -> torch.Tensor:
    """Logits [len, vocab] of one unpadded sequence, fp32."""
    with torch.no_grad():
        return hf_model(torch.tensor([token_ids])).logits[0].float()


def assert_close_relative(ours: torch.Tensor, reference: torch.Tensor, tol: float = 1e-4) -> None:
    """Max absolute error relative to the reference's largest magnitude."""
    error = (ours - reference).abs().max() / reference.abs().max()
    assert error <= tol, f"max relative error {error:.2e} > {tol}"
