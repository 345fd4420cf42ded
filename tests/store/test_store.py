"""AdapterStore: put/get/list/versions, tenants, deferred deletion under holds, recovery at open, quarantine of blobs
that fail their checksum, and concurrent puts."""

import threading

import pytest
import torch

from lora_server.adapters_store import (
    DELETED,
    READY,
    UNUSABLE,
    AdapterNotFound,
    AdapterStore,
    AdapterUnusable,
    StoreLimits,
    StoreLocked,
    parse_peft_adapter,
)
from tests.store.peft_helpers import CONFIG_FILE, WEIGHTS_FILE
from tests.store.store_helpers import blob_path, disk_files, peft_upload, variant


@pytest.fixture(scope="module")
def upload(tmp_path_factory):
    """The base description and three uploads of the same adapter shape with different weights."""
    base, files = peft_upload(tmp_path_factory.mktemp("adapter"), target_modules=["q_proj", "v_proj"])
    return base, [files, variant(files, 0.5), variant(files, -0.25)]


@pytest.fixture
def store(upload, tmp_path):
    with AdapterStore.open(tmp_path / "store", upload[0]) as store:
        yield store


def reopen(store: AdapterStore, **kwargs) -> AdapterStore:
    store.close()
    return AdapterStore.open(store.root, store.base, **kwargs)


def blob_names(store: AdapterStore) -> set[str]:
    return {path.name for path in (store.root / "blobs").glob("*/*")}


# ---- put, get, versions, list --------------------------------------------------------------------------------------

def test_put_twice_makes_versions_one_and_two(store, upload):
    base, (first, second, _) = upload
    one, two = store.put("acme", "bot", first), store.put("acme", "bot", second)
    assert (one.version, two.version) == (1, 2) and one.state == two.state == READY
    assert store.get("acme", "bot") == two  # the latest: a hot swap to version 2
    assert store.get("acme", "bot", version=1) == one  # version 1 still served until deleted
    assert [r.version for r in store.versions("acme", "bot")] == [1, 2]
    assert one.ranks == (4,) and one.num_bytes == len(first[CONFIG_FILE]) + len(first[WEIGHTS_FILE])
    assert store.read_files(one) == first and store.read_files(two) == second
    adapter, expected = store.read(one), parse_peft_adapter(first[CONFIG_FILE], first[WEIGHTS_FILE], base)
    assert adapter.modules.keys() == expected.modules.keys()
    for key, weights in adapter.modules.items():
        assert torch.equal(weights.lora_a, expected.modules[key].lora_a)
        assert torch.equal(weights.lora_b, expected.modules[key].lora_b)
        assert weights.scale == expected.modules[key].scale


def test_put_parsed_returns_the_adapter_a_read_gives(store, upload):
    files = upload[1][1]
    record, parsed = store.put_parsed("acme", "warm", files)
    assert record == store.get("acme", "warm") and record.ranks == tuple(parsed.ranks)
    stored = store.read(record)
    assert parsed.modules.keys() == stored.modules.keys() and parsed.config == stored.config
    for key, weights in parsed.modules.items():
        assert torch.equal(weights.lora_a, stored.modules[key].lora_a)
        assert torch.equal(weights.lora_b, stored.modules[key].lora_b)
        assert weights.scale == stored.modules[key].scale


def test_identical_content_is_stored_once(store, upload):
    files = upload[1][0]
    one, two = store.put("acme", "a", files), store.put("beta", "b", files)
    assert one.sha256 == two.sha256 and blob_names(store) == {one.config_sha256, one.weights_sha256}
    assert one.sha256 != store.put("acme", "c", upload[1][1]).sha256


def test_list_gives_the_latest_version_of_each_adapter(store, upload):
    first, second, third = upload[1]
    store.put("acme", "b", first)
    store.put("acme", "a", first)
    store.put("acme", "a", second)
    store.put("other", "z", third)
    assert [(r.adapter_id, r.version) for r in store.list_adapters("acme")] == [("a", 2), ("b", 1)]
    assert store.list_adapters("nobody") == []
    assert store.num_versions() == 4


