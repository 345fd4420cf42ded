"""PEFT adapter parsing: modules, ranks, scales and tensors equal what PEFT itself builds; every refusal names the
field or tensor at fault."""

import json

import pytest
import torch
import transformers
from peft.tuners.lora import LoraLayer
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from adapters_store import AdapterError, BaseModelDescription, load_peft_adapter, parse_peft_adapter
from tests.reference import TINY_DIMS, add_random_lora, save_random_hf_model

HIDDEN, INTER, HEAD_DIM = 64, 112, 16
BASE = BaseModelDescription(num_layers=2, module_shapes={
    "q_proj": (HIDDEN, 4 * HEAD_DIM), "k_proj": (HIDDEN, 2 * HEAD_DIM), "v_proj": (HIDDEN, 2 * HEAD_DIM),
    "o_proj": (4 * HEAD_DIM, HIDDEN), "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER),
    "down_proj": (INTER, HIDDEN)})
assert TINY_DIMS["hidden_size"] == HIDDEN and TINY_DIMS["intermediate_size"] == INTER

CONFIGS = {
    "plain": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True),
    "patterns": dict(r=8, lora_alpha=8, rank_pattern={"o_proj": 2, "mlp.up_proj": 16}, alpha_pattern={"gate_proj": 32}),
    "all_linear": dict(r=4, lora_alpha=4, target_modules="all-linear"),
    "regex": dict(r=4, lora_alpha=4, target_modules=r".*\.1\.(self_attn\.k_proj|mlp\.down_proj)"),
    "layers": dict(r=4, lora_alpha=4, target_modules=["up_proj", "o_proj"], layers_to_transform=[1]),
}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    save_random_hf_model(path, "LlamaForCausalLM", seed=21)
    return path


@pytest.fixture(scope="module")
def good_adapter(base_dir, tmp_path_factory):
    path = tmp_path_factory.mktemp("good")
    add_random_lora(transformers.LlamaForCausalLM.from_pretrained(base_dir), path, seed=22, r=4, lora_alpha=8)
    return json.loads((path / "adapter_config.json").read_text()), load_safetensors(
        (path / "adapter_model.safetensors").read_bytes())


@pytest.mark.parametrize("case", CONFIGS)
def test_matches_what_peft_builds(case, base_dir, tmp_path):
    peft_model = add_random_lora(transformers.LlamaForCausalLM.from_pretrained(base_dir), tmp_path, seed=23,
                                 **CONFIGS[case])
    expected = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            layer, short = int(name.split(".layers.")[1].split(".")[0]), name.rsplit(".", 1)[1]
            expected[(layer, short)] = (module.r["default"], module.scaling["default"],
                                        module.lora_A["default"].weight, module.lora_B["default"].weight)
    adapter = load_peft_adapter(tmp_path, BASE)
    assert set(adapter.modules) == set(expected)
    for key, (rank, scale, a, b) in expected.items():
        ours = adapter.modules[key]
        assert ours.rank == rank and ours.scale == pytest.approx(scale)
        assert torch.equal(ours.lora_a, a) and torch.equal(ours.lora_b, b)


def _serialize(config: dict, tensors: dict) -> tuple[bytes, bytes]:
    return json.dumps(config).encode(), save_safetensors(tensors)


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
UP_A = "base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"


def _set(field, value):
    return lambda config, tensors: config.__setitem__(field, value)


def _tensor(key, make):
    return lambda config, tensors: tensors.__setitem__(key, make(tensors))


def _poison(key, value):
    def edit(config, tensors):
        tensors[key] = tensors[key].clone()
        tensors[key][0, 0] = value
    return edit


