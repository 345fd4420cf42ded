"""The shared adapter repository: one source of truth for adapters across servers (replicas), on a shared filesystem.

    repository = AdapterRepository.open("/mnt/adapters")
    config_sha, weights_sha = repository.write_blobs(config_bytes, weights_bytes)
    record = repository.append(fields)                  # the adapter's next version, numbered here
    repository.listing("acme", "support-bot")           # {version: is_deleted}, one directory read

Layout under root (no database: only files made whole before they get their name, so a network filesystem that
honours O_EXCL, link(2) and rename(2) is enough; NFSv3+ does):

    FORMAT                       {"format": 1, "repository_id": uuid}: which caches belong to this repository
    blobs/ab/abcd...             immutable, content-addressed blobs (blobs.BlobStore: temp file, fsync, rename)
    tmp/                         writes in flight; a writer killed by SIGKILL leaves its temp file here, never a name
    quarantine/                  blobs that failed their checksum when a server pulled them
    collecting/                  blobs a collector (collect_orphan_blobs) has moved aside and not yet decided
    log/<T>/<A>/0000000001.json  the version log of one adapter: one entry per version, never rewritten
    log/<T>/<A>/0000000001.deleted   a tombstone: that version is deleted (its entry stays, so no number is reused)

<T> and <A> are sha256 of the tenant and adapter ids: the ids never become path names (a case-insensitive share would
otherwise fold two tenants into one); each entry names its ids, and an entry whose ids do not match its place is
corrupt. A version is numbered one past the highest entry in its directory and made by link(2) of a complete temp
file to its final name, which fails when the name exists: two uploaders racing for one number get one each, in order,
and a reader sees an entry whole or not at all.

Blobs are not removed when a version is deleted (another server may be pulling them, or an upload of identical content
may be about to point at them); `collect_orphan_blobs` removes those no live version names once untouched for an hour
(`python -m lora_server.adapters_store.repository_gc DIR`)."""

import json
import logging
import math
import os
import re
import tempfile
import time
import uuid
from dataclasses import asdict
from hashlib import sha256
from pathlib import Path

from lora_server.adapters_store.blobs import BlobStore, _fsync_dir
from lora_server.adapters_store.registry import DELETED, READY, UNUSABLE, AdapterVersion

logger = logging.getLogger(__name__)

FORMAT = 1
FORMAT_FILE = "FORMAT"
LOG_DIR = "log"
ENTRY_SUFFIX, TOMBSTONE_SUFFIX = ".json", ".deleted"
NO_BLOB = "0" * 64  # the blob hashes of a corrupt entry: a record that can only ever be UNUSABLE
STALE_TMP_S = 3600.0  # a temp file this old is a dead writer's: no upload takes an hour between write and rename
COLLECT_GRACE_S = 3600.0  # an orphan blob untouched this long: no upload takes an hour between its blobs and entry
COLLECTING_DIR = "collecting"
_ENTRY_NAME = re.compile(r"(\d{10})(\.json|\.deleted)")
_ENTRY_FIELDS = ("tenant", "adapter_id", "version", "created_at", "sha256", "config_sha256", "weights_sha256",
                 "ranks", "num_bytes", "base_fingerprint")


class RepositoryError(RuntimeError):
    """The repository (or a cache pointed at it) is not what this code can use: an unknown format, a foreign cache."""


class AdapterExists(RuntimeError):
    """A create-if-absent append (POST) found a version of the adapter that is not deleted: the API answers 409."""


