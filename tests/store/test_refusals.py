"""Every refused adapter is refused with an AdapterError naming the config field, tensor or file at fault. The bad
adapters are edits of one good adapter made by PEFT."""

import dataclasses
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig

from lora_server.adapters_store import AdapterError, parse_peft_adapter
from tests.store.peft_helpers import describe, make_adapter, read_adapter, serialize, tensor_key, tiny_llama

RANK = 4
Q_A, Q_B = tensor_key(0, "q_proj", "A"), tensor_key(0, "q_proj", "B")
UP_A, DOWN_B = tensor_key(1, "up_proj", "A"), tensor_key(1, "down_proj", "B")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A base description and an all-linear rank-4 adapter on it, as (config dict, tensor dict)."""
    model = tiny_llama(seed=7)
    path = tmp_path_factory.mktemp("good")
    make_adapter(model, path, seed=8, r=RANK, lora_alpha=8, target_modules="all-linear")
    return describe(model), read_adapter(path)


def refuse(good, edit) -> AdapterError:
    base, (config, tensors) = good
    config, tensors = json.loads(json.dumps(config)), dict(tensors)
    edit(config, tensors)
    with pytest.raises(AdapterError) as error:
        parse_peft_adapter(*serialize(config, tensors), base)
    return error.value


def test_good_adapter_parses(good):
    base, (config, tensors) = good
    adapter = parse_peft_adapter(*serialize(config, tensors), base)
    assert len(adapter.modules) == base.num_layers * 7 and adapter.ranks == [RANK]


def test_message_names_file_field_and_reason(good):
    error = refuse(good, lambda c, t: c.update(use_dora=True))
    assert str(error) == "adapter_config.json: use_dora: DoRA adapters are not supported"
    assert (error.file, error.field) == ("adapter_config.json", "use_dora")


def set_field(field, value):
    return lambda config, tensors: config.update({field: value})


CONFIG_CASES = {
    "dora": (set_field("use_dora", True), "use_dora"),
    "modules_to_save": (set_field("modules_to_save", ["lm_head"]), "modules_to_save"),
    "bias_all": (set_field("bias", "all"), "bias"),
    "bias_lora_only": (set_field("bias", "lora_only"), "bias"),
    "lora_bias": (set_field("lora_bias", True), "lora_bias"),
    "qalora": (set_field("use_qalora", True), "use_qalora"),
    "alora": (set_field("alora_invocation_tokens", [5, 6]), "alora_invocation_tokens"),
    "target_parameters": (set_field("target_parameters", ["mlp.experts.down_proj"]), "target_parameters"),
    "trainable_tokens": (set_field("trainable_token_indices", [1, 2]), "trainable_token_indices"),
    "layer_replication": (set_field("layer_replication", [[0, 2], [1, 2]]), "layer_replication"),
    "kasa": (set_field("kasa_config", {}), "kasa_config"),
    "pissa": (set_field("init_lora_weights", "pissa_niter_4"), "init_lora_weights"),
    "olora": (set_field("init_lora_weights", "olora"), "init_lora_weights"),
    "loftq": (set_field("init_lora_weights", "loftq"), "init_lora_weights"),
    "not_lora": (set_field("peft_type", "IA3"), "peft_type"),
    "unknown_target_lm_head": (set_field("target_modules", ["q_proj", "lm_head"]), "unknown target module 'lm_head'"),
    "unknown_target_embed": (set_field("target_modules", ["embed_tokens"]), "unknown target module 'embed_tokens'"),
    "unknown_target_gpt2": (set_field("target_modules", ["c_attn"]), "unknown target module 'c_attn'"),
    "unknown_target_foo": (set_field("target_modules", ["foo"]), "unknown target module 'foo'"),
    "unknown_layer_in_name": (set_field("target_modules", ["model.layers.2.mlp.up_proj"]), "unknown target module"),
    "regex_matches_nothing": (set_field("target_modules", r".*\.c_attn"), "target_modules: regular expression"),
    "bad_regex": (set_field("target_modules", r".*(q_proj"), "target_modules: not a valid regular expression"),
    "no_targets": (set_field("target_modules", None), "target_modules: must be"),
    "empty_targets": (set_field("target_modules", []), "target_modules: must be"),
    "everything_excluded": (set_field("exclude_modules", r".*"), "selects no module"),
    "layer_out_of_range": (set_field("layers_to_transform", [0, 5]), "layers_to_transform: layer 5 does not exist"),
    "negative_layer": (set_field("layers_to_transform", -1), "layers_to_transform: layer -1 does not exist"),
    "layers_not_ints": (set_field("layers_to_transform", ["0"]), "layers_to_transform: must be"),
    "layers_with_regex": (lambda c, t: c.update(target_modules=".*q_proj", layers_to_transform=[0]),
                          "layers_to_transform: cannot be used"),
    "layers_pattern_alone": (set_field("layers_pattern", "layers"), "layers_pattern: needs layers_to_transform"),
    "layers_pattern_matches_nothing": (lambda c, t: c.update(target_modules=["q_proj"], layers_to_transform=[0],
                                                             layers_pattern="h"), "selects no module"),
    "rank_zero": (set_field("r", 0), "r: must be a positive integer, got 0"),
    "rank_negative": (set_field("r", -4), "r: must be a positive integer"),
    "rank_float": (set_field("r", 4.0), "r: must be a positive integer"),
    "rank_bool": (set_field("r", True), "r: must be a positive integer"),
    "rank_pattern_zero": (set_field("rank_pattern", {"q_proj": 0}), r"rank_pattern['q_proj']: must be a positive"),
    "rank_pattern_regex": (set_field("rank_pattern", {"q_proj(": 4}), r"rank_pattern['q_proj(']: not a valid"),
    "alpha_string": (set_field("lora_alpha", "16"), "lora_alpha: must be a finite number"),
    "alpha_nan": (set_field("lora_alpha", float("nan")), "lora_alpha: must be a finite number"),
    "alpha_pattern_inf": (set_field("alpha_pattern", {"v_proj": float("inf")}), r"alpha_pattern['v_proj']"),
    "rslora_string": (set_field("use_rslora", "yes"), "use_rslora: must be true or false"),
}


@pytest.mark.parametrize("case", CONFIG_CASES)
def test_bad_config_is_refused(case, good):
    edit, message = CONFIG_CASES[case]
    error = refuse(good, edit)
    assert message in str(error) and str(error).startswith("adapter_config.json: ")


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(LoraConfig) if f.metadata.get("is_lora_variant")])
def test_every_peft_lora_variant_but_velora_is_refused(field, good):
    """PEFT's LoraConfig tags each variant field; a new one in a PEFT upgrade must be decided on here."""
    value = {"use_dora": True, "alora_invocation_tokens": [3]}.get(field, {})
    if field == "velora_config":  # only its training backward differs; tests/store/test_matches_peft.py checks it
        base, (config, tensors) = good
        parse_peft_adapter(*serialize({**config, field: value}, tensors), base)
    else:
        assert refuse(good, set_field(field, value)).field == field


