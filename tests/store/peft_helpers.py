"""A tiny random Llama and PEFT adapters on it, for the store tests. PEFT's own LoRA modules are the oracle."""

import copy
import json
from pathlib import Path

import torch
import transformers
from peft import PeftModel
from peft.tuners.lora import LoraLayer
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from lora_server.adapters_store import ATTENTION_MODULES, LORA_TARGET_MODULES, BaseModelDescription, full_module_name
from tests.reference import TINY_DIMS, add_random_lora

CONFIG_FILE, WEIGHTS_FILE = "adapter_config.json", "adapter_model.safetensors"


def tiny_llama(seed: int = 0) -> transformers.LlamaForCausalLM:
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**TINY_DIMS)).eval()


def describe(model: transformers.LlamaForCausalLM) -> BaseModelDescription:
    """The description the server would build, read off the transformers model itself."""
    layer = model.model.layers[0]
    linears = {m: getattr(layer.self_attn if m in ATTENTION_MODULES else layer.mlp, m) for m in LORA_TARGET_MODULES}
    shapes = {m: (linear.in_features, linear.out_features) for m, linear in linears.items()}
    return BaseModelDescription(num_layers=len(model.model.layers), module_shapes=shapes, name="tiny-llama")


def make_adapter(model: transformers.LlamaForCausalLM, out_dir: Path, seed: int, **lora_kwargs) -> PeftModel:
    """PEFT adapter with random (non-zero) A and B on a copy of `model`, saved to out_dir."""
    return add_random_lora(copy.deepcopy(model), out_dir, seed=seed, **lora_kwargs)


def load_with_peft(model: transformers.LlamaForCausalLM, adapter_dir: Path) -> PeftModel:
    return PeftModel.from_pretrained(copy.deepcopy(model), adapter_dir).eval()


def peft_lora_layers(peft_model: PeftModel, base: BaseModelDescription) -> dict[tuple[int, str], LoraLayer]:
    """(layer, module) -> PEFT's LoRA layer, for every module PEFT put the "default" adapter on."""
    names = {f"base_model.model.{name}": key for name, key in base.module_names().items()}
    found = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            assert name in names, f"PEFT adapted {name}, which is not one of the seven LoRA modules"
            found[names[name]] = module
    return found


def read_adapter(adapter_dir: Path) -> tuple[dict, dict[str, torch.Tensor]]:
    config = json.loads((adapter_dir / CONFIG_FILE).read_text())
    return config, load_safetensors((adapter_dir / WEIGHTS_FILE).read_bytes())


def serialize(config: dict, tensors: dict[str, torch.Tensor]) -> tuple[bytes, bytes]:
    return json.dumps(config).encode(), save_safetensors(tensors)


def tensor_key(layer: int, module: str, which: str) -> str:
    return f"base_model.model.{full_module_name(layer, module)}.lora_{which}.weight"