class AdapterRepository:
    def __init__(self, root: Path, repository_id: str) -> None:
        """Use AdapterRepository.open."""
        self.root, self.repository_id = root, repository_id
        self.log_dir = root / LOG_DIR
        self.blobs = BlobStore(root)
        self.collecting_dir = root / COLLECTING_DIR

    @classmethod
    def open(cls, root: str | os.PathLike) -> "AdapterRepository":
        """Open (or create) the repository at `root`. Several processes on several machines may open it at once."""
        root = Path(root)
        for directory in (root, root / LOG_DIR, root / "blobs", root / "tmp", root / "quarantine"):
            directory.mkdir(parents=True, exist_ok=True)  # first, with exist_ok: other servers may be opening it too
        fmt = _read_or_create_format(root / FORMAT_FILE)
        if fmt.get("format") != FORMAT:
            raise RepositoryError(f"adapter repository {root} has format {fmt.get('format')!r}; this code knows "
                                  f"{FORMAT}")
        repository = cls(root, fmt["repository_id"])
        repository.clear_stale_tmp()
        return repository

    # ---- blobs -------------------------------------------------------------------------------------------------

    def write_blobs(self, *contents: bytes) -> tuple[str, ...]:
        """Store each content durably (once, by hash); their sha256s. Call before `append` names them."""
        hashes = []
        for data in contents:
            # A fresh mtime puts the blob inside a collector's grace period until this upload's entry names it. A blob
            # gone before the touch (collected, or quarantined by a reader) is written again.
            while not _touch(self.blobs.path(sha := self.blobs.write(data))):
                logger.info("repository blob %s vanished while being stored: writing it again", sha)
            hashes.append(sha)
        return tuple(hashes)

    def read_blob(self, sha: str) -> bytes | None:
        """The blob's bytes as stored, unverified (the caller checks them against `sha`); None when missing."""
        return self.blobs.read(sha)

    def quarantine_blob(self, sha: str) -> Path | None:
        """Move a blob that failed its checksum aside, so that an upload of the same content writes it anew."""
        return self.blobs.quarantine(sha)

    # ---- the version log ---------------------------------------------------------------------------------------

    def append(self, record: AdapterVersion, must_be_new: bool = False) -> AdapterVersion:
        """`record` (its version ignored) as the adapter's next version: the returned record has its number.
        With `must_be_new` (POST's create-if-absent), AdapterExists when the adapter has a version not deleted, decided
        atomically across servers: see _number_for."""
        directory = self._adapter_dir(record.tenant, record.adapter_id)
        directory.mkdir(parents=True, exist_ok=True)
        while True:
            version = self._number_for(record, must_be_new)
            numbered = AdapterVersion(**{**asdict(record), "version": version, "state": READY})
            if self._create(directory / _entry_name(version, ENTRY_SUFFIX), _encode(numbered)):
                logger.info("repository: %s/%s version %d appended", record.tenant, record.adapter_id, version)
                return numbered
            # Another uploader took this number first: read the log again (one directory read) and take the next.

    def _number_for(self, record: AdapterVersion, must_be_new: bool) -> int:
        """The number to try: one past the highest entry. Entries are made one past the highest their writer saw, so
        the log never has a gap, and whoever links number N first owns it. A create-if-absent that links N therefore
        saw every version below N deleted (tombstones are never undone) and none at N or above (N+1 needs N first): the
        check and the write are one step, as one server's upload lock makes them."""
        listing = self.listing(record.tenant, record.adapter_id)
        if must_be_new and not all(listing.values()):
            raise AdapterExists(f"tenant {record.tenant!r} already has an adapter {record.adapter_id!r}")
        return max(listing, default=0) + 1

    def delete(self, tenant: str, adapter_id: str, version: int | None = None) -> list[int]:
        """Tombstone every version (or the one given) not deleted yet; the versions this call deleted, ascending
        (a version another server deleted at the same moment is theirs, not ours)."""
        directory = self._adapter_dir(tenant, adapter_id)
        deleted = []
        for number, is_deleted in sorted(self.listing(tenant, adapter_id).items()):
            if is_deleted or (version is not None and number != version):
                continue
            if self._create(directory / _entry_name(number, TOMBSTONE_SUFFIX), b""):
                deleted.append(number)
        return deleted

    def listing(self, tenant: str, adapter_id: str) -> dict[int, bool]:
        """{version: is_deleted} for every version the adapter ever had: one directory read."""
        try:
            names = os.listdir(self._adapter_dir(tenant, adapter_id))
        except FileNotFoundError:
            return {}
        return _parse_listing(names)

    def entry(self, tenant: str, adapter_id: str, version: int, is_deleted: bool = False) -> AdapterVersion:
        """One version's record (state READY or DELETED); UNUSABLE, logged, when its entry is corrupt."""
        path = self._adapter_dir(tenant, adapter_id) / _entry_name(version, ENTRY_SUFFIX)
        try:
            fields = json.loads(path.read_bytes())
            values = {name: fields[name] for name in _ENTRY_FIELDS}
            values["ranks"] = tuple(values["ranks"])
            record = AdapterVersion(**values, state=DELETED if is_deleted else READY)
            if record.key != (tenant, adapter_id, version):
                raise ValueError(f"it names {record.key}")
        except (OSError, ValueError, KeyError, TypeError) as error:
            logger.warning("repository entry %s is corrupt (%s): that version is unusable", path, error)
            return AdapterVersion(tenant, adapter_id, version, 0.0, NO_BLOB, NO_BLOB, NO_BLOB, (), 0, "",
                                  DELETED if is_deleted else UNUSABLE)
        return record

    def adapter_keys(self, tenant: str | None = None) -> list[tuple[str, str]]:
        """(tenant, adapter_id) of every adapter with at least one entry (of one tenant, if given), read from the
        entries themselves."""
        tenant_dirs = [self._tenant_dir(tenant)] if tenant is not None else _subdirs(self.log_dir)
        keys = []
        for adapter_dir in (adapter_dir for tenant_dir in tenant_dirs for adapter_dir in _subdirs(tenant_dir)):
            for version in _parse_listing(os.listdir(adapter_dir)):  # the first readable entry names the adapter
                try:
                    fields = json.loads((adapter_dir / _entry_name(version, ENTRY_SUFFIX)).read_bytes())
                    key = (fields["tenant"], fields["adapter_id"])
                except (OSError, ValueError, KeyError, TypeError):
                    continue
                if adapter_dir == self._adapter_dir(*key):
                    keys.append(key)
                    break
        return sorted(keys)

    # ---- maintenance -------------------------------------------------------------------------------------------

    def clear_stale_tmp(self, older_than_s: float = STALE_TMP_S) -> int:
        """Remove temp files of writers that died (a live one's file is younger); returns how many."""
        cutoff, removed = time.time() - older_than_s, 0
        for path in self.blobs.tmp_dir.iterdir():
            try:
                if path.is_file() and path.stat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue  # another server removed it first
        return removed

    def orphan_blobs(self, older_than_s: float = COLLECT_GRACE_S) -> set[str]:
        """Blobs no version that is not deleted names, untouched for `older_than_s`: what a collector may remove."""
        cutoff = time.time() - older_than_s
        return {sha for sha in self.blobs.hashes() - self._live_blobs() if _mtime(self.blobs.path(sha)) < cutoff}

    def collect_orphan_blobs(self, grace_s: float = COLLECT_GRACE_S) -> list[str]:
        """Remove the blobs no version that is not deleted names and no upload touched for `grace_s`; the removed
        blobs' hashes. Safe beside uploads and other collectors, on any server:

        - an upload touches its blobs before its entry names them, so a blob an upload is about to name is fresh;
        - a candidate is first moved aside (rename: atomic), then the log is read again and the moved file's mtime
          checked: one named or touched meanwhile goes back (an upload that touched it before the move goes on to name
          it); one an upload found gone is written anew by that upload (write_blobs);
        - a collector killed midway leaves its moved files in collecting/, where the next collection decides them.
        A reader pulling, in the instant between the move and the move back, a version created in that instant reads
        that version as unusable (a missing blob): grace_s (an hour) makes that a re-upload of content orphaned for an
        hour racing a collector to the microsecond."""
        self.collecting_dir.mkdir(exist_ok=True)
        cutoff = time.time() - grace_s
        for sha in self.orphan_blobs(grace_s):
            try:
                os.rename(self.blobs.path(sha), self.collecting_dir / sha)
            except FileNotFoundError:
                continue  # another collector (or a reader's quarantine) took it first
        live, removed = self._live_blobs(), []
        for moved in sorted(self.collecting_dir.iterdir()):
            try:
                if moved.name in live or _mtime(moved) >= cutoff:
                    try:
                        os.link(moved, self.blobs.path(moved.name))  # back; unless an upload wrote it anew meanwhile
                    except FileExistsError:
                        pass
                else:
                    removed.append(moved.name)
                moved.unlink()
            except FileNotFoundError:
                continue  # another collector decided it
        if removed:
            logger.info("repository: removed %d orphan blobs", len(removed))
        return sorted(removed)

    def _live_blobs(self) -> set[str]:
        """Every blob a version that is not deleted names."""
        live = set()
        for tenant, adapter_id in self.adapter_keys():
            for version, is_deleted in self.listing(tenant, adapter_id).items():
                if not is_deleted:
                    live.update(self.entry(tenant, adapter_id, version).blob_hashes)
        return live

    # ---- plumbing ----------------------------------------------------------------------------------------------

    def _tenant_dir(self, tenant: str) -> Path:
        return self.log_dir / _name_of(tenant)

    def _adapter_dir(self, tenant: str, adapter_id: str) -> Path:
        return self._tenant_dir(tenant) / _name_of(adapter_id)

    def _create(self, final: Path, content: bytes) -> bool:
        """Make `final` hold `content`, whole and durable, unless it exists: True when this call made it."""
        fd, tmp = tempfile.mkstemp(dir=self.blobs.tmp_dir, suffix=".entry")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(content)
                file.flush()
                os.fsync(file.fileno())
            try:
                os.link(tmp, final)  # atomic and exclusive, also over NFS: the name appears whole, or fails
            except FileExistsError:
                return False
        finally:
            Path(tmp).unlink(missing_ok=True)
        _fsync_dir(final.parent)  # the new name survives a power cut before the upload answers 201
        return True


