"""Which adapter versions exist: one SQLite table (standard library, WAL, synchronous=FULL), one row per version.

Versions count 1, 2, 3... per (tenant, adapter_id) and are never reused: a deleted version stays as a 'deleted' row,
so a version number always means the same content. Thread-safe: one connection behind a lock (a lookup takes tens of
microseconds, so sharing it costs less than a connection per thread would)."""

import json
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

SCHEMA_VERSION = 1
READY, UNUSABLE, DELETED = "ready", "unusable", "deleted"
STATES = (READY, UNUSABLE, DELETED)

_COLUMNS = ("tenant", "adapter_id", "version", "created_at", "sha256", "config_sha256", "weights_sha256", "ranks",
            "num_bytes", "base_fingerprint", "state")
_SELECT = f"SELECT {', '.join(_COLUMNS)} FROM adapter_versions"
_SCHEMA = f"""
CREATE TABLE IF NOT EXISTS adapter_versions (
    tenant TEXT NOT NULL,
    adapter_id TEXT NOT NULL,
    version INTEGER NOT NULL CHECK (version > 0),
    created_at REAL NOT NULL,
    sha256 TEXT NOT NULL,
    config_sha256 TEXT NOT NULL,
    weights_sha256 TEXT NOT NULL,
    ranks TEXT NOT NULL,
    num_bytes INTEGER NOT NULL,
    base_fingerprint TEXT NOT NULL,
    state TEXT NOT NULL CHECK (state IN {STATES!r}),
    PRIMARY KEY (tenant, adapter_id, version)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS by_config_blob ON adapter_versions (config_sha256);
CREATE INDEX IF NOT EXISTS by_weights_blob ON adapter_versions (weights_sha256);
"""


@dataclass(frozen=True)
class AdapterVersion:
    tenant: str
    adapter_id: str
    version: int
    created_at: float  # Unix seconds
    sha256: str  # of the version's content, both files (see store.bundle_sha256): equal content, equal sha256
    config_sha256: str  # the blobs holding adapter_config.json and adapter_model.safetensors
    weights_sha256: str
    ranks: tuple[int, ...]  # the distinct LoRA ranks, ascending
    num_bytes: int  # both files together
    base_fingerprint: str  # the base model it was validated against
    state: str  # READY, UNUSABLE or DELETED, as of when this record was read

    @property
    def key(self) -> tuple[str, str, int]:
        return self.tenant, self.adapter_id, self.version

    @property
    def blob_hashes(self) -> tuple[str, str]:
        return self.config_sha256, self.weights_sha256

    @property
    def max_rank(self) -> int:
        return max(self.ranks)


