"""Uploads and snapshots for the adapter store tests. Uploads are PEFT adapters on the tiny Llama, made once per
module; variants change values, never shapes, so each is still a good adapter."""

import hashlib
from pathlib import Path

from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from lora_server.adapters_store import AdapterStore, BaseModelDescription
from tests.store.peft_helpers import CONFIG_FILE, WEIGHTS_FILE, describe, make_adapter, tiny_llama

STORE_ONLY_FILES = ("registry.sqlite3", "registry.sqlite3-wal", "registry.sqlite3-shm", "lock")


def peft_upload(directory: Path, seed: int = 11, **lora_kwargs) -> tuple[BaseModelDescription, dict[str, bytes]]:
    """The tiny Llama's description and a PEFT adapter on it (rank 4, all-linear unless told), as an upload."""
    model = tiny_llama(seed=seed)
    make_adapter(model, directory, seed=seed + 1, **{"r": 4, "lora_alpha": 8, "target_modules": "all-linear",
                                                      **lora_kwargs})
    return describe(model), {name: (directory / name).read_bytes() for name in (CONFIG_FILE, WEIGHTS_FILE)}


def variant(files: dict[str, bytes], value: float) -> dict[str, bytes]:
    """The same adapter with one weight set to `value`: new weights content, same config."""
    tensors = load_safetensors(files[WEIGHTS_FILE])
    key = sorted(tensors)[0]
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = value
    return {**files, WEIGHTS_FILE: save_safetensors(tensors)}


def blob_path(store: AdapterStore, sha: str) -> Path:
    return store.root / "blobs" / sha[:2] / sha


def disk_files(root: Path) -> dict[str, str]:
    """Relative path -> sha256 of every file the store keeps besides the registry itself."""
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file() and path.name not in STORE_ONLY_FILES}


def snapshot(store: AdapterStore) -> tuple:
    """Everything a refused upload must leave unchanged: every row, and every blob, temp and quarantined file."""
    return store.rows(), disk_files(store.root)
