"""A server's local store as a verified cache of the shared repository (repository.py): what one adapter's log holds
that the local registry does not yet, with its blobs fetched and checked against their sha256 before they are kept.

The store applies what `pull` finds under its own lock (store.AdapterStore._sync): new versions are inserted with the
repository's numbers, tombstones become local deletes (which wait for holders, as on one server)."""

import logging
from dataclasses import dataclass, replace
from pathlib import Path

from lora_server.adapters_store.blobs import sha256_hex
from lora_server.adapters_store.registry import DELETED, READY, UNUSABLE, AdapterVersion, Registry
from lora_server.adapters_store.repository import AdapterRepository, RepositoryError

logger = logging.getLogger(__name__)

CACHE_MARKER_FILE = "repository"  # in a local store used as a cache: the repository_id it caches


@dataclass(frozen=True)
class Pulled:
    record: AdapterVersion  # READY with its blobs' bytes, verified; or UNUSABLE/DELETED with none
    blobs: tuple[bytes, ...]


def pull(repository: AdapterRepository, registry: Registry, tenant: str, adapter_id: str, listing: dict[int, bool],
         base_fingerprint: str) -> tuple[list[Pulled], list[int]]:
    """For one adapter's `listing` ({version: is_deleted}): the versions the local registry lacks, and the versions
    deleted in the repository but not here. A corrupt entry, whose base is unknown, counts as made for ours: the
    adapter then reads as unusable, not as an older version or none."""
    pulled, deleted = [], []
    for version, is_deleted in listing.items():
        local = registry.find(tenant, adapter_id, version)
        if local is None:
            record = repository.entry(tenant, adapter_id, version, is_deleted)
            if not record.base_fingerprint:
                record = replace(record, base_fingerprint=base_fingerprint)
            pulled.append(_fetch(repository, record) if record.state == READY else Pulled(record, ()))
        elif is_deleted and local.state != DELETED:
            deleted.append(version)
    return pulled, deleted


def _fetch(repository: AdapterRepository, record: AdapterVersion) -> Pulled:
    blobs = []
    for sha in record.blob_hashes:
        data = repository.read_blob(sha)
        if data is None or sha256_hex(data) != sha:
            # The repository's copy is damaged (or gone): the version is refused here, and the blob moved aside so
            # that uploading the same content again writes it anew. Every server reads the same file, so each refuses.
            moved_to = None if data is None else repository.quarantine_blob(sha)
            logger.warning("repository blob %s of %s/%s version %d fails its checksum (%s): the version is unusable",
                           sha, record.tenant, record.adapter_id, record.version,
                           f"quarantined at {moved_to}" if moved_to else "missing")
            return Pulled(replace(record, state=UNUSABLE), ())
        blobs.append(data)
    return Pulled(record, tuple(blobs))


def claim_cache(root: Path, repository: AdapterRepository, has_rows: bool) -> None:
    """Mark the local store at `root` as this repository's cache; RepositoryError when it is another's, or a
    stand-alone store with adapters of its own (its version numbers would clash with the repository's)."""
    marker = root / CACHE_MARKER_FILE
    if marker.is_file():
        cached = marker.read_text().strip()
        if cached != repository.repository_id:
            raise RepositoryError(f"store {root} caches another adapter repository ({cached}), not "
                                  f"{repository.root} ({repository.repository_id}): give each its own --store")
        return
    if has_rows:
        raise RepositoryError(f"store {root} holds adapters of its own: a server on an adapter repository needs an "
                              "empty --store directory as its cache (upload the adapters to the repository instead)")
    marker.write_text(repository.repository_id + "\n")
