"""The repository's blob collector: it removes the blobs only deleted versions name, once untouched for the grace
period, and never one a live version or an upload in flight needs, whichever step of the collection the upload
lands in; a collector killed midway loses nothing; the CLI entry point."""

import os
import random
import time

import pytest

from lora_server.adapters_store.blobs import sha256_hex
from lora_server.adapters_store.registry import READY, AdapterVersion
from lora_server.adapters_store.repository import AdapterRepository
from lora_server.adapters_store.repository_gc import main as gc_main

GRACE_S = 600.0
LONG_AGO = time.time() - 10 * GRACE_S


@pytest.fixture
def repository(tmp_path):
    return AdapterRepository.open(tmp_path / "repository")


@pytest.fixture
def rng():
    seed = random.randrange(1 << 30)
    print(f"seed {seed}")  # shown on failure
    return random.Random(seed)


def _put(repository: AdapterRepository, adapter_id: str, *contents: bytes) -> AdapterVersion:
    """An upload as a server makes it: blobs first, then the entry naming them."""
    config_sha, weights_sha = repository.write_blobs(*contents)
    return repository.append(AdapterVersion("acme", adapter_id, 0, time.time(), weights_sha, config_sha, weights_sha,
                                            (4,), 2, "base", READY))


def _age(repository: AdapterRepository, *shas: str) -> None:
    for sha in shas:
        os.utime(repository.blobs.path(sha), (LONG_AGO, LONG_AGO))


def _readable(repository: AdapterRepository, sha: str) -> bool:
    data = repository.read_blob(sha)
    return data is not None and sha256_hex(data) == sha


def test_only_blobs_of_deleted_versions_untouched_for_the_grace_period_go(repository, rng):
    shared, gone, kept, fresh = (rng.randbytes(64) for _ in range(4))
    live = _put(repository, "live", shared, kept)
    dead = _put(repository, "dead", shared, gone)  # shares a blob with a live version
    repository.delete("acme", "dead")
    _age(repository, *live.blob_hashes, *dead.blob_hashes)
    young = _put(repository, "young", fresh, rng.randbytes(64))
    repository.delete("acme", "young")  # orphans too, but touched within the grace period
    assert repository.collect_orphan_blobs(GRACE_S) == [sha256_hex(gone)]
    assert all(_readable(repository, sha) for sha in (*live.blob_hashes, *young.blob_hashes))
    assert not repository.blobs.path(sha256_hex(gone)).exists()
    assert repository.collect_orphan_blobs(GRACE_S) == []  # nothing left to do
    assert list(repository.collecting_dir.iterdir()) == []


def test_an_upload_of_orphaned_content_during_a_collection_keeps_its_blob(repository, rng, monkeypatch):
    """The upload lands in each window of the collection in turn: before the candidates are moved aside (its touch
    makes the moved blob fresh: it goes back), and after (the blob is gone: write_blobs writes it anew)."""
    for window in ("orphan_blobs", "_live_blobs"):
        content, other = rng.randbytes(64), rng.randbytes(64)
        old = _put(repository, f"old-{window}", content, other)
        repository.delete("acme", f"old-{window}")
        _age(repository, *old.blob_hashes)
        uploaded = []
        original = getattr(AdapterRepository, window)

        def upload_meanwhile(self, *args, original=original, content=content, window=window, uploaded=uploaded):
            result = original(self, *args)
            if not uploaded:  # once: the upload of the same content, by another server, lands here
                uploaded.append(_put(AdapterRepository.open(self.root), f"new-{window}", content, rng.randbytes(64)))
            return result

        monkeypatch.setattr(AdapterRepository, window, upload_meanwhile)
        removed = repository.collect_orphan_blobs(GRACE_S)
        monkeypatch.undo()
        assert sha256_hex(content) not in removed, window
        assert all(_readable(repository, sha) for sha in uploaded[0].blob_hashes), window
        assert sha256_hex(other) in removed, window  # the rest of the deleted version still goes


def test_a_collector_killed_midway_loses_nothing(repository, rng):
    live_content, dead_content = rng.randbytes(64), rng.randbytes(64)
    live = _put(repository, "live", live_content, rng.randbytes(8))
    dead = _put(repository, "dead", dead_content, rng.randbytes(8))
    repository.delete("acme", "dead")
    _age(repository, *live.blob_hashes, *dead.blob_hashes)
    # As a collector killed right after moving its candidates leaves things, plus a live blob it had moved as a
    # candidate just before an upload named it.
    repository.collecting_dir.mkdir()
    for sha in (*dead.blob_hashes, live.weights_sha256):
        os.rename(repository.blobs.path(sha), repository.collecting_dir / sha)
    assert repository.collect_orphan_blobs(GRACE_S) == sorted(dead.blob_hashes)
    assert all(_readable(repository, sha) for sha in live.blob_hashes)
    assert list(repository.collecting_dir.iterdir()) == []


def test_the_cli_lists_on_a_dry_run_and_collects_otherwise(repository, rng, caplog):
    dead = _put(repository, "dead", rng.randbytes(64), rng.randbytes(64))
    repository.delete("acme", "dead")
    _age(repository, *dead.blob_hashes)
    caplog.set_level("INFO")
    assert gc_main([str(repository.root), "--dry-run"]) == 0
    assert all(_readable(repository, sha) for sha in dead.blob_hashes)
    assert "2 orphan blobs would be removed" in caplog.text
    assert gc_main([str(repository.root), "--grace-seconds", str(GRACE_S)]) == 0
    assert not any(repository.blobs.path(sha).exists() for sha in dead.blob_hashes)
    assert "2 orphan blobs removed" in caplog.text
