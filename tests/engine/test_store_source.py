"""Residency reading from the real durable store: the device holds exactly the stored version, a new version is a
new key served beside the old one, and a corrupted blob fails only its own load."""

import json

import pytest
from safetensors.torch import save as save_safetensors

from adapters_store import AdapterStore, full_module_name
from server.engine.adapter_key import AdapterLoadError
from server.engine.base_description import describe_base_model
from server.engine.residency import Residency, ResidencyConfig
from server.engine.store_source import StoreAdapterSource
from tests.engine.residency_helpers import TINY, page_budget, random_adapter, slot_matches, tiny_model


def peft_files(rank: int, seed: int) -> dict[str, bytes]:
    """A random adapter written the way PEFT writes it."""
    adapter = random_adapter(rank, seed)
    tensors = {}
    for (layer, module), weights in adapter.modules.items():
        prefix = f"base_model.model.{full_module_name(layer, module)}"
        tensors[f"{prefix}.lora_A.weight"] = weights.lora_a.contiguous()
        tensors[f"{prefix}.lora_B.weight"] = weights.lora_b.contiguous()
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": "all-linear", "bias": "none"}
    return {"adapter_config.json": json.dumps(config).encode(), "adapter_model.safetensors": save_safetensors(tensors)}


@pytest.fixture
def setup(tmp_path):
    model = tiny_model()
    store = AdapterStore.open(tmp_path / "store", describe_base_model(TINY))
    source = StoreAdapterSource(store)
    residency = Residency(model, source, ResidencyConfig(device_budget_bytes=page_budget(model, 8),
                                                         host_budget_bytes=1 << 20, num_slots=4))
    yield model, store, source, residency
    residency.close()
    store.close()


def test_device_holds_exactly_the_pinned_version(setup):
    model, store, source, residency = setup
    store.put("acme", "sql", peft_files(rank=4, seed=1))
    v1 = source.latest_key("acme", "sql")
    slot_v1 = residency.acquire(v1).result(timeout=30)
    store.put("acme", "sql", peft_files(rank=8, seed=2))  # hot-swap: a request admitted now gets version 2
    v2 = source.latest_key("acme", "sql")
    assert (v1.version, v2.version) == (1, 2)
    slot_v2 = residency.acquire(v2).result(timeout=30)
    assert slot_v1 != slot_v2
    assert slot_matches(model, slot_v1, store.read(store.get("acme", "sql", 1)))
    assert slot_matches(model, slot_v2, store.read(store.get("acme", "sql", 2)))
    residency.release(v1)
    residency.release(v2)


def test_corrupted_blob_fails_only_its_own_load(setup, tmp_path):
    model, store, source, residency = setup
    good = store.put("acme", "good", peft_files(rank=4, seed=3))
    bad = store.put("acme", "bad", peft_files(rank=4, seed=4))
    blob = next((tmp_path / "store" / "blobs").rglob(bad.weights_sha256))
    blob.write_bytes(blob.read_bytes()[:-8] + b"\x00" * 8)
    bad_key = source.latest_key("acme", "bad")
    with pytest.raises(AdapterLoadError, match="acme/bad@1"):
        residency.acquire(bad_key).result(timeout=30)
    residency.release(bad_key)  # one release per acquire, failed or not
    key = source.latest_key("acme", "good")
    slot = residency.acquire(key).result(timeout=30)
    assert slot_matches(model, slot, store.read(good))
    residency.release(key)
