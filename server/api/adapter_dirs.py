"""Adapters read from local directories: `serve --lora-modules NAME=PATH` at startup, and POST /v1/load_lora_adapter
from under the directories `--adapter-dirs-allowed` names.

A client-given path is checked before anything is read: no `..` component, and once resolved (symlinks followed) it
and each file read from it lie under an allowed directory, so a symlink cannot lead out of them."""

import hashlib
from collections.abc import Sequence
from pathlib import Path

from lora_server.adapters_store import AdapterStore, StoreLimits
from lora_server.adapters_store.peft_adapter import WEIGHTS_FILE
from lora_server.adapters_store.peft_config import CONFIG_FILE
from lora_server.adapters_store.store import bundle_sha256
from lora_server.api.errors import PERMISSION, ApiError, invalid_request

ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)


class AdapterDirError(ValueError):
    """A local adapter directory that cannot be read as one: missing, not a directory, a file missing or too large."""


def require_adapter_dirs(roots: Sequence[Path], param: str | None = None) -> None:
    """A 403 unless the server was started with --adapter-dirs-allowed."""
    assert all(root.is_absolute() for root in roots)
    if not roots:
        raise ApiError(403, PERMISSION, "this server loads no adapters from paths: it was started without "
                                        "--adapter-dirs-allowed", param=param, code="adapter_dirs_not_allowed")


def allowed_dir(path_text: str, roots: Sequence[Path], param: str = "lora_path") -> Path:
    """The resolved directory `path_text` names, if it lies under one of `roots` (already resolved): else a 400 (a
    `..` component, a relative path) or a 403 (outside every root, symlinks followed), naming `param`."""
    require_adapter_dirs(roots, param)
    path = Path(path_text)
    if ".." in path.parts:  # refused outright, not resolved away: a path that climbs is never what was meant
        raise invalid_request(f"{param} must not contain '..'", param=param)
    if not path.is_absolute():
        raise invalid_request(f"{param} must be an absolute path", param=param)
    resolved = path.resolve()  # strict=False: whether it exists is not told for paths outside the roots
    if not any(resolved.is_relative_to(root) for root in roots):
        raise ApiError(403, PERMISSION, f"{param} is not under a directory this server loads adapters from "
                                        "(--adapter-dirs-allowed)", param=param, code="adapter_dir_not_allowed")
    return resolved


def read_adapter_dir(path: Path, limits: StoreLimits, roots: Sequence[Path] = ()) -> dict[str, bytes]:
    """The adapter's two files, each within the store's size limits; with `roots`, each file must resolve under one
    of them (a symlinked file cannot lead out). AdapterDirError for what is not a readable adapter directory."""
    if not path.is_dir():
        raise AdapterDirError(f"{path} is not a directory")
    files = {}
    for name, limit in ((CONFIG_FILE, limits.max_config_bytes), (WEIGHTS_FILE, limits.max_file_bytes)):
        file = (path / name).resolve()
        if roots and not any(file.is_relative_to(root) for root in roots):
            raise AdapterDirError(f"{path / name} leads out of the allowed directories")
        if not file.is_file():
            raise AdapterDirError(f"{path} has no {name}")
        if file.stat().st_size > limit:
            raise AdapterDirError(f"{path / name} is over this server's limit of {limit} bytes")
        files[name] = file.read_bytes()
    return files


def is_stored(store: AdapterStore, tenant: str, adapter_id: str, files: dict[str, bytes]) -> bool:
    """Whether the adapter's newest version holds exactly these files (a restart need not store them again)."""
    versions = store.versions(tenant, adapter_id)
    if not versions:
        return False
    digests = [hashlib.sha256(files[name]).hexdigest() for name in ADAPTER_FILES]
    return versions[-1].sha256 == bundle_sha256(*digests)


def parse_lora_module(spec: str) -> tuple[str, Path]:
    """`NAME=PATH` as vLLM's --lora-modules takes it; ValueError otherwise."""
    name, sep, path = spec.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"--lora-modules takes NAME=PATH, got {spec!r}")
    return name, Path(path)
