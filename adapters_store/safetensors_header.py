"""Our own check of a safetensors header, run before the bytes reach the safetensors library: a user's file must not
make the server allocate a huge header, and each refusal names the tensor or field at fault.

Layout: an 8-byte little-endian header length N, N bytes of UTF-8 JSON
    {name: {"dtype": "F16", "shape": [r, n], "data_offsets": [begin, end]}, ..., "__metadata__": {str: str}}
then the data region. Offsets count from the start of the data region, and the tensors must tile it exactly, with
no gap, overlap or trailing bytes (the safetensors library refuses those too, with less helpful messages)."""

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from lora_server.adapters_store.errors import AdapterError

HEADER_LENGTH_BYTES = 8
DEFAULT_MAX_HEADER_BYTES = 1 << 20  # a Llama-70B all-linear LoRA (1,120 tensors) needs ~170 KiB
ITEM_SIZES = {"F32": 4, "F16": 2, "BF16": 2}  # the dtypes a LoRA adapter may hold
# The other safetensors dtypes, named as torch names them (the parser's messages name torch dtypes).
_TORCH_NAMES = {"F64": "float64", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U64": "uint64",
                "U32": "uint32", "U16": "uint16", "U8": "uint8", "BOOL": "bool", "F8_E4M3": "float8_e4m3fn",
                "F8_E5M2": "float8_e5m2", "F32": "float32", "F16": "float16", "BF16": "bfloat16"}
_ENTRY_FIELDS = ("dtype", "shape", "data_offsets")
_MESSAGE_CHARS = 80  # user-supplied values are cut to this in messages


@dataclass(frozen=True)
class TensorEntry:
    dtype: str  # one of ITEM_SIZES
    shape: tuple[int, ...]
    begin: int  # data_offsets, from the start of the data region
    end: int


class _JsonObject(list):
    """A JSON object as its (key, value) pairs in file order, so that duplicate keys can be seen and named."""


def check_safetensors_header(data: bytes, *, file: str,
                             max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES) -> dict[str, TensorEntry]:
    """Tensor name -> entry, once the header and the data layout are sane; AdapterError naming `file` otherwise."""
    if len(data) < HEADER_LENGTH_BYTES:
        raise _file_error(file, f"{len(data)} bytes is too short for the 8-byte header length")
    (header_bytes,) = struct.unpack_from("<Q", data)
    # Checked before anything is read or allocated: a declared length of 2**63 must cost nothing.
    if header_bytes > max_header_bytes:
        raise _file_error(file, f"declared header of {header_bytes} bytes is over the limit of {max_header_bytes}")
    if HEADER_LENGTH_BYTES + header_bytes > len(data):
        raise _file_error(file, f"declared header of {header_bytes} bytes runs past the end of the "
                                f"{len(data)}-byte file")
    pairs = _parse_json(bytes(data[HEADER_LENGTH_BYTES:HEADER_LENGTH_BYTES + header_bytes]), file)

    entries: dict[str, TensorEntry] = {}
    seen_metadata = False
    for name, value in pairs:
        if name in entries or (name == "__metadata__" and seen_metadata):
            raise AdapterError(_shown(name), "appears twice in the header", file=file)
        if name == "__metadata__":
            _check_metadata(value, file)
            seen_metadata = True
        else:
            entries[name] = _entry(name, value, file)
    _check_layout(entries, len(data) - HEADER_LENGTH_BYTES - header_bytes, file)
    return entries


def _parse_json(header: bytes, file: str) -> _JsonObject:
    if not header.startswith(b"{"):  # the safetensors library insists on it, with no padding before
        raise _file_error(file, "header is not a JSON object starting with '{'")
    try:
        # decode first: json.loads would also accept UTF-16 and UTF-32 bytes
        value = json.loads(header.decode("utf-8"), object_pairs_hook=_JsonObject)
    except (ValueError, RecursionError) as error:  # bad UTF-8 or JSON, 5000-digit ints, deep nesting
        raise _file_error(file, f"header is not valid UTF-8 JSON ({_cut(str(error))})") from None
    assert isinstance(value, _JsonObject)  # it starts with '{', and json.loads refuses trailing data
    return value


