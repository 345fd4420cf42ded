"""The catalog and residency over the real durable store: a pin carries the stored version's facts, the device holds
exactly the pinned version, a new version is a new key served beside the old one, an upload's parsed adapter serves
its first load from the host cache, and a corrupted blob fails only its own load."""

import json

import pytest
from safetensors.torch import save as save_safetensors

from lora_server.adapters_store import AdapterStore, full_module_name
from lora_server.engine.adapters.catalog import AdapterCatalog
from lora_server.engine.adapters.keys import AdapterKey, AdapterLoadError
from lora_server.engine.adapters.residency import Residency, ResidencyConfig
from lora_server.engine.build import describe_base_model
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
    catalog = AdapterCatalog(store)
    residency = Residency(model, catalog, ResidencyConfig(device_budget_bytes=page_budget(model, 8),
                                                          host_budget_bytes=1 << 20, num_slots=4))
    yield model, store, catalog, residency
    residency.close()
    store.close()


def test_device_holds_exactly_the_pinned_version(setup):
    model, store, catalog, residency = setup
    store.put("acme", "sql", peft_files(rank=4, seed=1))
    v1 = catalog.pin("acme", "sql").key
    slot_v1 = residency.acquire(v1).result(timeout=30)
    store.put("acme", "sql", peft_files(rank=8, seed=2))  # hot-swap: a request admitted now gets version 2
    v2 = catalog.pin("acme", "sql").key
    assert (v1.version, v2.version) == (1, 2)
    slot_v2 = residency.acquire(v2).result(timeout=30)
    assert slot_v1 != slot_v2
    assert slot_matches(model, slot_v1, store.read(store.get("acme", "sql", 1)))
    assert slot_matches(model, slot_v2, store.read(store.get("acme", "sql", 2)))
    residency.release(v1)
    residency.release(v2)


def test_corrupted_blob_fails_only_its_own_load(setup, tmp_path):
    model, store, catalog, residency = setup
    good = store.put("acme", "good", peft_files(rank=4, seed=3))
    bad = store.put("acme", "bad", peft_files(rank=4, seed=4))
    blob = next((tmp_path / "store" / "blobs").rglob(bad.weights_sha256))
    blob.write_bytes(blob.read_bytes()[:-8] + b"\x00" * 8)
    bad_key = catalog.pin("acme", "bad").key
    with pytest.raises(AdapterLoadError, match="acme/bad@1"):
        residency.acquire(bad_key).result(timeout=30)
    residency.release(bad_key)  # one release per acquire, failed or not
    key = catalog.pin("acme", "good").key
    slot = residency.acquire(key).result(timeout=30)
    assert slot_matches(model, slot, store.read(good))
    residency.release(key)


def test_a_pin_carries_the_stored_versions_facts(setup):
    _, store, catalog, _ = setup
    store.put("acme", "mixed", peft_files(rank=4, seed=5))
    record = store.put("acme", "mixed", peft_files(rank=16, seed=6))
    newest, first = catalog.pin("acme", "mixed"), catalog.pin("acme", "mixed", version=1)
    assert newest.key == AdapterKey("acme", "mixed", 2) and newest.max_rank == record.max_rank == 16
    assert first.key.version == 1 and first.max_rank == 4


def test_an_uploads_parsed_adapter_serves_its_first_load_from_the_host(setup):
    model, store, catalog, residency = setup
    record, parsed = store.put_parsed("acme", "fresh", peft_files(rank=8, seed=7))
    key = catalog.pin("acme", "fresh").key
    residency.put_on_host(key, parsed)
    slot = residency.acquire(key).result(timeout=30)
    counters = residency.counters()
    assert (counters.host_hits, counters.disk_hits) == (1, 0), "the first load parsed the files again"
    assert slot_matches(model, slot, store.read(record))  # the same weights as the stored files
    residency.release(key)
