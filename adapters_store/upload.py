"""What a user sends to the store: a tenant, an adapter id and named files, checked before anything is parsed or
written. Ids are only ever data (SQL parameters), never parts of a path."""

import re
from collections.abc import Mapping

from adapters_store.errors import AdapterError
from adapters_store.limits import StoreLimits
from adapters_store.peft_adapter import PICKLE_SUFFIXES, WEIGHTS_FILE
from adapters_store.peft_config import CONFIG_FILE

ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,128}")
ACCEPTED_FILES = (CONFIG_FILE, WEIGHTS_FILE)


def check_id(value: str, field: str) -> None:
    """`field` is "tenant" or "adapter_id"."""
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise AdapterError(field, f"{_shown(value)} is not 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' and '-'")


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
            raise AdapterError(name, f"{len(data)} bytes is over this server's limit of {limit} bytes")
    return config_bytes, weights_bytes


def _shown(value: object) -> str:
    """A user's name as it may appear in a message: short, and quoted when it is not plainly printable."""
    text = value if isinstance(value, str) else repr(value)
    if len(text) > 64:
        text = text[:64] + "..."
    return text if text.isprintable() and text.strip() == text and text else repr(text)
