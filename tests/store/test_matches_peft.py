"""PEFT is the oracle: for adapters PEFT makes (and for configs it reads but never writes), our modules, ranks,
scales and tensors equal those of PEFT's own LoRA layers, and our math reproduces their forward pass."""

import json

import pytest
import torch
from peft.tuners.lora.config import VeloraConfig
from safetensors.torch import save as save_safetensors

from lora_server.adapters_store import LoraAdapter, load_peft_adapter, parse_peft_adapter
from tests.store.peft_helpers import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    describe,
    load_with_peft,
    make_adapter,
    peft_lora_layers,
    read_adapter,
    serialize,
    tensor_key,
    tiny_llama,
)

PATTERNS = dict(rank_pattern={"o_proj": 2, r"layers\.1\.mlp\.up_proj": 16, "model.layers.0.self_attn.q_proj": 4},
                alpha_pattern={"gate_proj": 32, "q_proj": 3, "down_proj": 5.5})
CASES = {
    "plain": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "patterns": dict(r=8, lora_alpha=16, **PATTERNS),
    "patterns_rslora": dict(r=8, lora_alpha=16, use_rslora=True, **PATTERNS),
    "all_linear": dict(r=4, lora_alpha=4, target_modules="all-linear"),  # PEFT saves it as full module names
    "regex": dict(r=4, lora_alpha=4, target_modules=r".*\.1\.(self_attn\.k_proj|mlp\.down_proj)"),
    "layers": dict(r=4, lora_alpha=4, target_modules=["up_proj", "o_proj"], layers_to_transform=[1]),
    "layer_int_and_pattern": dict(r=2, lora_alpha=2, target_modules=["self_attn.q_proj", "down_proj"],
                                  layers_to_transform=0, layers_pattern="layers"),
    "exclude_list": dict(r=4, lora_alpha=4, target_modules=["k_proj", "v_proj", "up_proj"], exclude_modules=["v_proj"]),
    "exclude_regex": dict(r=4, lora_alpha=4, exclude_modules=r".*\.0\.mlp\..*"),
    "mica_init": dict(r=4, lora_alpha=4, target_modules=["q_proj"], init_lora_weights="mica"),
    "velora": dict(r=4, lora_alpha=4, target_modules=["q_proj", "down_proj"], velora_config=VeloraConfig()),
}


@pytest.fixture(scope="module")
def model():
    return tiny_llama(seed=21)


def assert_matches_peft(adapter: LoraAdapter, peft_model, base) -> None:
    layers = peft_lora_layers(peft_model, base)
    assert set(adapter.modules) == set(layers)
    generator = torch.Generator().manual_seed(0)
    for key, layer in layers.items():
        ours = adapter.modules[key]
        assert ours.rank == layer.r["default"]
        assert ours.scale == layer.scaling["default"]
        assert torch.equal(ours.lora_a, layer.lora_A["default"].weight)
        assert torch.equal(ours.lora_b, layer.lora_B["default"].weight)
        # Our reading of the weights reproduces PEFT's forward: y = W x + scale * B (A x).
        x = torch.randn(3, ours.lora_a.shape[1], generator=generator)
        with torch.no_grad():
            expected = layer(x)
            ours_y = layer.get_base_layer()(x) + ours.scale * (x @ ours.lora_a.T) @ ours.lora_b.T
        torch.testing.assert_close(ours_y, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_adapter_made_by_peft_matches_peft(case, model, tmp_path):
    base = describe(model)
    peft_model = make_adapter(model, tmp_path, seed=len(case), **CASES[case])
    adapter = load_peft_adapter(tmp_path, base)
    assert_matches_peft(adapter, peft_model, base)
    assert adapter.config == json.loads((tmp_path / CONFIG_FILE).read_text())
    assert adapter.max_rank == max(w.rank for w in adapter.modules.values())
    assert adapter.ranks == sorted({w.rank for w in adapter.modules.values()})
    assert adapter.num_bytes == sum(4 * (w.lora_a.numel() + w.lora_b.numel()) for w in adapter.modules.values())


KEPT_FIELDS = ("peft_type", "r", "lora_alpha", "target_modules")
# Configs PEFT reads but never writes: PEFT loading the edited directory is the oracle.
EDITS = {
    "all_linear_shorthand": lambda c: c.update(target_modules="ALL-Linear"),
    "fan_in_fan_out": lambda c: c.update(fan_in_fan_out=True),  # PEFT resets it to False on nn.Linear
    "layers_int": lambda c: c.update(target_modules=["gate_proj", "k_proj"], layers_to_transform=1),
    # The first matching pattern key in file order wins. (PEFT writes the file with sorted keys, so that order, not
    # the one given to LoraConfig, is what counts when the adapter is loaded.)
    "first_pattern_wins": lambda c: c.update(alpha_pattern={"o_proj": 2, r"layers\.1\.self_attn\.o_proj": 6}),
    "first_pattern_wins_reversed": lambda c: c.update(alpha_pattern={r"layers\.1\.self_attn\.o_proj": 6, "o_proj": 2}),
    # PEFT saved all-linear as full module names, and a full name skips the layer filter.
    "full_names_skip_layers": lambda c: c.update(layers_to_transform=[1]),
    "missing_optional_fields": lambda c: [c.pop(k) for k in list(c) if k not in KEPT_FIELDS],
}


@pytest.mark.filterwarnings("ignore:fan_in_fan_out is set to True")
@pytest.mark.parametrize("edit", EDITS)
def test_edited_config_reads_as_peft_reads_it(edit, model, tmp_path):
    base = describe(model)
    make_adapter(model, tmp_path, seed=5, r=4, lora_alpha=12, target_modules="all-linear")
    config, tensors = read_adapter(tmp_path)
    EDITS[edit](config)
    (tmp_path / CONFIG_FILE).write_text(json.dumps(config))
    peft_model = load_with_peft(model, tmp_path)
    # PEFT loads the tensors of the modules it targets and ignores the rest; keep exactly those.
    layers = peft_lora_layers(peft_model, base)
    kept = {tensor_key(*key, which): tensors[tensor_key(*key, which)] for key in layers for which in "AB"}
    (tmp_path / WEIGHTS_FILE).write_bytes(save_safetensors(kept))
    assert_matches_peft(load_peft_adapter(tmp_path, base), load_with_peft(model, tmp_path), base)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_tensors_keep_their_dtype_and_values(dtype, model, tmp_path):
    make_adapter(model, tmp_path, seed=3, r=4, lora_alpha=8, target_modules=["v_proj", "up_proj"])
    config, tensors = read_adapter(tmp_path)
    tensors = {k: t.to(dtype) for k, t in tensors.items()}
    adapter = parse_peft_adapter(*serialize(config, tensors), describe(model))
    for key, weights in adapter.modules.items():
        for which, tensor in (("A", weights.lora_a), ("B", weights.lora_b)):
            assert tensor.dtype == dtype and tensor.is_contiguous()
            assert torch.equal(tensor, tensors[tensor_key(*key, which)])
    assert adapter.num_bytes == sum(t.numel() * t.element_size() for t in tensors.values())
