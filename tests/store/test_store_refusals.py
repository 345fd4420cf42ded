"""The bad-adapter corpus: every upload the store refuses, through AdapterStore.put. Each is refused with its own
message naming the file, field or tensor at fault, and leaves the store exactly as it was: the same rows, the same
blob files, no temp files. Most cases are edits of one good PEFT adapter; the header cases edit its raw safetensors
header, since safetensors itself would never write them."""

import json
import struct

import pytest
import torch
import transformers
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from lora_server.adapters_store import AdapterError, AdapterStore, StoreLimits
from tests.reference import TINY_DIMS
from tests.store.peft_helpers import CONFIG_FILE, WEIGHTS_FILE, make_adapter, tensor_key
from tests.store.store_helpers import peft_upload, snapshot

LIMITS = StoreLimits(max_rank=8, max_file_bytes=100_000, max_config_bytes=8_192)
EVIL_PICKLE = b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR."  # runs a command when unpickled
Q_A, Q_B = tensor_key(0, "q_proj", "A"), tensor_key(0, "q_proj", "B")
DOWN_B = tensor_key(1, "down_proj", "B")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    base, files = peft_upload(tmp_path_factory.mktemp("good"))
    # An adapter PEFT made for another base model (hidden size 32, not 64).
    other = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY_DIMS, "hidden_size": 32}))
    other_dir = tmp_path_factory.mktemp("other_base")
    make_adapter(other, other_dir, seed=5, r=4, lora_alpha=8, target_modules="all-linear")
    other_files = {name: (other_dir / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}
    return base, files, other_files


@pytest.fixture(scope="module")
def store(good, tmp_path_factory):
    base, files, _ = good
    with AdapterStore.open(tmp_path_factory.mktemp("store"), base, LIMITS) as store:
        store.put("acme", "kept", files)  # "unchanged" should mean something: a store with a version in it
        yield store


# ---- edits -------------------------------------------------------------------------------------------------------

def config_edit(**fields):
    def edit(files):
        return {**files, CONFIG_FILE: json.dumps({**json.loads(files[CONFIG_FILE]), **fields}).encode()}
    return edit


def tensors_edit(change):
    def edit(files):
        tensors = load_safetensors(files[WEIGHTS_FILE])
        change(tensors)
        return {**files, WEIGHTS_FILE: save_safetensors(tensors)}
    return edit


def poison(key, value):
    def change(tensors):
        tensors[key] = tensors[key].clone()
        tensors[key][0, 1] = value
    return tensors_edit(change)


def weights_bytes(make):
    return lambda files: {**files, WEIGHTS_FILE: make(files[WEIGHTS_FILE])}


def split_safetensors(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack_from("<Q", data)
    return json.loads(data[8:8 + length]), data[8 + length:]


def join_safetensors(header: dict | str, data: bytes) -> bytes:
    text = (header if isinstance(header, str) else json.dumps(header)).encode()
    return struct.pack("<Q", len(text)) + text + data


def header_edit(change):
    """Edit the header as a dict (and, when `change` returns bytes, the data region)."""
    def make(weights):
        header, data = split_safetensors(weights)
        data = change(header, data) or data
        return join_safetensors(header, data)
    return weights_bytes(make)


def by_offset(header: dict) -> list[str]:
    return sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"])


def overlap(header, data):
    second = header[by_offset(header)[1]]
    second["data_offsets"] = [o - 4 for o in second["data_offsets"]]


def gap(header, data):
    last = header[by_offset(header)[-1]]
    last["data_offsets"] = [o + 4 for o in last["data_offsets"]]
    return data + b"\0" * 4


def duplicate_tensor(weights):
    header, data = split_safetensors(weights)
    text = json.dumps(header)
    return join_safetensors(f'{{"{Q_A}": {json.dumps(header[Q_A])}, {text[1:]}', data)


def set_entry(key, **fields):
    return header_edit(lambda header, data: header[key].update(fields))


CASES = {
    # the upload's files
    "pickle_only": (lambda f: {CONFIG_FILE: f[CONFIG_FILE], "adapter_model.bin": EVIL_PICKLE},
                    "adapter_model.bin: pickle weight files are refused"),
    "pickle_beside_safetensors": (lambda f: {**f, "pytorch_model.bin": EVIL_PICKLE},
                                  "pytorch_model.bin: pickle weight files are refused"),
    "readme": (lambda f: {**f, "README.md": b"# card"}, "README.md: unexpected file"),
    "path_as_name": (lambda f: {**f, "../../etc/passwd": b"x"}, "../../etc/passwd: unexpected file"),
    "missing_config": (lambda f: {WEIGHTS_FILE: f[WEIGHTS_FILE]}, "adapter_config.json: missing from the upload"),
    "missing_weights": (lambda f: {CONFIG_FILE: f[CONFIG_FILE]}, "adapter_model.safetensors: missing from the upload"),
    "config_too_big": (lambda f: {**f, CONFIG_FILE: f[CONFIG_FILE] + b" " * LIMITS.max_config_bytes},
                       "adapter_config.json: 9"),
    "weights_too_big": (weights_bytes(lambda w: w + b"\0" * LIMITS.max_file_bytes), "adapter_model.safetensors: 1"),
    # the config
    "config_not_json": (lambda f: {**f, CONFIG_FILE: b"{r: 4"}, "adapter_config.json: not valid JSON"),
    "dora": (config_edit(use_dora=True), "adapter_config.json: use_dora: DoRA adapters are not supported"),
    "rank_zero": (config_edit(r=0), "adapter_config.json: r: must be a positive integer, got 0"),
    "rank_over_limit": (config_edit(r=16), "adapter_config.json: r: rank 16 of model.layers.0.mlp.down_proj is over "
                                           "this server's maximum of 8"),
    "rank_pattern_over_limit": (config_edit(rank_pattern={"v_proj": 64}),
                                "rank_pattern['v_proj']: rank 64 of model.layers.0.self_attn.v_proj is over"),
    # the safetensors header, checked by our own parser before the library sees it
    "empty_weights": (weights_bytes(lambda w: b""), "0 bytes is too short for the 8-byte header length"),
    "huge_declared_header": (weights_bytes(lambda w: struct.pack("<Q", 1 << 62) + b"{}"),
                             f"declared header of {1 << 62} bytes is over the limit of 1048576"),
    "header_past_end": (weights_bytes(lambda w: struct.pack("<Q", 5000) + w[8:1000]),
                        "declared header of 5000 bytes runs past the end of the 1000-byte file"),
    "truncated": (weights_bytes(lambda w: w[: len(w) // 2]), "not a readable safetensors file: truncated: tensor"),
    "header_not_json": (weights_bytes(lambda w: join_safetensors("{dtype: F32}", b"")),
                        "header is not valid UTF-8 JSON"),
    "header_not_utf8": (weights_bytes(lambda w: join_safetensors("{}", b"")[:8] + b"{\xff}"),
                        "header is not valid UTF-8 JSON (\'utf-8\' codec"),
    "header_not_object": (weights_bytes(lambda w: join_safetensors("[1, 2]", b"")), "header is not a JSON object"),
    "unknown_dtype": (set_entry(Q_A, dtype="Q4_K"), Q_A + ": dtype 'Q4_K' is not float32, float16 or bfloat16"),
    "int32_dtype": (tensors_edit(lambda t: t.update({Q_B: torch.ones(64, 4, dtype=torch.int32)})),
                    Q_B + ": dtype torch.int32"),
    "float64": (tensors_edit(lambda t: t.update({DOWN_B: t[DOWN_B].double()})), DOWN_B + ": dtype torch.float64"),
    "negative_dim": (set_entry(Q_A, shape=[-4, 64]), Q_A + ": shape must be a list of non-negative integers"),
    "float_dim": (set_entry(Q_B, shape=[64.0, 4]), Q_B + ": shape must be a list of non-negative integers"),
    "offsets_reversed": (header_edit(lambda h, d: h[Q_A].update(data_offsets=h[Q_A]["data_offsets"][::-1])),
                         Q_A + ": data_offsets [13056, 12032] end before they begin"),
    "offsets_size_mismatch": (set_entry(Q_A, shape=[4, 63]),
                              Q_A + ": data_offsets [12032, 13056] span 1024 bytes, but F32 of shape (4, 63) needs "
                                    "1008"),
    "overlapping_offsets": (header_edit(overlap), "overlap tensor"),
    "gap_between_tensors": (header_edit(gap), "leave a gap of 4 bytes"),
    "trailing_data": (weights_bytes(lambda w: w + b"\0" * 8), "8 bytes of data follow the last tensor"),
    "metadata_not_strings": (header_edit(lambda h, d: h.update(__metadata__={"format": 1})),
                             "__metadata__: must be an object of strings"),
    "duplicate_tensor": (weights_bytes(duplicate_tensor), Q_A + ": appears twice in the header"),
    "extra_entry_field": (set_entry(Q_A, scale=2.0), Q_A + ": header entry has fields"),
    # the tensors
    "nan": (poison(Q_A, float("nan")), Q_A + ": holds NaN or Inf values"),
    "inf": (poison(DOWN_B, float("inf")), DOWN_B + ": holds NaN or Inf values"),
    "rank_zero_tensors": (tensors_edit(lambda t: t.update({Q_A: torch.zeros(0, 64), Q_B: torch.zeros(64, 0)})),
                          Q_A + ": rank 0 does not match the configured rank 4"),
    "missing_lora_b": (tensors_edit(lambda t: t.pop(Q_B)), Q_B + ": missing (lora_A is there)"),
    "lm_head_tensor": (tensors_edit(lambda t: t.update({"base_model.model.lm_head.weight": torch.randn(97, 64)})),
                       "lm_head.weight: unexpected tensor"),
    "no_tensors": (weights_bytes(lambda w: save_safetensors({})), "adapter_model.safetensors: holds no tensors"),
    # who is uploading
    "bad_tenant": ("../acme", "tenant: ../acme is not 1 to 128 characters"),
    "empty_adapter_id": ("", "adapter_id: '' is not 1 to 128 characters"),
    "long_adapter_id": ("a" * 129, "adapter_id: " + "a" * 64 + "... is not"),
}


def refusal(case: str, good, store) -> AdapterError:
    base, files, other_files = good
    tenant, adapter_id = "acme", "new"
    edit, _ = CASES.get(case, (None, None))
    if case == "wrong_base_model":
        files = other_files
    elif case == "bad_tenant":
        tenant = edit
    elif case in ("empty_adapter_id", "long_adapter_id"):
        adapter_id = edit
    else:
        files = edit(files)
    before = snapshot(store)
    with pytest.raises(AdapterError) as error:
        store.put(tenant, adapter_id, files)
    assert snapshot(store) == before, "a refused upload changed the store"
    assert not list((store.root / "tmp").iterdir())
    return error.value


ALL_CASES = [*CASES, "wrong_base_model"]


def test_good_adapter_and_a_rebuilt_header_are_accepted(good, store):
    """The corpus edits are meaningful only if an unedited round trip through them is accepted."""
    _, files, _ = good
    assert store.put("acme", "control", files).version == 1
    assert store.put("acme", "control", header_edit(lambda h, d: None)(files)).version == 2
    store.delete("acme", "control")


@pytest.mark.parametrize("case", ALL_CASES)
def test_bad_adapter_is_refused_and_store_unchanged(case, good, store):
    error = refusal(case, good, store)
    expected = CASES[case][1] if case in CASES else "shape (4, 32) does not fit q_proj of the base model"
    assert expected in str(error), str(error)


def test_each_refusal_has_its_own_message(good, store):
    messages = {case: str(refusal(case, good, store)) for case in ALL_CASES}
    assert len(ALL_CASES) >= 25 and len(set(messages.values())) == len(ALL_CASES), messages