def test_missing_adapter_or_version_is_not_found(store, upload):
    store.put("acme", "bot", upload[1][0])
    for args in [("acme", "other"), ("acme", "bot", 2), ("acme", "../bot"), ("", "")]:
        with pytest.raises(AdapterNotFound, match="tenant .* has no adapter"):
            store.get(*args)


def test_another_tenants_adapter_is_exactly_not_found(store, upload):
    store.put("acme", "bot", upload[1][0])
    with pytest.raises(AdapterNotFound) as theirs:
        store.get("beta", "bot")
    with pytest.raises(AdapterNotFound) as never:
        store.get("beta", "never-uploaded")
    assert str(theirs.value) == str(never.value).replace("never-uploaded", "bot")
    assert store.list_adapters("beta") == [] and store.versions("beta", "bot") == []
    with pytest.raises(AdapterNotFound):
        store.delete("beta", "bot")
    assert store.get("acme", "bot").version == 1


def test_other_base_models_versions_are_not_served(store, upload):
    store.put("acme", "bot", upload[1][0])
    store = reopen(store, base_fingerprint="checkpoint:other")
    with pytest.raises(AdapterNotFound):
        store.get("acme", "bot")
    assert store.list_adapters("acme") == [] and store.put("acme", "bot", upload[1][1]).version == 2
    store = reopen(store)  # back to the default fingerprint, from the base's shapes
    assert store.get("acme", "bot").version == 1
    store.close()


# ---- deletion and holds --------------------------------------------------------------------------------------------

def test_delete_removes_versions_and_their_blobs(store, upload):
    one = store.put("acme", "bot", upload[1][0])
    store.put("acme", "bot", upload[1][1])
    assert [r.version for r in store.delete("acme", "bot")] == [1, 2]
    with pytest.raises(AdapterNotFound):
        store.get("acme", "bot")
    with pytest.raises(AdapterNotFound):
        store.get("acme", "bot", version=1)
    with pytest.raises(AdapterNotFound):
        store.read(one)
    assert store.list_adapters("acme") == [] and blob_names(store) == set()
    assert {r.state for r in store.rows()} == {DELETED}
    assert store.put("acme", "bot", upload[1][0]).version == 3  # a version number never means two contents


def test_delete_one_version(store, upload):
    store.put("acme", "bot", upload[1][0])
    two = store.put("acme", "bot", upload[1][1])
    store.delete("acme", "bot", version=2)
    assert store.get("acme", "bot").version == 1
    assert two.weights_sha256 not in blob_names(store)
    with pytest.raises(AdapterNotFound, match="version 2"):
        store.delete("acme", "bot", version=2)


def test_delete_waits_for_the_last_holder(store, upload):
    one = store.put("acme", "bot", upload[1][0])
    store.hold(one)
    store.hold(one)
    store.delete("acme", "bot")
    with pytest.raises(AdapterNotFound):
        store.get("acme", "bot")
    with pytest.raises(AdapterNotFound):
        store.hold(one)  # a new request cannot pick up a deleted version
    assert store.read_files(one) == upload[1][0]  # the requests already holding it still read it
    store.release(one)
    assert store.num_holds(one) == 1 and store.read(one)
    store.release(one)
    assert store.num_holds(one) == 0 and blob_names(store) == set()


def test_delete_keeps_blobs_another_version_shares(store, upload):
    files = upload[1][0]
    one, other = store.put("acme", "bot", files), store.put("beta", "copy", files)
    with store.held(one):
        store.delete("acme", "bot")
    assert blob_names(store) == set(other.blob_hashes) and store.read_files(other) == files


def test_put_after_delete_of_identical_content_rewrites_its_blobs(store, upload):
    files = upload[1][0]
    store.put("acme", "bot", files)
    store.delete("acme", "bot")
    record = store.put("acme", "bot", files)
    assert set(record.blob_hashes) == blob_names(store) and store.read_files(record) == files


# ---- recovery at open and quarantine -------------------------------------------------------------------------------

