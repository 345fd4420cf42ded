"""The adapter store: validated uploads, kept durably by content hash, found by (tenant, adapter id, version).

    store = AdapterStore.open(root, base)
    record = store.put("acme", "support-bot", {"adapter_config.json": ..., "adapter_model.safetensors": ...})
    record = store.get("acme", "support-bot")          # the latest version; get(..., version=1) for another
    with store.held(record):                           # a delete waits for the last holder before removing files
        adapter = store.read(record)                   # LoraAdapter, checksum verified

Layout under root: `registry.sqlite3` (rows), `blobs/ab/abcd...` (each file of each version, by sha256), `tmp/`
(writes in flight), `quarantine/` (blobs that failed a checksum), `lock` (one open store per root).

A put validates fully, then writes its two blobs durably, then commits the row: a crash at any point leaves either
the whole version or none of it visible (open() clears what a crash left behind; see recovery.py).
A get only sees versions made for this store's base model (`base_fingerprint`); others read as not found.

With a shared repository (`open(..., repository=AdapterRepository.open(dir))`, see repository.py) the repository is the
source of truth and this store its verified cache: a put appends to the repository's log (which numbers the version)
before its local row, and every lookup first pulls what that adapter's log has that the cache lacks (one directory
read when nothing changed), so a version another server stored is served here once its upload has answered."""

import fcntl
import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from lora_server.adapters_store.base_model import BaseModelDescription
from lora_server.adapters_store.blobs import BlobStore, sha256_hex
from lora_server.adapters_store.limits import StoreLimits
from lora_server.adapters_store.lora_adapter import LoraAdapter
from lora_server.adapters_store.peft_adapter import WEIGHTS_FILE, parse_peft_adapter
from lora_server.adapters_store.peft_config import CONFIG_FILE
from lora_server.adapters_store.recovery import RecoveryReport, recover
from lora_server.adapters_store.registry import DELETED, READY, UNUSABLE, AdapterVersion, Registry
from lora_server.adapters_store.repository import AdapterRepository
from lora_server.adapters_store.repository_cache import claim_cache, pull
from lora_server.adapters_store.store_errors import AdapterNotFound, AdapterUnusable, StoreLocked
from lora_server.adapters_store.upload import check_id, split_upload

logger = logging.getLogger(__name__)

REGISTRY_FILE = "registry.sqlite3"


def base_fingerprint_of(base: BaseModelDescription) -> str:
    """A fingerprint of the shapes an adapter is validated against; the server may pass a stricter one (the base
    checkpoint's hash) to AdapterStore.open instead."""
    shapes = {"num_layers": base.num_layers, "module_shapes": sorted(base.module_shapes.items())}
    return "shapes:" + hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16]


def bundle_sha256(config_sha256: str, weights_sha256: str) -> str:
    """One hash for a version's content: sha256 over its two files' hashes, in a fixed order."""
    return hashlib.sha256(f"{CONFIG_FILE}:{config_sha256}\n{WEIGHTS_FILE}:{weights_sha256}\n".encode()).hexdigest()