class Registry:
    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        # isolation_level=None: no implicit transactions; writes say BEGIN IMMEDIATE themselves.
        self._db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        (mode,) = self._db.execute("PRAGMA journal_mode=WAL").fetchone()
        if mode != "wal":  # e.g. on a network file system: its locking is not to be trusted either
            raise RuntimeError(f"SQLite cannot use WAL for {path} (journal_mode={mode})")
        self._db.execute("PRAGMA synchronous=FULL")  # a committed row survives power loss, not just a crash
        (schema,) = self._db.execute("PRAGMA user_version").fetchone()
        if schema not in (0, SCHEMA_VERSION):
            raise RuntimeError(f"{path} has registry schema {schema}; this code knows {SCHEMA_VERSION}")
        self._db.executescript(_SCHEMA + f"PRAGMA user_version = {SCHEMA_VERSION};")

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- writes ------------------------------------------------------------------------------------------------

    def add(self, tenant: str, adapter_id: str, *, sha256: str, config_sha256: str, weights_sha256: str,
            ranks: Iterable[int], num_bytes: int, base_fingerprint: str) -> AdapterVersion:
        """A new READY version, numbered one past the highest this adapter ever had."""
        with self._transaction():
            (last,) = self._db.execute("SELECT COALESCE(MAX(version), 0) FROM adapter_versions "
                                       "WHERE tenant = ? AND adapter_id = ?", (tenant, adapter_id)).fetchone()
            record = AdapterVersion(tenant, adapter_id, last + 1, time.time(), sha256, config_sha256, weights_sha256,
                                    tuple(sorted(set(ranks))), num_bytes, base_fingerprint, READY)
            self._db.execute(f"INSERT INTO adapter_versions VALUES ({', '.join('?' * len(_COLUMNS))})",
                             _to_row(record))
        return record

    def insert(self, record: AdapterVersion) -> bool:
        """A version numbered elsewhere (a shared repository's log), as given; False when its key is here already."""
        with self._transaction():
            cursor = self._db.execute(f"INSERT OR IGNORE INTO adapter_versions VALUES "
                                      f"({', '.join('?' * len(_COLUMNS))})", _to_row(record))
        return cursor.rowcount == 1

    def mark_deleted(self, tenant: str, adapter_id: str, version: int | None = None) -> list[AdapterVersion]:
        """Every version (or the one given) not yet deleted becomes DELETED; returns them as they were before."""
        where, args = "tenant = ? AND adapter_id = ? AND state != ?", [tenant, adapter_id, DELETED]
        if version is not None:
            where, args = where + " AND version = ?", [*args, version]
        with self._transaction():
            rows = [_from_row(row) for row in self._db.execute(f"{_SELECT} WHERE {where}", args)]
            self._db.execute(f"UPDATE adapter_versions SET state = ? WHERE {where}", [DELETED, *args])
        return rows

    def mark_unusable(self, blob_sha: str) -> list[AdapterVersion]:
        """Every READY version stored in this blob becomes UNUSABLE; returns them as they were before."""
        where = "state = ? AND (config_sha256 = ? OR weights_sha256 = ?)"
        with self._transaction():
            rows = [_from_row(row) for row in self._db.execute(f"{_SELECT} WHERE {where}", (READY, blob_sha, blob_sha))]
            self._db.execute(f"UPDATE adapter_versions SET state = ? WHERE {where}", (UNUSABLE, READY, blob_sha,
                                                                                      blob_sha))
        return rows

    # ---- reads -------------------------------------------------------------------------------------------------

    def find(self, tenant: str, adapter_id: str, version: int) -> AdapterVersion | None:
        return self._one(f"{_SELECT} WHERE tenant = ? AND adapter_id = ? AND version = ?", (tenant, adapter_id,
                                                                                           version))

    def latest(self, tenant: str, adapter_id: str, base_fingerprint: str) -> AdapterVersion | None:
        """The newest version not deleted, among those made for this base."""
        return self._one(f"{_SELECT} WHERE tenant = ? AND adapter_id = ? AND base_fingerprint = ? AND state != ? "
                         "ORDER BY version DESC LIMIT 1", (tenant, adapter_id, base_fingerprint, DELETED))

    def versions(self, tenant: str, adapter_id: str, base_fingerprint: str) -> list[AdapterVersion]:
        """Every version not deleted, among those made for this base, oldest first."""
        return self._all(f"{_SELECT} WHERE tenant = ? AND adapter_id = ? AND base_fingerprint = ? AND state != ? "
                         "ORDER BY version", (tenant, adapter_id, base_fingerprint, DELETED))

    def latest_per_adapter(self, tenant: str, base_fingerprint: str) -> list[AdapterVersion]:
        """`latest` of each of the tenant's adapters, by adapter id."""
        return self._all(f"{_SELECT} AS v WHERE tenant = ? AND base_fingerprint = ? AND state != ? AND version = "
                         "(SELECT MAX(version) FROM adapter_versions AS w WHERE w.tenant = v.tenant AND "
                         "w.adapter_id = v.adapter_id AND w.base_fingerprint = v.base_fingerprint AND w.state != ?) "
                         "ORDER BY adapter_id", (tenant, base_fingerprint, DELETED, DELETED))

    def rows(self, states: Iterable[str] = STATES) -> list[AdapterVersion]:
        """Every row in one of `states`, in key order."""
        states = tuple(states)
        return self._all(f"{_SELECT} WHERE state IN ({', '.join('?' * len(states))}) "
                         "ORDER BY tenant, adapter_id, version", states)

    def is_blob_live(self, blob_sha: str) -> bool:
        """Whether a READY version is stored in this blob."""
        return self._one_value("SELECT 1 FROM adapter_versions WHERE state = ? AND config_sha256 = ? UNION ALL "
                               "SELECT 1 FROM adapter_versions WHERE state = ? AND weights_sha256 = ? LIMIT 1",
                               (READY, blob_sha, READY, blob_sha)) is not None

    def num_versions(self, state: str = READY) -> int:
        return self._one_value("SELECT COUNT(*) FROM adapter_versions WHERE state = ?", (state,))

    # ---- plumbing ----------------------------------------------------------------------------------------------

    @contextmanager
    def _transaction(self) -> Iterator[None]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")  # take the write lock up front: read-then-write must not interleave
            try:
                yield
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def _one(self, sql: str, args: tuple) -> AdapterVersion | None:
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return None if row is None else _from_row(row)

    def _all(self, sql: str, args: tuple) -> list[AdapterVersion]:
        with self._lock:
            return [_from_row(row) for row in self._db.execute(sql, args).fetchall()]

    def _one_value(self, sql: str, args: tuple):
        with self._lock:
            row = self._db.execute(sql, args).fetchone()
        return None if row is None else row[0]


def _to_row(record: AdapterVersion) -> tuple:
    return tuple(json.dumps(list(record.ranks)) if name == "ranks" else getattr(record, name) for name in _COLUMNS)


def _from_row(row: tuple) -> AdapterVersion:
    values = dict(zip(_COLUMNS, row, strict=True))
    values["ranks"] = tuple(json.loads(values["ranks"]))
    return AdapterVersion(**values)
