"""The shared adapter repository: two servers' stores (caches) on one repository see each other's uploads, hot swaps
and deletes; concurrent appends from two processes get one version each, in order; a reader never sees a partial
version; a corrupted blob is refused; SIGKILL of an uploader leaves no partial version; restart recovery."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pytest

from lora_server.adapters_store import DELETED, READY, UNUSABLE, AdapterNotFound, AdapterStore, AdapterUnusable
from lora_server.adapters_store.blobs import sha256_hex
from lora_server.adapters_store.repository import AdapterRepository, RepositoryError
from tests.store.peft_helpers import WEIGHTS_FILE
from tests.store.store_helpers import peft_upload, variant

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def upload(tmp_path_factory):
    base, files = peft_upload(tmp_path_factory.mktemp("adapter"), target_modules=["q_proj", "v_proj"])
    return base, [files, variant(files, 0.5), variant(files, -0.25)]


@pytest.fixture
def repository(tmp_path):
    return AdapterRepository.open(tmp_path / "repository")


@pytest.fixture
def two_servers(upload, repository, tmp_path):
    """Two stores, as two servers' caches, on one repository."""
    with AdapterStore.open(tmp_path / "a", upload[0], repository=repository) as a, \
            AdapterStore.open(tmp_path / "b", upload[0], repository=AdapterRepository.open(repository.root)) as b:
        yield a, b


# ---- two servers, one source of truth ------------------------------------------------------------------------------

def test_an_upload_on_one_server_is_served_by_the_other(two_servers, upload):
    a, b = two_servers
    first, second, _ = upload[1]
    one = a.put("acme", "bot", first)
    assert b.get("acme", "bot") == one  # same number, hash, ranks, time: one record
    with b.held(one):
        assert b.read_files(one) == first  # pulled, verified, kept in b's own blobs
    two = b.put("acme", "bot", second)  # b numbers it after a's version 1
    assert two.version == 2 and a.get("acme", "bot") == two  # a hot swap reaches a
    assert a.get("acme", "bot", version=1) == one  # pinning still works
    assert [r.version for r in a.versions("acme", "bot")] == [1, 2] == [r.version for r in b.versions("acme", "bot")]
    assert [r.adapter_id for r in b.list_adapters("acme")] == ["bot"]


def test_tenants_stay_apart_even_when_ids_differ_only_by_case(two_servers, upload):
    a, b = two_servers
    a.put("Acme", "bot", upload[1][0])
    for tenant in ("acme", "other"):
        with pytest.raises(AdapterNotFound):
            b.get(tenant, "bot")
        assert b.list_adapters(tenant) == []
    assert b.get("Acme", "bot").version == 1


def test_a_delete_on_one_server_reaches_the_other_and_numbers_are_never_reused(two_servers, upload):
    a, b = two_servers
    first, second, third = upload[1]
    a.put("acme", "bot", first)
    held = b.put("acme", "bot", second)
    assert b.get("acme", "bot") == held
    b.hold(held)  # a request on b is using version 2
    deleted = a.delete("acme", "bot")
    assert [r.version for r in deleted] == [1, 2]
    for store in (a, b):
        with pytest.raises(AdapterNotFound):
            store.get("acme", "bot")
        with pytest.raises(AdapterNotFound):
            store.get("acme", "bot", version=1)
    assert b.read_files(held)[WEIGHTS_FILE] == second[WEIGHTS_FILE]  # the holder still reads its files
    b.release(held)
    with pytest.raises(AdapterNotFound):
        b.delete("acme", "bot")  # already deleted, by a
    assert a.put("acme", "bot", third).version == 3
    assert b.get("acme", "bot").version == 3
    assert {r.version: r.state for r in b.rows()} == {1: DELETED, 2: DELETED, 3: READY}


