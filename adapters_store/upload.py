"""What a user sends to the store: a tenant, an adapter id and named files, checked before anything is parsed or
written. Ids are only ever data (SQL parameters), never parts of a path.

An id (a tenant's or an adapter's) matches ID_PATTERN and is not all dots; an adapter id is also not a ROUTE_WORD.
This is the one definition: the HTTP layer checks ids with `check_id` before any store access, and documents
ID_PATTERN in its OpenAPI schema."""

import re
from collections.abc import Mapping

from lora_server.adapters_store.errors import AdapterError
from lora_server.adapters_store.limits import StoreLimits
from lora_server.adapters_store.peft_adapter import PICKLE_SUFFIXES, WEIGHTS_FILE
from lora_server.adapters_store.peft_config import CONFIG_FILE
from lora_server.adapters_store.store_errors import AdapterTooLarge

# Anchored for JSON Schema's `pattern` (a search, not a full match); fullmatch here.
ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
ID_RULE = "1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-'"
# Why a store knows route words: an adapter is addressed as /v1/adapters/{adapter_id}, and an id equal to a fixed
# segment of those paths (/v1/adapters/combine, /v1/adapters/{adapter_id}/merge) would be shadowed by, or read as,
# a route. tests/api/test_edge.py checks this list against the app's routes.
ROUTE_WORDS = ("combine", "merge")
TENANT = "tenant"
ACCEPTED_FILES = (CONFIG_FILE, WEIGHTS_FILE)


def check_id(value: object, field: str) -> None:
    """Raise AdapterError naming `field` unless `value` is a valid id. `field` is "tenant" for a tenant; any other
    field ("adapter_id", "model", "sources[0].id") holds an adapter id, which also must not be a route word."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise AdapterError(field, f"{_shown(value)} is not {ID_RULE}")
    if not value.strip("."):  # "." and ".." are path segments: /v1/adapters/.. is unreachable with ordinary clients
        raise AdapterError(field, f"{value!r} is all dots: '.' and '..' are URL path segments, so ids of only dots "
                                  "are refused")
    if field != TENANT and value in ROUTE_WORDS:
        raise AdapterError(field, f"{value!r} is a fixed segment of the /v1/adapters/ routes, so not an adapter id "
                                  f"(reserved: {', '.join(ROUTE_WORDS)})")


def split_upload(files: Mapping[str, bytes], limits: StoreLimits) -> tuple[bytes, bytes]:
    """(config bytes, weights bytes) of an upload holding exactly the two PEFT files, each within its size limit."""
    for name in sorted(files, key=str):
        if name in ACCEPTED_FILES:
            continue
        if isinstance(name, str) and name.endswith(PICKLE_SUFFIXES):
            raise AdapterError(_shown(name), "pickle weight files are refused (loading one can run code); save the "
                                             f"adapter with safe_serialization=True to get {WEIGHTS_FILE}")
        raise AdapterError(_shown(name), f"unexpected file: an upload holds only {CONFIG_FILE} and {WEIGHTS_FILE}")
    for name in ACCEPTED_FILES:
        if name not in files:
            raise AdapterError(name, "missing from the upload")
    config_bytes, weights_bytes = files[CONFIG_FILE], files[WEIGHTS_FILE]
    assert isinstance(config_bytes, bytes) and isinstance(weights_bytes, bytes), "the API layer hands over bytes"
    for name, data, limit in ((CONFIG_FILE, config_bytes, limits.max_config_bytes),
                              (WEIGHTS_FILE, weights_bytes, limits.max_file_bytes)):
        if len(data) > limit:
            raise AdapterTooLarge(name, f"{len(data)} bytes is over this server's limit of {limit} bytes")
    return config_bytes, weights_bytes


def _shown(value: object) -> str:
    """A user's name as it may appear in a message: short, and quoted when it is not plainly printable."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > 64:
        text = text[:64] + "..."
    return text if text.isprintable() and text.strip() == text and text else repr(text)
