"""POST's create-if-absent on the shared repository (`append(..., must_be_new=True)`): of two servers creating one id
at the same instant exactly one succeeds (version 1), the other is refused (AdapterExists, a 409), as on one server;
a deleted adapter may be created again; a new version (PUT) is never refused.

Run as a module, this file is one of the racing processes: `python -m tests.store.test_repository_create ROOT NAME
NUM_IDS GO_FILE` waits for GO_FILE, creates ids bot-0 .. bot-{NUM_IDS-1} in turn and prints what it got for each."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lora_server.adapters_store.registry import READY, AdapterVersion
from lora_server.adapters_store.repository import AdapterExists, AdapterRepository

REPO_ROOT = Path(__file__).resolve().parents[2]


def _record(adapter_id: str, writer: str, sha: str) -> AdapterVersion:
    return AdapterVersion("acme", adapter_id, 0, time.time(), sha, sha, sha, (4,), 1, writer, READY)


@pytest.fixture
def repository(tmp_path):
    return AdapterRepository.open(tmp_path / "repository")


def test_create_refuses_a_live_adapter_and_allows_one_deleted(repository):
    (sha,) = repository.write_blobs(b"weights")
    assert repository.append(_record("bot", "a", sha), must_be_new=True).version == 1
    with pytest.raises(AdapterExists):
        repository.append(_record("bot", "b", sha), must_be_new=True)
    assert repository.append(_record("bot", "b", sha)).version == 2  # a new version of an existing adapter
    repository.delete("acme", "bot", version=1)
    with pytest.raises(AdapterExists):  # version 2 still lives
        repository.append(_record("bot", "b", sha), must_be_new=True)
    repository.delete("acme", "bot")
    assert repository.append(_record("bot", "c", sha), must_be_new=True).version == 3  # numbers are never reused
    assert repository.listing("acme", "bot") == {1: True, 2: True, 3: False}
    assert repository.append(_record("other", "a", sha), must_be_new=True).version == 1  # ids are apart


@pytest.mark.slow  # two interpreters importing the store: a few seconds
def test_two_processes_creating_one_id_at_once_one_wins(repository, tmp_path):
    go_file, num_ids = tmp_path / "go", 40
    workers = {name: subprocess.Popen([sys.executable, "-m", "tests.store.test_repository_create",
                                       str(repository.root), name, str(num_ids), str(go_file)], cwd=REPO_ROOT,
                                      stdout=subprocess.PIPE, text=True) for name in ("p", "q")}
    go_file.touch()  # both start at once, and race for every id
    got = {name: json.loads(worker.communicate(timeout=120)[0]) for name, worker in workers.items()}
    assert all(worker.returncode == 0 for worker in workers.values())
    for i in range(num_ids):
        outcomes = sorted((got["p"][i], got["q"][i]), key=str)
        assert outcomes == [1, "exists"], (i, outcomes)  # exactly one created it, as version 1
        winner = "p" if got["p"][i] == 1 else "q"
        assert repository.listing("acme", f"bot-{i}") == {1: False}
        assert repository.entry("acme", f"bot-{i}", 1).base_fingerprint == winner  # the entry is the winner's


def main() -> None:
    root, name, num_ids, go_file = sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])
    repository = AdapterRepository.open(root)
    (sha,) = repository.write_blobs(b"weights")
    while not go_file.exists():
        time.sleep(0.001)
    outcomes: list[int | str] = []
    for i in range(num_ids):
        try:
            outcomes.append(repository.append(_record(f"bot-{i}", name, sha), must_be_new=True).version)
        except AdapterExists:
            outcomes.append("exists")
    print(json.dumps(outcomes))


if __name__ == "__main__":
    main()
