"""Two single servers (`lora-server serve`) on one shared adapter repository: an upload answered 201 by one is served
by the other at once, a new version hot-swaps on both, a delete on one is a 404 on both, and two POSTs of one id at
the same instant, one to each, get one 201 and one 409 (as on one server)."""

import threading

import httpx
import pytest

from tests.api.helpers import expected, generate, put_version, upload
from tests.api.server_process import ServerProcess


@pytest.mark.slow  # two servers start: the demo model loads twice
def test_two_servers_on_one_repository_see_each_others_uploads_and_deletes(tmp_path):
    repository = tmp_path / "repository"
    servers = [ServerProcess(tmp_path / name, "--adapter-repository", str(repository)) for name in ("a", "b")]
    try:
        a_server, b_server = (server.wait_ready() for server in servers)
        with httpx.Client(base_url=a_server.url, timeout=60) as a, httpx.Client(base_url=b_server.url, timeout=60) as b:
            assert upload(a, "shared", "upper").status_code == 201
            answer = generate(b, adapter="shared").json()  # no wait: visible once the upload answered
            assert (answer["text"], answer["adapter_version"]) == (expected("upper"), 1)
            assert put_version(b, "shared", "reverse").status_code == 201
            answer = generate(a, adapter="shared").json()
            assert (answer["text"], answer["adapter_version"]) == (expected("reverse"), 2)
            assert a.delete("/v1/adapters/shared").status_code == 200
            assert generate(b, adapter="shared").status_code == 404
            # The demo adapters were registered once, by whichever server started first, and both serve them.
            assert generate(b, adapter="title").json()["text"] == expected("title")
            for i in range(5):  # each pair released at once: create-if-absent is decided by the repository
                statuses: list[int] = []
                go = threading.Barrier(2)

                def post(client: httpx.Client, adapter_id: str = f"race-{i}", go: threading.Barrier = go,
                         statuses: list[int] = statuses) -> None:
                    go.wait()
                    statuses.append(upload(client, adapter_id, "upper").status_code)

                threads = [threading.Thread(target=post, args=(client,)) for client in (a, b)]
                for thread in threads:
                    thread.start()
                for thread in threads:
                    thread.join()
                assert sorted(statuses) == [201, 409], (i, statuses)
    finally:
        for server in servers:
            server.stop()