def _check_metadata(value: Any, file: str) -> None:
    if not isinstance(value, _JsonObject) or not all(isinstance(v, str) for _, v in value):
        raise AdapterError("__metadata__", f"must be an object of strings, got {_cut(_plain(value))}", file=file)
    if len({k for k, _ in value}) != len(value):
        raise AdapterError("__metadata__", "has a key twice", file=file)


def _entry(name: str, value: Any, file: str) -> TensorEntry:
    def error(message: str) -> AdapterError:
        return AdapterError(_shown(name), message, file=file)

    if not isinstance(value, _JsonObject):
        raise error(f"header entry must be an object with {', '.join(_ENTRY_FIELDS)}, got {_cut(_plain(value))}")
    fields = dict(value)
    if len(fields) != len(value) or sorted(fields) != sorted(_ENTRY_FIELDS):
        raise error(f"header entry has fields {_cut(repr([k for k, _ in value]))}, expected exactly "
                    f"{', '.join(_ENTRY_FIELDS)}")
    dtype, shape, offsets = fields["dtype"], fields["shape"], fields["data_offsets"]
    if dtype not in ITEM_SIZES:
        shown = f"torch.{_TORCH_NAMES[dtype]}" if dtype in _TORCH_NAMES else _cut(repr(dtype))
        raise error(f"dtype {shown} is not float32, float16 or bfloat16")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise error(f"shape must be a list of non-negative integers, got {_cut(_plain(shape))}")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise error(f"data_offsets must be two non-negative integers [begin, end], got {_cut(_plain(offsets))}")
    begin, end = offsets
    if begin > end:
        raise error(f"data_offsets [{begin}, {end}] end before they begin")
    needed = math.prod(shape) * ITEM_SIZES[dtype]
    if end - begin != needed:
        raise error(f"data_offsets [{begin}, {end}] span {end - begin} bytes, but {dtype} of shape {tuple(shape)} "
                    f"needs {needed}")
    return TensorEntry(dtype=dtype, shape=tuple(shape), begin=begin, end=end)


def _check_layout(entries: dict[str, TensorEntry], data_bytes: int, file: str) -> None:
    # A tensor past the end almost always means a cut-off upload: say "truncated", and name the tensor.
    last = max(entries, key=lambda name: entries[name].end, default="")
    if last and entries[last].end > data_bytes:
        raise _file_error(file, f"truncated: tensor {_shown(last)!r} ends at byte {entries[last].end} of the data, "
                                f"which holds {data_bytes} bytes")
    position, previous = 0, ""
    for name in sorted(entries, key=lambda n: (entries[n].begin, entries[n].end, n)):
        entry = entries[name]
        if entry.begin < position:
            raise AdapterError(_shown(name), f"data_offsets [{entry.begin}, {entry.end}] overlap tensor "
                                             f"{_shown(previous)!r}, which ends at {position}", file=file)
        if entry.begin > position:
            after = f"tensor {_shown(previous)!r}" if previous else "the start of the data"
            raise AdapterError(_shown(name), f"data_offsets [{entry.begin}, {entry.end}] leave a gap of "
                                             f"{entry.begin - position} bytes after {after}", file=file)
        position, previous = entry.end, name
    if position != data_bytes:
        raise _file_error(file, f"{data_bytes - position} bytes of data follow the last tensor")


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _plain(value: Any, depth: int = 0) -> str:
    """A short repr of a parsed JSON value, objects shown as dicts again; shallow, since the value may nest deeply."""
    if isinstance(value, list) and depth >= 3:
        return "..."
    more = ", ..." if isinstance(value, list) and len(value) > 8 else ""
    if isinstance(value, _JsonObject):
        return "{" + ", ".join(f"{k!r}: {_plain(v, depth + 1)}" for k, v in value[:8]) + more + "}"
    if isinstance(value, list):
        return "[" + ", ".join(_plain(v, depth + 1) for v in value[:8]) + more + "]"
    return _cut(repr(value))


def _cut(text: str) -> str:
    return text if len(text) <= _MESSAGE_CHARS else text[:_MESSAGE_CHARS] + "..."


def _shown(name: str) -> str:
    return name if len(name) <= 2 * _MESSAGE_CHARS else name[:2 * _MESSAGE_CHARS] + "..."


def _file_error(file: str, reason: str) -> AdapterError:
    return AdapterError(file, f"not a readable safetensors file: {reason}")
