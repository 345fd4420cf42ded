"""Our safetensors header check accepts whatever the safetensors library writes (its own files are the oracle), and
on any corruption either refuses with an AdapterError or agrees with the library."""

import json
import struct

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from lora_server.adapters_store import AdapterError, check_safetensors_header

DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16"}

tensor_dicts = st.dictionaries(
    keys=st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), min_size=1, max_size=12).filter(
        lambda name: name != "__metadata__"),
    values=st.tuples(st.sampled_from(list(DTYPES)), st.lists(st.integers(0, 5), max_size=3)),
    max_size=6,
)


def build(spec) -> dict[str, torch.Tensor]:
    return {name: torch.randn(shape).to(dtype) for name, (dtype, shape) in spec.items()}


@settings(max_examples=60, deadline=None)
@given(spec=tensor_dicts, metadata=st.one_of(st.none(), st.dictionaries(st.text(max_size=5), st.text(max_size=5))))
def test_files_written_by_safetensors_are_accepted(spec, metadata):
    assume(spec or metadata is None)  # safetensors 0.8 writes invalid JSON for no tensors and {} metadata
    tensors = build(spec)
    entries = check_safetensors_header(save_safetensors(tensors, metadata=metadata), file="f")
    assert entries.keys() == tensors.keys()
    for name, tensor in tensors.items():
        assert (entries[name].dtype, entries[name].shape) == (DTYPES[tensor.dtype], tuple(tensor.shape))


@settings(max_examples=100, deadline=None)
@given(spec=tensor_dicts, data=st.data())
def test_corrupted_files_are_refused_or_read_by_safetensors_too(spec, data):
    corrupted = bytearray(save_safetensors(build(spec)))
    header_end = 8 + struct.unpack_from("<Q", corrupted)[0]
    for _ in range(data.draw(st.integers(1, 3))):
        # Mostly in the length and the header, where a parser is most fragile.
        position = data.draw(st.one_of(st.integers(0, header_end - 1), st.integers(0, len(corrupted) - 1)))
        corrupted[position] = data.draw(st.integers(0, 255))
    try:
        check_safetensors_header(bytes(corrupted), file="f")
    except AdapterError:
        return
    try:
        load_safetensors(bytes(corrupted))
    except SafetensorError as error:  # a header we pass must be one the library reads too
        pytest.fail(f"our check passed a file safetensors refuses: {error}")


def test_header_cap_is_checked_before_reading():
    data = struct.pack("<Q", 2048) + json.dumps({"x": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]}}).encode()
    with pytest.raises(AdapterError, match="declared header of 2048 bytes is over the limit of 1024"):
        check_safetensors_header(data.ljust(8 + 2048), file="f", max_header_bytes=1024)
    check_safetensors_header(data.ljust(8 + 2048), file="f", max_header_bytes=2048)


def test_deep_nesting_is_refused_not_a_crash():
    header = ('{"x": ' + "[" * 100_000 + "]" * 100_000 + "}").encode()
    with pytest.raises(AdapterError, match="not valid UTF-8 JSON"):
        check_safetensors_header(struct.pack("<Q", len(header)) + header, file="f")
