"""A process that appends to a shared adapter repository, for the repository tests: `python -m
tests.store.repository_worker ROOT NAME NUM_APPENDS GO_FILE BLOB_BYTES` waits for GO_FILE to exist, then appends
NUM_APPENDS versions of acme/bot (NUM_APPENDS 0: forever, until killed), each with one fresh blob, and prints the
versions it got as one JSON line."""

import json
import os
import sys
import time
from pathlib import Path

from lora_server.adapters_store.registry import READY, AdapterVersion
from lora_server.adapters_store.repository import AdapterRepository


def main() -> None:
    root, name, num_appends, go_file, blob_bytes = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4]), \
        int(sys.argv[5])
    repository = AdapterRepository.open(root)
    while not go_file.exists():
        time.sleep(0.001)
    versions, i = [], 0
    while num_appends == 0 or i < num_appends:
        content = f"{name}-{i}-".encode() + os.urandom(blob_bytes)
        (sha,) = repository.write_blobs(content)
        record = repository.append(AdapterVersion("acme", "bot", 0, time.time(), sha, sha, sha, (4,), len(content),
                                                  name, READY))
        versions.append(record.version)
        i += 1
    print(json.dumps(versions))


if __name__ == "__main__":
    main()
