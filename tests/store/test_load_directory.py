"""Reading an adapter directory: the two PEFT files are read, README.md and the like are ignored, missing files are
named, and pickle checkpoints are refused without ever being opened."""

import pytest
import torch

from lora_server.adapters_store import AdapterError, load_peft_adapter
from tests.store.peft_helpers import CONFIG_FILE, WEIGHTS_FILE, describe, make_adapter, tiny_llama

# A pickle that runs code when unpickled; refusing it by name means it is never opened.
EVIL_PICKLE = b"\x80\x04cos\nsystem\n(S'echo pwned'\ntR."


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    model = tiny_llama(seed=3)
    path = tmp_path_factory.mktemp("adapter")
    make_adapter(model, path, seed=4, r=2, lora_alpha=4, target_modules=["q_proj", "down_proj"])
    return describe(model), (path / CONFIG_FILE).read_bytes(), (path / WEIGHTS_FILE).read_bytes()


@pytest.fixture(autouse=True)
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("torch.load must never be called on a user's adapter")
    monkeypatch.setattr(torch, "load", refuse)


def write(directory, files: dict[str, bytes]):
    for name, content in files.items():
        (directory / name).write_bytes(content)
    return directory


def test_peft_directory_loads_and_other_files_are_ignored(saved, tmp_path):
    base, config, weights = saved
    write(tmp_path, {CONFIG_FILE: config, WEIGHTS_FILE: weights, "README.md": b"# model card", "notes.txt": b"x",
                     "adapter_model.bin": EVIL_PICKLE})  # beside a safetensors file, a pickle is simply not read
    adapter = load_peft_adapter(str(tmp_path), base)
    assert set(adapter.modules) == {(0, "q_proj"), (0, "down_proj"), (1, "q_proj"), (1, "down_proj")}


@pytest.mark.parametrize("name", ["adapter_model.bin", "pytorch_model.bin", "adapter.pt", "adapter.pth",
                                  "weights.pkl", "last.ckpt"])
def test_pickle_checkpoint_is_refused(name, saved, tmp_path):
    base, config, _ = saved
    write(tmp_path, {CONFIG_FILE: config, name: EVIL_PICKLE})
    with pytest.raises(AdapterError, match=f"^{name}: pickle weight files are refused"):
        load_peft_adapter(tmp_path, base)


def test_missing_weights_are_named(saved, tmp_path):
    base, config, _ = saved
    write(tmp_path, {CONFIG_FILE: config, "README.md": b""})
    with pytest.raises(AdapterError, match=f"^{WEIGHTS_FILE}: missing"):
        load_peft_adapter(tmp_path, base)


def test_missing_config_is_named(saved, tmp_path):
    base, _, weights = saved
    write(tmp_path, {WEIGHTS_FILE: weights})
    with pytest.raises(AdapterError, match=f"^{CONFIG_FILE}: missing"):
        load_peft_adapter(tmp_path, base)


def test_not_a_directory_is_refused(saved, tmp_path):
    with pytest.raises(AdapterError, match="not a directory"):
        load_peft_adapter(tmp_path / "nowhere", saved[0])