BAD = {
    "dora": (_set("use_dora", True), "use_dora"),
    "modules_to_save": (_set("modules_to_save", ["lm_head"]), "modules_to_save"),
    "bias": (_set("bias", "all"), "bias"),
    "lora_bias": (_set("lora_bias", True), "lora_bias"),
    "unknown_target": (_set("target_modules", ["q_proj", "lm_head"]), "unknown target module 'lm_head'"),
    "regex_matches_nothing": (_set("target_modules", r".*\.c_attn"), "matches no module"),
    "rank_zero": (_set("r", 0), "r: must be a positive integer"),
    "rank_mismatch": (_set("r", 8), "expected (8, 64)"),
    "bad_peft_type": (_set("peft_type", "IA3"), "peft_type"),
    "layer_out_of_range": (_set("layers_to_transform", [0, 5]), "layer 5 does not exist"),
    "wrong_a_shape": (_tensor(Q_A, lambda t: torch.randn(4, HIDDEN + 1)), Q_A),
    "wrong_b_shape": (_tensor(Q_B, lambda t: torch.randn(4 * HEAD_DIM + 3, 4)), Q_B),
    "missing_b": (lambda c, t: t.pop(Q_B), Q_B + ": missing"),
    "missing_a": (lambda c, t: t.pop(UP_A), UP_A + ": missing"),
    "extra_tensor": (_tensor("base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
                             lambda t: torch.randn(64)), "lora_magnitude_vector: unexpected tensor"),
    "layer_99_tensor": (_tensor("base_model.model.model.layers.99.mlp.up_proj.lora_A.weight",
                                lambda t: torch.randn(4, HIDDEN)), "layers.99"),
    "untargeted_tensor": (lambda c, t: c.__setitem__("target_modules", ["k_proj", "v_proj", "o_proj", "gate_proj",
                                                                        "up_proj", "down_proj"]), Q_A),
    "nan": (_poison(Q_A, float("nan")), Q_A + ": holds NaN"),
    "inf": (_poison(Q_B, float("inf")), Q_B + ": holds NaN or Inf"),
    "integer_dtype": (_tensor(Q_A, lambda t: torch.ones(4, HIDDEN, dtype=torch.int32)), "dtype torch.int32"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_adapter_is_refused_naming_the_fault(case, good_adapter):
    config, tensors = json.loads(json.dumps(good_adapter[0])), dict(good_adapter[1])
    edit, message = BAD[case]
    edit(config, tensors)
    with pytest.raises(AdapterError) as error:
        parse_peft_adapter(*_serialize(config, tensors), BASE)
    assert message in str(error.value)


def test_good_adapter_parses(good_adapter):
    adapter = parse_peft_adapter(*_serialize(*good_adapter), BASE)
    assert len(adapter.modules) == 2 * 7 and adapter.ranks == [4]
    assert adapter.num_bytes == sum(t.numel() * 4 for t in good_adapter[1].values())


@pytest.mark.parametrize("config_bytes, safetensors_bytes, message", [
    (b"{not json", None, "adapter_config.json: not valid JSON"),
    (b"[1, 2]", None, "must be a JSON object"),
    (None, b"\x10\x00\x00\x00\x00\x00\x00\x00{}", "not a readable safetensors file"),
    (None, "truncate", "not a readable safetensors file"),
    (None, save_safetensors({}), "holds no tensors"),
])
def test_unreadable_files_are_refused(good_adapter, config_bytes, safetensors_bytes, message):
    good_config, good_tensors = _serialize(*good_adapter)
    if safetensors_bytes == "truncate":
        safetensors_bytes = good_tensors[: len(good_tensors) // 2]
    with pytest.raises(AdapterError, match=message):
        parse_peft_adapter(config_bytes or good_config, safetensors_bytes or good_tensors, BASE)


def test_pickle_files_are_never_loaded(good_adapter, tmp_path):
    (tmp_path / "adapter_config.json").write_bytes(_serialize(*good_adapter)[0])
    # A pickle that would run code if unpickled; refusing by name means it is never opened.
    (tmp_path / "adapter_model.bin").write_bytes(b"\x80\x04cos\nsystem\n(S'touch /tmp/pwned'\ntR.")
    with pytest.raises(AdapterError, match="adapter_model.bin: pickle weight files are refused"):
        load_peft_adapter(tmp_path, BASE)


def test_missing_config_is_refused(good_adapter, tmp_path):
    (tmp_path / "adapter_model.safetensors").write_bytes(_serialize(*good_adapter)[1])
    with pytest.raises(AdapterError, match="adapter_config.json: missing"):
        load_peft_adapter(tmp_path, BASE)