def test_concurrent_puts_of_one_id_on_two_servers_get_distinct_versions(two_servers, upload):
    a, b = two_servers
    results: dict[str, list[int]] = {"a": [], "b": []}

    def put_many(store, name):
        for files in upload[1]:
            results[name].append(store.put("acme", "bot", files).version)

    threads = [threading.Thread(target=put_many, args=(store, name)) for store, name in ((a, "a"), (b, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(results["a"] + results["b"]) == list(range(1, 7))
    assert all(versions == sorted(versions) for versions in results.values())
    assert [r.version for r in a.versions("acme", "bot")] == list(range(1, 7))
    assert a.rows() == b.rows()


# ---- processes: concurrency and SIGKILL ----------------------------------------------------------------------------

def _worker(root: Path, name: str, num_appends: int, go_file: Path, blob_bytes: int = 64) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "tests.store.repository_worker", str(root), name, str(num_appends),
                             str(go_file), str(blob_bytes)], cwd=REPO_ROOT, stdout=subprocess.PIPE, text=True)


def _check_whole(repository: AdapterRepository) -> list[int]:
    """Every visible version of acme/bot is whole: its entry parses and its blob verifies. Returns the versions."""
    listing = repository.listing("acme", "bot")
    for version in listing:
        record = repository.entry("acme", "bot", version)
        assert record.state == READY, record
        data = repository.read_blob(record.sha256)
        assert data is not None and sha256_hex(data) == record.sha256, version
    return list(listing)


@pytest.mark.slow  # two interpreters importing torch: a few seconds
def test_two_processes_appending_one_id_get_exactly_one_version_each_in_order(repository, tmp_path):
    go_file, num_appends = tmp_path / "go", 25
    workers = {name: _worker(repository.root, name, num_appends, go_file) for name in ("p", "q")}
    go_file.touch()  # both start at once
    got = {name: json.loads(worker.communicate(timeout=120)[0]) for name, worker in workers.items()}
    assert all(worker.returncode == 0 for worker in workers.values())
    assert sorted(got["p"] + got["q"]) == list(range(1, 2 * num_appends + 1))  # no gap, no duplicate
    for name, versions in got.items():
        assert versions == sorted(versions), name  # each uploader's versions rise
        for version in versions:  # the entry under each number is the one its uploader got it for
            assert repository.entry("acme", "bot", version).base_fingerprint == name
    assert _check_whole(repository) == list(range(1, 2 * num_appends + 1))


@pytest.mark.slow
def test_a_reader_during_a_writer_and_sigkill_of_the_writer_never_see_a_partial_version(repository, tmp_path):
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    go_file = tmp_path / "go"
    go_file.touch()
    writer = _worker(repository.root, "w", 0, go_file, blob_bytes=1 << 18)  # appends until killed
    try:
        seen: list[int] = []
        deadline = time.monotonic() + 60
        while len(seen) < 5:  # read while it writes: every version seen is whole, and the list only grows
            assert time.monotonic() < deadline, "the writer made no progress"
            versions = _check_whole(repository)
            assert versions[:len(seen)] == seen, f"seed {seed}"
            seen = versions
        time.sleep(rng.uniform(0, 0.05))  # somewhere in an upload: writing a blob, an entry, or linking it
    finally:
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
    versions = _check_whole(repository)
    assert versions == list(range(1, len(versions) + 1)), f"seed {seed}"
    # Restart: what the killed writer left in tmp/ is removed once stale, and the next upload takes the next number.
    repository.clear_stale_tmp(older_than_s=0)
    assert list(repository.blobs.tmp_dir.iterdir()) == []
    (sha,) = repository.write_blobs(b"after")
    record = repository.entry("acme", "bot", versions[-1])
    next_record = repository.append(replace(record, sha256=sha, config_sha256=sha, weights_sha256=sha))
    assert next_record.version == versions[-1] + 1, f"seed {seed}"


# ---- damage and recovery -------------------------------------------------------------------------------------------

def test_a_corrupted_repository_blob_is_refused_and_an_upload_again_heals(two_servers, upload):
    a, b = two_servers
    files = upload[1][0]
    record = a.put("acme", "bot", files)
    path = a.repository.blobs.path(record.weights_sha256)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(AdapterUnusable):
        b.get("acme", "bot")  # b pulls it, the checksum fails: refused, never served
    assert not path.exists() and list(a.repository.blobs.quarantine_dir.iterdir())  # moved aside
    assert [r.state for r in b.versions("acme", "bot")] == [UNUSABLE]
    again = a.put("acme", "bot", files)  # writes the blob anew
    assert b.get("acme", "bot") == again and b.read_files(again) == files


def test_a_corrupt_log_entry_makes_its_version_unusable_and_keeps_its_number(two_servers, upload, repository):
    a, b = two_servers
    record = a.put("acme", "bot", upload[1][0])
    entry = next(repository.log_dir.glob("*/*/0000000001.json"))
    entry.write_bytes(entry.read_bytes()[:10])
    with pytest.raises(AdapterUnusable):
        b.get("acme", "bot")
    assert a.get("acme", "bot") == record  # a keeps its verified copy of what it stored
    assert b.put("acme", "bot", upload[1][1]).version == 2


def test_restart_and_a_lost_cache_recover_from_the_repository(upload, repository, tmp_path):
    base, (first, second, _) = upload
    with AdapterStore.open(tmp_path / "a", base, repository=repository) as a:
        one, two = a.put("acme", "bot", first), a.put("acme", "bot", second)
        a.delete("acme", "bot", version=1)
    (repository.blobs.tmp_dir / "dead-writer.tmp").write_bytes(b"partial")
    os.utime(repository.blobs.tmp_dir / "dead-writer.tmp", (0, 0))  # as old as a writer that died long ago
    reopened = AdapterRepository.open(repository.root)
    assert list(reopened.blobs.tmp_dir.iterdir()) == []
    with AdapterStore.open(tmp_path / "a", base, repository=reopened) as a:  # the same cache, after a restart
        assert a.get("acme", "bot") == two
    with AdapterStore.open(tmp_path / "fresh", base, repository=reopened) as fresh:  # a new machine, empty disk
        assert fresh.get("acme", "bot") == two and fresh.read_files(two) == second
        with pytest.raises(AdapterNotFound):
            fresh.get("acme", "bot", version=1)
    assert one.version == 1


def test_a_cache_must_belong_to_its_repository(upload, repository, tmp_path):
    base, (first, _, _) = upload
    with AdapterStore.open(tmp_path / "standalone", base) as alone:
        alone.put("acme", "bot", first)
    with pytest.raises(RepositoryError, match="holds adapters of its own"):
        AdapterStore.open(tmp_path / "standalone", base, repository=repository)
    AdapterStore.open(tmp_path / "cache", base, repository=repository).close()
    other = AdapterRepository.open(tmp_path / "other-repository")
    with pytest.raises(RepositoryError, match="caches another adapter repository"):
        AdapterStore.open(tmp_path / "cache", base, repository=other)