def test_open_clears_temp_files_and_orphan_blobs(store, upload):
    record = store.put("acme", "bot", upload[1][0])
    (store.root / "tmp" / "crashed.tmp").write_bytes(b"half a blob")
    orphan = "ab" * 32
    blob_path(store, orphan).parent.mkdir(exist_ok=True)
    blob_path(store, orphan).write_bytes(b"a blob whose row never committed")
    store = reopen(store)
    assert store.recovery.num_tmp_removed == 1 and store.recovery.num_orphans_removed == 1
    assert blob_names(store) == set(record.blob_hashes) and not list((store.root / "tmp").iterdir())
    assert store.read_files(record) == upload[1][0]
    store.close()


def corrupt(path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


def test_blob_failing_its_checksum_at_open_is_quarantined(store, upload, caplog):
    one = store.put("acme", "bot", upload[1][0])
    two = store.put("acme", "bot", upload[1][1])
    corrupt(blob_path(store, two.weights_sha256))
    store = reopen(store)
    assert store.recovery.num_blobs_quarantined == 1 and store.recovery.num_versions_unusable == 1
    assert "acme/bot version 2 is unusable" in caplog.text
    with pytest.raises(AdapterUnusable, match="version 2 is unusable: its stored files failed their checksum"):
        store.get("acme", "bot", version=2)
    with pytest.raises(AdapterUnusable):
        store.get("acme", "bot")  # the latest upload is damaged: say so rather than serve version 1 silently
    assert store.get("acme", "bot", version=1) == one and store.read(one)
    assert [r.state for r in store.versions("acme", "bot")] == [READY, UNUSABLE]
    assert [p.name.split(".")[0] for p in (store.root / "quarantine").iterdir()] == [two.weights_sha256]
    assert store.put("acme", "bot", upload[1][1]).version == 3  # uploading it again heals it
    store.close()


def test_missing_blob_at_open_makes_its_version_unusable(store, upload):
    record = store.put("acme", "bot", upload[1][0])
    blob_path(store, record.config_sha256).unlink()
    store = reopen(store)
    assert store.recovery.num_blobs_missing == 1
    with pytest.raises(AdapterUnusable):
        store.get("acme", "bot")
    assert blob_names(store) == set()  # its weights blob served nothing else
    store.close()


def test_blob_failing_its_checksum_at_read_is_quarantined(store, upload):
    one = store.put("acme", "bot", upload[1][0])
    shared = store.put("beta", "same-content", upload[1][0])
    other = store.put("acme", "other", upload[1][1])
    corrupt(blob_path(store, one.weights_sha256))
    with pytest.raises(AdapterUnusable):
        store.read(one)
    for record in (one, shared):  # both were stored in the bad blob
        with pytest.raises(AdapterUnusable):
            store.get(record.tenant, record.adapter_id)
    with pytest.raises(AdapterUnusable):
        store.hold(one)
    assert store.read_files(other) == upload[1][1]
    assert len(list((store.root / "quarantine").iterdir())) == 1


def test_a_second_open_of_the_same_root_is_refused(store, upload):
    with pytest.raises(StoreLocked):
        AdapterStore.open(store.root, upload[0])


def test_limits_are_validated():
    for bad in (dict(max_rank=0), dict(max_file_bytes=-1), dict(max_config_bytes=True), dict(max_header_bytes=1.5)):
        with pytest.raises(ValueError, match="StoreLimits"):
            StoreLimits(**bad)


# ---- concurrency ---------------------------------------------------------------------------------------------------

def test_concurrent_puts_number_versions_densely(store, upload):
    uploads = upload[1]
    errors = []

    def put_many(worker: int) -> None:
        try:
            for n in range(4):
                store.put("acme", "shared" if worker < 2 else f"own-{worker}", uploads[(worker + n) % 3])
        except Exception as error:  # surfaced below: an exception in a thread would otherwise vanish
            errors.append(error)

    threads = [threading.Thread(target=put_many, args=(worker,)) for worker in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    assert [r.version for r in store.versions("acme", "shared")] == list(range(1, 9))
    assert [r.version for r in store.versions("acme", "own-3")] == [1, 2, 3, 4]
    assert set(disk_files(store.root / "blobs").values()) == set(blob_names(store))  # every blob whole
