"""What opening a store repairs after a crash or a bad disk, before anything is served:

1. Temp files of writes in flight are removed.
2. Every blob a READY version is stored in is checked against its sha256 (in parallel). A blob that fails is moved to
   quarantine/ and every READY version stored in it becomes UNUSABLE, logged; so does a version whose blob is missing.
3. Blobs no READY version is stored in are removed: left by a crash between a blob's rename and its row's commit, or
   between a delete's commit and its removal. (No request holds anything yet, so deleted versions need nothing.)
"""

import logging
import os
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from lora_server.adapters_store.blobs import BlobStore
from lora_server.adapters_store.registry import READY, AdapterVersion, Registry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RecoveryReport:
    num_tmp_removed: int
    num_blobs_verified: int
    num_blobs_quarantined: int  # failed their checksum
    num_blobs_missing: int
    num_versions_unusable: int  # made UNUSABLE by this recovery
    num_orphans_removed: int


def recover(blobs: BlobStore, registry: Registry) -> RecoveryReport:
    num_tmp = blobs.clear_tmp()
    users: dict[str, list[AdapterVersion]] = defaultdict(list)
    for record in registry.rows([READY]):
        for sha in record.blob_hashes:
            users[sha].append(record)
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        found = dict(zip(users, pool.map(blobs.hash_file, users), strict=True))

    num_quarantined = num_missing = num_unusable = 0
    for sha, actual in found.items():
        if actual == sha:
            continue
        if actual is None:
            num_missing += 1
            logger.warning("blob %s is missing", sha)
        else:
            num_quarantined += 1
            logger.warning("blob %s fails its checksum (reads as %s): quarantined at %s", sha, actual,
                           blobs.quarantine(sha))
        for record in registry.mark_unusable(sha):
            num_unusable += 1
            logger.warning("%s/%s version %d is unusable: its stored files are damaged; upload it again",
                           record.tenant, record.adapter_id, record.version)

    live = {sha for record in registry.rows([READY]) for sha in record.blob_hashes}
    orphans = blobs.hashes() - live
    for sha in orphans:
        blobs.remove(sha)
    report = RecoveryReport(num_tmp, len(found), num_quarantined, num_missing, num_unusable, len(orphans))
    logger.info("adapter store opened: %s", report)
    return report
