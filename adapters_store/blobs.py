"""Files stored by the sha256 of their content: `blobs/ab/abcdef...`. A blob appears under its name complete and
durable or not at all (temp file, fsync, rename, fsync the directory), so its name alone says it is whole; only disk
corruption can make it lie, which is what `hash_file` is for."""

import hashlib
import logging
import os
import re
import tempfile
import time
from pathlib import Path

logger = logging.getLogger(__name__)

_SHA256 = re.compile(r"[0-9a-f]{64}")
_CHUNK_BYTES = 1 << 20


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class BlobStore:
    """`root/blobs/` holds the blobs, `root/tmp/` writes in flight, `root/quarantine/` blobs that failed a checksum.
    The owner (AdapterStore) decides which blobs are live; this class only moves bytes."""

    def __init__(self, root: Path) -> None:
        self.blob_dir, self.tmp_dir, self.quarantine_dir = root / "blobs", root / "tmp", root / "quarantine"
        for directory in (self.blob_dir, self.tmp_dir, self.quarantine_dir):
            if not directory.is_dir():
                directory.mkdir()
                _fsync_dir(root)

    def path(self, sha: str) -> Path:
        assert _SHA256.fullmatch(sha), sha  # names come from our own hashes, never from users
        return self.blob_dir / sha[:2] / sha

    def exists(self, sha: str) -> bool:
        return self.path(sha).is_file()

    def write(self, data: bytes) -> str:
        """Store `data` durably; returns its sha256. Identical content is stored once."""
        sha = sha256_hex(data)
        if self.hash_file(sha) == sha:
            return sha  # identical content, already durable; a damaged copy is replaced below (the row stays sound)
        final = self.path(sha)
        if not final.parent.is_dir():
            final.parent.mkdir(exist_ok=True)
            _fsync_dir(self.blob_dir)
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as file:
                file.write(data)
                file.flush()
                os.fsync(file.fileno())
            os.replace(tmp, final)  # atomic: readers see the whole blob or none
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(final.parent)  # make the rename itself durable before the registry row points at it
        return sha

    def read(self, sha: str) -> bytes | None:
        """The blob's bytes as stored (unverified), or None when it is missing."""
        try:
            return self.path(sha).read_bytes()
        except FileNotFoundError:
            return None

    def hash_file(self, sha: str) -> str | None:
        """sha256 of the blob stored under `sha`, read in chunks; None when it is missing."""
        digest = hashlib.sha256()
        try:
            with open(self.path(sha), "rb") as file:
                while chunk := file.read(_CHUNK_BYTES):
                    digest.update(chunk)  # hashlib releases the GIL on large chunks: threads verify in parallel
        except FileNotFoundError:
            return None
        return digest.hexdigest()

    def remove(self, sha: str) -> None:
        # Not fsynced: a removal lost in a crash leaves an orphan, which the next open removes again.
        self.path(sha).unlink(missing_ok=True)

    def quarantine(self, sha: str) -> Path | None:
        """Move a bad blob out of the way, kept for inspection; None when it is missing."""
        destination = self.quarantine_dir / f"{sha}.{time.time_ns()}"
        try:
            os.replace(self.path(sha), destination)
        except FileNotFoundError:
            return None
        return destination

    def hashes(self) -> set[str]:
        """Every stored blob's name; other files under blobs/ are left alone."""
        return {p.name for p in self.blob_dir.glob("??/*") if _SHA256.fullmatch(p.name) and p.parent.name == p.name[:2]}

    def clear_tmp(self) -> int:
        """Remove writes left in flight by a crash; returns how many. Only at open, when nothing else writes."""
        leftovers = [p for p in self.tmp_dir.iterdir() if p.is_file()]
        for path in leftovers:
            path.unlink()
        return len(leftovers)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