class AdapterStore:
    def __init__(self, root: Path, base: BaseModelDescription, limits: StoreLimits, base_fingerprint: str,
                 lock_fd: int, blobs: BlobStore, registry: Registry, recovery: RecoveryReport,
                 repository: AdapterRepository | None = None) -> None:
        """Use AdapterStore.open."""
        self.root, self.base, self.limits, self.base_fingerprint = root, base, limits, base_fingerprint
        self.recovery = recovery  # what open() repaired
        self._lock_fd, self._blobs, self._registry = lock_fd, blobs, registry
        self.repository = repository
        self._synced: dict[tuple[str, str], dict[int, bool]] = {}  # the repository listing each adapter last had
        # Guards holds, blob removal and the commit of a put, so that a blob is never removed under a new row.
        self._lock = threading.Lock()
        self._holds: dict[tuple[str, str, int], tuple[int, AdapterVersion]] = {}  # key -> (count, record)

    @classmethod
    def open(cls, root: str | os.PathLike, base: BaseModelDescription, limits: StoreLimits | None = None,
             base_fingerprint: str = "", repository: AdapterRepository | None = None) -> "AdapterStore":
        """Open (or create) the store at `root`, repairing what a crash or a bad disk left behind; with a
        `repository`, as its cache (RepositoryError when `root` is a stand-alone store or another repository's)."""
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        lock_fd = os.open(root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the kernel when a process dies
        except BlockingIOError:
            os.close(lock_fd)
            raise StoreLocked(f"adapter store {root} is already open") from None
        try:
            blobs, registry = BlobStore(root), Registry(root / REGISTRY_FILE)
            report = recover(blobs, registry)
            if repository is not None:
                claim_cache(root, repository, has_rows=bool(registry.rows()))
        except BaseException:
            os.close(lock_fd)
            raise
        return cls(root, base, limits or StoreLimits(), base_fingerprint or base_fingerprint_of(base), lock_fd, blobs,
                   registry, report, repository)

    def close(self) -> None:
        """Idempotent: the fixture that opened a store may close it after a test already has."""
        if self._lock_fd < 0:
            return
        self._registry.close()
        os.close(self._lock_fd)  # releases the flock
        self._lock_fd = -1

    def __enter__(self) -> "AdapterStore":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ---- upload ------------------------------------------------------------------------------------------------

    def put(self, tenant: str, adapter_id: str, files: Mapping[str, bytes]) -> AdapterVersion:
        """Store a new adapter, or a new version of an existing one. Raises AdapterError, before writing anything,
        for anything refused."""
        return self.put_parsed(tenant, adapter_id, files)[0]

    def put_parsed(self, tenant: str, adapter_id: str, files: Mapping[str, bytes],
                   must_be_new: bool = False) -> tuple[AdapterVersion, LoraAdapter]:
        """`put`, also returning the adapter as it was parsed to validate it (what `read` of the new version would
        give): a server keeps it warm, so the version's first request does not parse its files again. On a repository,
        `must_be_new` makes the repository refuse (AdapterExists) an adapter with a version not deleted, atomically
        across servers (one server's upload lock cannot see the others')."""
        check_id(tenant, "tenant")
        check_id(adapter_id, "adapter_id")
        config_bytes, weights_bytes = split_upload(files, self.limits)
        adapter = parse_peft_adapter(config_bytes, weights_bytes, self.base, self.limits)
        # Both blobs durable before the row that points at them is committed.
        config_sha, weights_sha = self._blobs.write(config_bytes), self._blobs.write(weights_bytes)
        if self.repository is not None:  # the repository's log numbers the version; our row follows it
            self.repository.write_blobs(config_bytes, weights_bytes)
            shared = self.repository.append(AdapterVersion(
                tenant, adapter_id, 0, time.time(), bundle_sha256(config_sha, weights_sha), config_sha, weights_sha,
                tuple(sorted(set(adapter.ranks))), len(config_bytes) + len(weights_bytes), self.base_fingerprint,
                READY), must_be_new=must_be_new)
        with self._lock:
            for sha, data in ((config_sha, config_bytes), (weights_sha, weights_bytes)):
                if not self._blobs.exists(sha):  # a delete removed an identical blob since: write it again
                    self._blobs.write(data)
            if self.repository is not None:
                self._registry.insert(shared)
                record = shared
            else:
                record = self._registry.add(tenant, adapter_id, sha256=bundle_sha256(config_sha, weights_sha),
                                            config_sha256=config_sha, weights_sha256=weights_sha,
                                            ranks=adapter.ranks, num_bytes=len(config_bytes) + len(weights_bytes),
                                            base_fingerprint=self.base_fingerprint)
        logger.info("stored %s/%s version %d (%d bytes, ranks %s)", tenant, adapter_id, record.version,
                    record.num_bytes, list(record.ranks))
        return record, adapter

    # ---- lookup ------------------------------------------------------------------------------------------------

    def get(self, tenant: str, adapter_id: str, version: int | None = None) -> AdapterVersion:
        """The latest version (its newest upload, even when that one is unusable), or the one given.
        AdapterNotFound when there is none for this tenant and base; AdapterUnusable when it failed a checksum."""
        self._sync(tenant, adapter_id)
        if version is None:
            record = self._registry.latest(tenant, adapter_id, self.base_fingerprint)
        else:
            assert isinstance(version, int) and not isinstance(version, bool), version
            record = self._registry.find(tenant, adapter_id, version)
            if record is not None and (record.state == DELETED or record.base_fingerprint != self.base_fingerprint):
                record = None
        if record is None:
            at = "" if version is None else f" version {version}"
            raise AdapterNotFound(f"tenant {tenant!r} has no adapter {adapter_id!r}{at}")
        if record.state == UNUSABLE:
            raise _unusable(record)
        return record

    def versions(self, tenant: str, adapter_id: str) -> list[AdapterVersion]:
        """Every version not deleted (unusable ones included, with their state), oldest first."""
        self._sync(tenant, adapter_id)
        return self._registry.versions(tenant, adapter_id, self.base_fingerprint)

    def list_adapters(self, tenant: str) -> list[AdapterVersion]:
        """The latest version of each of the tenant's adapters, by adapter id."""
        self._sync_all(tenant)
        return self._registry.latest_per_adapter(tenant, self.base_fingerprint)

    def rows(self) -> list[AdapterVersion]:
        """Every row, deleted ones and all tenants' included: for operators and tests."""
        self._sync_all()
        return self._registry.rows()

    def num_versions(self) -> int:
        """Versions that can be served."""
        return self._registry.num_versions(READY)

    # ---- reading files -----------------------------------------------------------------------------------------

    def read_files(self, record: AdapterVersion) -> dict[str, bytes]:
        """The version's two files, checksum verified. A blob that fails is quarantined, and AdapterUnusable raised.
        Hold the version while reading it, or a delete may remove its files first (AdapterNotFound then)."""
        files = {}
        for name, sha in ((CONFIG_FILE, record.config_sha256), (WEIGHTS_FILE, record.weights_sha256)):
            data = self._blobs.read(sha)
            if data is None or sha256_hex(data) != sha:
                self._bad_blob(record, sha, missing=data is None)
            files[name] = data
        return files

    def read(self, record: AdapterVersion) -> LoraAdapter:
        """The version parsed, checksum verified, under this store's current base and limits."""
        files = self.read_files(record)
        return parse_peft_adapter(files[CONFIG_FILE], files[WEIGHTS_FILE], self.base, self.limits)

    def _bad_blob(self, record: AdapterVersion, sha: str, missing: bool) -> None:
        with self._lock:
            current = self._registry.find(*record.key)
            if current is None or (current.state == DELETED and record.key not in self._holds):
                raise AdapterNotFound(f"tenant {record.tenant!r} has no adapter {record.adapter_id!r} version "
                                      f"{record.version} (deleted)")
            moved_to = None if missing else self._blobs.quarantine(sha)  # None: another reader moved it first
            where = f"quarantined at {moved_to}" if moved_to else "missing"
            for damaged in self._registry.mark_unusable(sha):
                logger.warning("%s/%s version %d is unusable: blob %s failed its checksum (%s)", damaged.tenant,
                               damaged.adapter_id, damaged.version, sha, where)
        raise _unusable(record)

    # ---- holds and deletion ------------------------------------------------------------------------------------

    def hold(self, record: AdapterVersion) -> None:
        """Keep this version's files while a request uses it, even if it is deleted meanwhile. Pair with release.
        A version already deleted cannot be held (AdapterNotFound)."""
        with self._lock:
            current = self._registry.find(*record.key)
            if current is None or current.state == DELETED:
                raise AdapterNotFound(f"tenant {record.tenant!r} has no adapter {record.adapter_id!r} version "
                                      f"{record.version}")
            if current.state == UNUSABLE:
                raise _unusable(current)
            count, _ = self._holds.get(record.key, (0, current))
            self._holds[record.key] = (count + 1, current)

    def release(self, record: AdapterVersion) -> None:
        with self._lock:
            assert record.key in self._holds, f"release without hold: {record.key}"
            count, held = self._holds.pop(record.key)
            if count > 1:
                self._holds[record.key] = (count - 1, held)
            elif self._registry.find(*record.key).state == DELETED:
                self._collect([held])  # the deferred half of a delete

    @contextmanager
    def held(self, record: AdapterVersion) -> Iterator[AdapterVersion]:
        self.hold(record)
        try:
            yield record
        finally:
            self.release(record)

    def num_holds(self, record: AdapterVersion) -> int:
        with self._lock:
            return self._holds.get(record.key, (0, None))[0]

    def delete(self, tenant: str, adapter_id: str, version: int | None = None) -> list[AdapterVersion]:
        """Delete every version of the adapter (or just `version`): gone from get and lists at once, files removed
        once no request holds them. Returns the versions deleted; AdapterNotFound when there were none."""
        if self.repository is not None:
            return self._delete_shared(tenant, adapter_id, version)
        with self._lock:
            deleted = self._registry.mark_deleted(tenant, adapter_id, version)
            if not deleted:
                at = "" if version is None else f" version {version}"
                raise AdapterNotFound(f"tenant {tenant!r} has no adapter {adapter_id!r}{at}")
            self._collect([record for record in deleted if record.key not in self._holds])
        logger.info("deleted %s/%s versions %s", tenant, adapter_id, [record.version for record in deleted])
        return deleted

    # ---- the shared repository ---------------------------------------------------------------------------------

    def _delete_shared(self, tenant: str, adapter_id: str, version: int | None) -> list[AdapterVersion]:
        """`delete` on a repository: its tombstones first (every server then drops the versions), then ours."""
        self._sync(tenant, adapter_id)
        deleted = [self._registry.find(tenant, adapter_id, number)
                   for number in self.repository.delete(tenant, adapter_id, version)]
        if not deleted:
            at = "" if version is None else f" version {version}"
            raise AdapterNotFound(f"tenant {tenant!r} has no adapter {adapter_id!r}{at}")
        self._sync(tenant, adapter_id)
        logger.info("deleted %s/%s versions %s", tenant, adapter_id, [record.version for record in deleted if record])
        return [record for record in deleted if record is not None]  # None: appended since our sync, deleted too

    def _sync(self, tenant: str, adapter_id: str) -> None:
        """Bring this adapter's rows up to the repository's log: new versions pulled (blobs verified), tombstones
        applied as local deletes."""
        if self.repository is None:
            return
        listing = self.repository.listing(tenant, adapter_id)
        if self._synced.get((tenant, adapter_id)) == listing:
            return  # the common case, on every request: nothing new
        pulled, deleted = pull(self.repository, self._registry, tenant, adapter_id, listing,
                               self.base_fingerprint)
        for item in pulled:  # blobs durable before the rows, as in put
            for data in item.blobs:
                self._blobs.write(data)
        with self._lock:
            for item in pulled:
                for data in item.blobs:
                    if not self._blobs.exists(sha256_hex(data)):  # a delete removed an identical blob since
                        self._blobs.write(data)
                self._registry.insert(item.record)
            gone = [record for number in deleted for record in self._registry.mark_deleted(tenant, adapter_id, number)]
            self._collect([record for record in gone if record.key not in self._holds])
            self._synced[(tenant, adapter_id)] = listing

    def _sync_all(self, tenant: str | None = None) -> None:
        if self.repository is not None:
            for key in self.repository.adapter_keys(tenant):
                self._sync(*key)

    def _collect(self, records: Iterable[AdapterVersion]) -> None:
        """Remove the blobs of these deleted versions that nothing else needs. Called with self._lock held."""
        held = {sha for _, record in self._holds.values() for sha in record.blob_hashes}
        for sha in {sha for record in records for sha in record.blob_hashes} - held:
            if not self._registry.is_blob_live(sha):  # another READY version may share identical content
                self._blobs.remove(sha)


def _unusable(record: AdapterVersion) -> AdapterUnusable:
    return AdapterUnusable(f"tenant {record.tenant!r} adapter {record.adapter_id!r} version {record.version} is "
                           "unusable: its stored files failed their checksum; upload it again")