def _name_of(identifier: str) -> str:
    return sha256(identifier.encode()).hexdigest()


def _entry_name(version: int, suffix: str) -> str:
    return f"{version:010d}{suffix}"


def _parse_listing(names: list[str]) -> dict[int, bool]:
    entries, tombstones = set(), set()
    for name in names:
        match = _ENTRY_NAME.fullmatch(name)
        if match:
            (entries if match.group(2) == ENTRY_SUFFIX else tombstones).add(int(match.group(1)))
    return {version: version in tombstones for version in sorted(entries)}


def _encode(record: AdapterVersion) -> bytes:
    fields = {name: getattr(record, name) for name in _ENTRY_FIELDS}
    return json.dumps({**fields, "ranks": list(record.ranks)}, sort_keys=True).encode()


def _subdirs(directory: Path) -> list[Path]:
    try:
        return sorted(path for path in directory.iterdir() if path.is_dir())
    except FileNotFoundError:
        return []


def _touch(path: Path) -> bool:
    """Give `path` a fresh mtime; False when it does not exist."""
    try:
        os.utime(path)
    except FileNotFoundError:
        return False
    return True


def _mtime(path: Path) -> float:
    """The file's mtime; infinitely recent when it is gone (nothing to collect)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return math.inf


def _read_or_create_format(path: Path) -> dict:
    """The FORMAT file, made exclusively by the first server to open the repository."""
    content = json.dumps({"format": FORMAT, "repository_id": uuid.uuid4().hex}).encode()
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
    tmp.write_bytes(content)
    try:
        os.link(tmp, path)  # the first opener's FORMAT wins; the others read it
        _fsync_dir(path.parent)
    except FileExistsError:
        pass
    finally:
        tmp.unlink(missing_ok=True)
    try:
        return json.loads(path.read_bytes())
    except ValueError as error:
        raise RepositoryError(f"{path} is not a repository FORMAT file: {error}") from None