@pytest.mark.parametrize("value", [None, False, [], {}])
def test_peft_off_values_are_accepted(value, good):
    base, (config, tensors) = good
    off = {"use_dora": value, "modules_to_save": value, "lora_bias": value, "alora_invocation_tokens": value,
           "target_parameters": value, "trainable_token_indices": value, "layer_replication": value,
           "use_qalora": value, "layers_to_transform": value if value in (None, []) else None}
    parse_peft_adapter(*serialize({**config, **off}, tensors), base)


def set_tensor(key, make):
    return lambda config, tensors: tensors.update({key: make(tensors)})


def poison(key, value):
    def edit(config, tensors):
        tensors[key] = tensors[key].clone()
        tensors[key][-1, 1] = value
    return edit


TENSOR_CASES = {
    "wrong_a_shape": (set_tensor(Q_A, lambda t: torch.randn(RANK, 65)), Q_A + ": shape (4, 65) does not fit"),
    "wrong_b_shape": (set_tensor(DOWN_B, lambda t: torch.randn(112, RANK)), DOWN_B + ": shape (112, 4) does not fit"),
    "transposed_a": (set_tensor(UP_A, lambda t: t[UP_A].T.contiguous()), UP_A + ": shape (64, 4)"),
    "rank_differs_from_config": (set_field("r", 8), Q_A + ": rank 4 does not match the configured rank 8"),
    "rank_differs_from_pattern": (set_field("rank_pattern", {"mlp.up_proj": 2}),
                                  tensor_key(0, "up_proj", "A") + ": rank 4 does not match the configured rank 2 "
                                  "(adapter_config.json: rank_pattern['mlp.up_proj'])"),
    "rank_zero_tensors": (lambda c, t: t.update({Q_A: torch.zeros(0, 64), Q_B: torch.zeros(64, 0)}),
                          Q_A + ": rank 0 does not match"),
    "missing_b": (lambda c, t: t.pop(Q_B), Q_B + ": missing (lora_A is there)"),
    "missing_a": (lambda c, t: t.pop(UP_A), UP_A + ": missing (lora_B is there)"),
    "missing_module": (lambda c, t: [t.pop(Q_A), t.pop(Q_B)], Q_A + ": missing (adapter_config.json targets"),
    "dora_magnitude": (set_tensor(Q_A.replace("lora_A.weight", "lora_magnitude_vector"), lambda t: torch.randn(64)),
                       "lora_magnitude_vector: unexpected tensor"),
    "lora_embedding": (set_tensor("base_model.model.model.embed_tokens.lora_embedding_A", lambda t: torch.randn(4, 97)),
                       "embed_tokens.lora_embedding_A: unexpected tensor"),
    "lora_b_bias": (set_tensor(Q_B.replace("weight", "bias"), lambda t: torch.randn(64)), "lora_B.bias: unexpected"),
    "base_weight": (set_tensor("base_model.model.lm_head.weight", lambda t: torch.randn(97, 64)),
                    "lm_head.weight: unexpected tensor"),
    "lm_head_lora": (set_tensor("base_model.model.lm_head.lora_A.weight", lambda t: torch.randn(4, 64)),
                     "lm_head.lora_A.weight: unexpected tensor: tiny-llama (2 layers) has no such"),
    "layer_99": (set_tensor(tensor_key(99, "up_proj", "A"), lambda t: torch.randn(RANK, 64)),
                 "layers.99.mlp.up_proj.lora_A.weight: unexpected tensor"),
    "adapter_name_in_key": (set_tensor(Q_A.replace(".weight", ".default.weight"), lambda t: t[Q_A].clone()),
                            "lora_A.default.weight: unexpected tensor"),
    "untargeted_module": (set_field("target_modules", ["k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                       "down_proj"]),
                          "self_attn.q_proj.lora_A.weight: unexpected tensor: adapter_config.json does not target"),
    "velora_embed_without_velora": (set_tensor(Q_A.replace("lora_A.weight", "lora_velora_embed"),
                                               lambda t: torch.randn(64)), "lora_velora_embed: unexpected tensor"),
    "nan_in_a": (poison(Q_A, float("nan")), Q_A + ": holds NaN or Inf"),
    "inf_in_b": (poison(Q_B, float("inf")), Q_B + ": holds NaN or Inf"),
    "minus_inf_in_b": (poison(DOWN_B, float("-inf")), DOWN_B + ": holds NaN or Inf"),
    "nan_in_bf16": (lambda c, t: [t.update({UP_A: t[UP_A].bfloat16()}), poison(UP_A, float("nan"))(c, t)],
                    UP_A + ": holds NaN or Inf"),
    "integer_dtype": (set_tensor(Q_A, lambda t: torch.ones(RANK, 64, dtype=torch.int32)), Q_A + ": dtype torch.int32"),
    "bool_dtype": (set_tensor(Q_B, lambda t: torch.ones(64, RANK, dtype=torch.bool)), Q_B + ": dtype torch.bool"),
    "float64": (set_tensor(Q_B, lambda t: t[Q_B].double()), Q_B + ": dtype torch.float64 is not float32, float16"),
}


@pytest.mark.parametrize("case", TENSOR_CASES)
def test_bad_tensor_is_refused(case, good):
    edit, message = TENSOR_CASES[case]
    error = refuse(good, edit)
    assert message in str(error) and str(error).startswith("adapter_model.safetensors: base_model.model.")


@pytest.mark.parametrize("config_bytes, weights, message", [
    (b"{not json", None, "adapter_config.json: not valid JSON"),
    (b"\xff\xfe\xfa", None, "adapter_config.json: not valid JSON"),
    (b"[1, 2]", None, "adapter_config.json: must be a JSON object, got list"),
    (b"[" * 100_000, None, "adapter_config.json: not valid JSON"),
    (b'{"r": ' + b"9" * 5000 + b"}", None, "adapter_config.json: not valid JSON"),
    (None, "truncated", "adapter_model.safetensors: not a readable safetensors file"),
    (None, b"", "adapter_model.safetensors: not a readable safetensors file"),
    (None, b"\x10\x00\x00\x00\x00\x00\x00\x00{}", "adapter_model.safetensors: not a readable safetensors file"),
    (None, "no tensors", "adapter_model.safetensors: holds no tensors"),
])
def test_unreadable_file_is_refused(config_bytes, weights, message, good):
    base, adapter = good
    good_config, good_weights = serialize(*adapter)
    weights = {"truncated": good_weights[: len(good_weights) // 2], "no tensors": serialize({}, {})[1]}.get(
        weights, weights)
    with pytest.raises(AdapterError) as error:
        parse_peft_adapter(config_bytes or good_config, good_weights if weights is None else weights, base)
    assert str(error.value).startswith(message)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_corrupted_weights_are_refused_or_parsed_never_crash(data, good):
    base, adapter = good
    config_bytes, weights = serialize(*adapter)
    corrupted = bytearray(weights)
    for _ in range(data.draw(st.integers(1, 4))):
        # Most flips land in the header, where a parser would be most fragile.
        position = data.draw(st.integers(0, min(len(corrupted) - 1, 4000)))
        corrupted[position] = data.draw(st.integers(0, 255))
    try:
        parse_peft_adapter(config_bytes, bytes(corrupted), base)
    except AdapterError:
        pass
