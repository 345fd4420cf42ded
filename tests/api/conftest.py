"""Real servers in subprocesses (each loads the demo in a few seconds), each started when first needed:

- `server`: two tenants by API key (acme: an admin and a user key; globex: an admin key), small limits to test
  (each tenant may have MAX_PENDING_PER_TENANT requests unfinished: more than any other test sends at once).
- `small_server`: open (no keys), one sequence at a time and a queue of two, for the queue, disconnect and timing tests.
- `drain_server`: open, one sequence at a time; test_drain sends it SIGTERM.
- `merge_server`: the same keys as `server`, with `--merge-policy manual` (merges on request).
"""

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.server_process import ServerProcess

ACME_ADMIN = "acme-admin-key-000000000001"
ACME_USER = "acme-user-key-0000000000002"
GLOBEX_ADMIN = "globex-admin-key-0000000003"
KEYS = {"keys": [{"key": ACME_ADMIN, "tenant": "acme", "role": "admin"},
                 {"key": ACME_USER, "tenant": "acme", "role": "user"},
                 {"key": GLOBEX_ADMIN, "tenant": "globex", "role": "admin"}]}
MAX_BODY_BYTES = 64 * 1024
MAX_UPLOAD_BYTES = 1 << 20
MAX_NEW_TOKENS_LIMIT = 200
SMALL_MAX_PENDING = 2
MAX_PENDING_PER_TENANT = 24


@pytest.fixture(scope="session")
def api_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("api")


def _serve(root: Path, *args: str) -> Iterator[ServerProcess]:
    # Started when a test first needs it, not all at once: starting several together on a small machine is no faster.
    server = ServerProcess(root, *args)
    try:
        yield server.wait_ready()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server(api_root) -> Iterator[ServerProcess]:
    keys_file = api_root / "keys.json"
    keys_file.write_text(json.dumps(KEYS))
    yield from _serve(api_root / "main", "--api-keys", str(keys_file), "--max-body-bytes", str(MAX_BODY_BYTES),
                      "--max-upload-bytes", str(MAX_UPLOAD_BYTES), "--max-new-tokens-limit", str(MAX_NEW_TOKENS_LIMIT),
                      "--max-pending-per-tenant", str(MAX_PENDING_PER_TENANT))


@pytest.fixture(scope="session")
def merge_server(api_root) -> Iterator[ServerProcess]:
    keys_file = api_root / "merge-keys.json"
    keys_file.write_text(json.dumps(KEYS))
    yield from _serve(api_root / "merge", "--api-keys", str(keys_file), "--merge-policy", "manual")


@pytest.fixture(scope="session")
def small_server(api_root) -> Iterator[ServerProcess]:
    yield from _serve(api_root / "small", "--max-num-seqs", "1", "--max-pending", str(SMALL_MAX_PENDING))


@pytest.fixture
def drain_server(api_root) -> Iterator[ServerProcess]:
    yield from _serve(api_root / "drain", "--max-num-seqs", "1", "--drain-timeout", "60")


def client_for(server: ServerProcess, key: str | None) -> httpx.Client:
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    return httpx.Client(base_url=server.url, headers=headers, timeout=30)


@pytest.fixture(scope="session")
def acme(server) -> Iterator[httpx.Client]:
    with client_for(server, ACME_ADMIN) as client:
        yield client


@pytest.fixture(scope="session")
def acme_user(server) -> Iterator[httpx.Client]:
    with client_for(server, ACME_USER) as client:
        yield client


@pytest.fixture(scope="session")
def globex(server) -> Iterator[httpx.Client]:
    with client_for(server, GLOBEX_ADMIN) as client:
        yield client


@pytest.fixture(scope="session")
def anonymous(server) -> Iterator[httpx.Client]:
    with client_for(server, None) as client:
        yield client


@pytest.fixture(scope="session")
def small(small_server) -> Iterator[httpx.Client]:
    with client_for(small_server, None) as client:
        yield client
