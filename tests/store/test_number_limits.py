"""Numbers that would overflow the engine are refused where they enter the store, naming the field: a LoRA scale
past MAX_LORA_SCALE (lora_alpha, alpha_pattern, rsLoRA), a combine weight past its bound or one whose folded factors
would not fit float16, and a rank past the server's --max-lora-rank."""

import json

import pytest

from lora_server.adapters_store import AdapterError, AdapterStore, StoreLimits, parse_peft_adapter
from lora_server.adapters_store.combine import MAX_FACTOR, MAX_SOURCE_WEIGHT, combine_adapters
from lora_server.adapters_store.peft_adapter import MAX_WEIGHT_MAGNITUDE
from lora_server.adapters_store.peft_targets import MAX_LORA_SCALE
from tests.store.peft_helpers import CONFIG_FILE, WEIGHTS_FILE
from tests.store.store_helpers import peft_upload, variant

RANK = 4


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """The tiny Llama's description and a rank-4 all-linear PEFT adapter on it, as upload files."""
    return peft_upload(tmp_path_factory.mktemp("good"), r=RANK, lora_alpha=8)


def with_config(files: dict[str, bytes], **fields) -> dict[str, bytes]:
    return {**files, CONFIG_FILE: json.dumps({**json.loads(files[CONFIG_FILE]), **fields}).encode()}


def parse(files: dict[str, bytes], base, limits: StoreLimits | None = None):
    return parse_peft_adapter(files[CONFIG_FILE], files[WEIGHTS_FILE], base, limits)


@pytest.mark.parametrize("fields, field", [
    (dict(lora_alpha=1e308), "lora_alpha"),
    (dict(lora_alpha=-1e308), "lora_alpha"),
    (dict(lora_alpha=MAX_LORA_SCALE * RANK * 1.01), "lora_alpha"),
    (dict(use_rslora=True, lora_alpha=MAX_LORA_SCALE * 2 * 1.01), "lora_alpha"),  # alpha / sqrt(4)
    (dict(alpha_pattern={"v_proj": 1e300}), "alpha_pattern['v_proj']"),
    (dict(alpha_pattern={"o_proj": 8, "down_proj": -1e6}), "alpha_pattern['down_proj']"),
])
def test_a_scale_past_the_bound_is_refused_naming_its_field(good, fields, field):
    base, files = good
    with pytest.raises(AdapterError) as error:
        parse(with_config(files, **fields), base)
    assert error.value.field == field and "scale" in error.value.message, str(error.value)


def test_scales_up_to_the_bound_are_accepted(good):
    base, files = good
    adapter = parse(with_config(files, lora_alpha=MAX_LORA_SCALE * RANK, alpha_pattern={"q_proj": -8}), base)
    assert max(abs(m.scale) for m in adapter.modules.values()) == MAX_LORA_SCALE


def test_a_rank_over_the_servers_limit_is_refused_and_one_at_it_is_accepted(good, tmp_path):
    base, files = good
    with AdapterStore.open(tmp_path / "store", base, StoreLimits(max_rank=RANK - 1)) as store:
        with pytest.raises(AdapterError) as error:
            store.put("acme", "too-big", files)
        assert error.value.field == "r" and f"maximum of {RANK - 1}" in error.value.message
    with AdapterStore.open(tmp_path / "store", base, StoreLimits(max_rank=RANK)) as store:
        assert store.put("acme", "fits", files).version == 1


@pytest.mark.parametrize("weight", [1e30, -1e30, MAX_SOURCE_WEIGHT * 1.5])
def test_a_combine_weight_past_the_bound_is_refused(good, weight):
    base, files = good
    adapter = parse(files, base)
    with pytest.raises(AdapterError) as error:
        combine_adapters([(adapter, 1.0), (adapter, weight)])
    assert error.value.field == "sources[1].weight", str(error.value)


@pytest.mark.parametrize("method, rank", [("linear", None), ("svd", 2)])
def test_a_combine_whose_factors_would_overflow_float16_is_refused(good, method, rank):
    base, files = good
    big = parse(with_config(files, lora_alpha=MAX_LORA_SCALE * RANK), base)  # scale at the bound, B ~ 0.1
    small = parse(files, base)
    with pytest.raises(AdapterError) as error:
        combine_adapters([(small, 1.0), (big, MAX_SOURCE_WEIGHT)], method, rank)  # ~1e7 > MAX_FACTOR
    assert error.value.field == "sources[1].weight" and "float16" in error.value.message, str(error.value)
    combined, _ = combine_adapters([(small, 1.0), (big, 1.0)], method, rank)  # ~1e3: fits
    result = parse(combined, base)
    assert all(m.lora_b.abs().max() <= MAX_FACTOR for m in result.modules.values())


@pytest.mark.parametrize("value", [MAX_WEIGHT_MAGNITUDE * 1.5, -1e30])
def test_a_weight_past_float16s_range_is_refused_naming_its_tensor(good, value):
    base, files = good
    with pytest.raises(AdapterError) as error:
        parse(variant(files, value), base)
    assert error.value.field.endswith("lora_A.weight") or error.value.field.endswith("lora_B.weight"), error.value
    assert "float16" in error.value.message


def test_a_weight_at_float16s_largest_value_is_accepted(good):
    base, files = good
    assert parse(variant(files, -MAX_WEIGHT_MAGNITUDE), base).modules
