"""Soak: two tenants generate (streamed and not, greedy and seeded) on a running server while uploads, hot-swaps,
deletes, merges and bad requests (out-of-range numbers, lone surrogates, bad ids) happen under them. Bounded:
`--soak-seconds` (default 90 in CI; longer by the flag).

At the end: no 5xx anywhere; every greedy answer was the exact text its adapter gives alone; nothing is left running
or waiting, no KV block is held and no step failed; every adapter that answered 201 and was not deleted is listed with
all its versions; the server's resident memory is flat over the second half of the run.
"""

import json
import random
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import pytest

from lora_server.demo import tasks
from tests.api.conftest import ACME_ADMIN, GLOBEX_ADMIN, KEYS
from tests.api.helpers import HELLO, expected, generate, metrics, put_version, sse_data, upload, value, wait_for
from tests.api.server_process import ServerProcess

MAX_RSS_GROWTH_BYTES = 64 << 20  # over the second half of the run; the demo model itself is ~10 MiB
TENANT_KEYS = {"acme": ACME_ADMIN, "globex": GLOBEX_ADMIN}


class Soak:
    def __init__(self, server: ServerProcess, seconds: float, seed: int) -> None:
        self.server, self.seed = server, seed
        self.deadline = time.monotonic() + seconds
        self.lock = threading.Lock()
        self.statuses: Counter = Counter()  # (what, status) -> count
        self.server_errors: list[str] = []
        self.wrong_texts: list[str] = []
        self.kept: dict[tuple[str, str], int] = {}  # (tenant, adapter id) -> versions stored, for those not deleted
        self.rss: list[tuple[float, int]] = []  # (seconds into the run, bytes)

    def running(self) -> bool:
        return time.monotonic() < self.deadline

    def client(self, tenant: str) -> httpx.Client:
        return httpx.Client(base_url=self.server.url, headers={"Authorization": f"Bearer {TENANT_KEYS[tenant]}"},
                            timeout=60)

    def note(self, what: str, response: httpx.Response, allowed: tuple[int, ...]) -> int:
        with self.lock:
            self.statuses[what, response.status_code] += 1
            if response.status_code >= 500 or response.status_code not in allowed:
                self.server_errors.append(f"{what}: {response.status_code} {response.text[:300]}")
        return response.status_code

    def check_text(self, what: str, got: str, want: str) -> None:
        if got != want:
            with self.lock:
                self.wrong_texts.append(f"{what}: {got!r} != {want!r}")

    # ---------------------------------------------------------------- the workers

    def generator(self, tenant: str, worker: int) -> None:
        rng = random.Random(self.seed * 100 + worker)
        with self.client(tenant) as client:
            while self.running():
                adapter = rng.choice([None, *tasks.ADAPTER_NAMES])
                seeded = rng.random() < 0.2
                fields = {"temperature": 0.8, "seed": rng.randrange(2**32)} if seeded else {}
                if rng.random() < 0.5:
                    response = generate(client, HELLO, adapter, **fields)
                    if self.note("generate", response, (200,)) == 200 and not seeded:
                        self.check_text(f"{tenant} {adapter}", response.json()["text"], expected(adapter))
                    continue
                body = {"prompt": tasks.make_prompt(HELLO), "adapter_id": adapter, "max_new_tokens": 40,
                        "stream": True, **fields}
                with client.stream("POST", "/v1/generate", json=body) as response:
                    lines = list(response.iter_lines())
                if self.note("generate-stream", response, (200,)) == 200 and not seeded:
                    events = [e for e in sse_data(lines) if isinstance(e, dict)]
                    if events and "error" not in events[-1]:
                        text = "".join(e.get("text", "") for e in events)
                        self.check_text(f"{tenant} {adapter} streamed", text, expected(adapter))
                    else:
                        with self.lock:
                            self.server_errors.append(f"stream ended without a final event: {lines[-3:]}")

    def churner(self, tenant: str) -> None:
        rng = random.Random(self.seed * 100 + 99)
        with self.client(tenant) as client:
            number = 0
            while self.running():
                number += 1
                adapter_id = f"churn-{number}"
                first, second = rng.sample(tasks.ADAPTER_NAMES, 2)
                if self.note("upload", upload(client, adapter_id, first), (201,)) != 201:
                    continue
                response = generate(client, HELLO, adapter_id)
                if self.note("generate-new-adapter", response, (200,)) == 200:
                    self.check_text(f"{adapter_id} v1", response.json()["text"], expected(first))
                if self.note("put", put_version(client, adapter_id, second), (201,)) != 201:
                    continue
                response = generate(client, HELLO, adapter_id)
                if self.note("generate-new-version", response, (200,)) == 200:
                    self.check_text(f"{adapter_id} v2", response.json()["text"], expected(second))
                if number % 3 == 0:  # kept: must survive to the end
                    with self.lock:
                        self.kept[tenant, adapter_id] = 2
                    continue
                self.note("delete", client.delete(f"/v1/adapters/{adapter_id}"), (200,))
                self.note("generate-deleted", generate(client, HELLO, adapter_id), (404,))

    def attacker(self, tenant: str) -> None:
        """Bad requests in the middle of everyone's traffic: each is this caller's 400, and nobody else's problem."""
        prompt = tasks.make_prompt(HELLO)
        bad_bodies = [
            {"prompt": prompt, "temperature": 1, "seed": 2**64},
            {"prompt": prompt, "temperature": 1e-40},
            {"prompt": "\ud800", "max_new_tokens": 4},
            {"prompt": prompt, "adapter_id": "\ud800"},
            {"prompt": prompt, "adapter_id": ".."},
        ]
        rng = random.Random(self.seed * 100 + 55)
        with self.client(tenant) as client:
            while self.running():
                body = rng.choice(bad_bodies)
                # Encoded here: json.dumps escapes a lone surrogate as \ud800, which httpx's own encoder refuses to.
                response = client.post("/v1/generate", content=json.dumps(body).encode(),
                                       headers={"Content-Type": "application/json"})
                self.note("bad-generate", response, (400,))
                time.sleep(0.05)

    def merger(self, tenant: str) -> None:
        rng = random.Random(self.seed * 100 + 77)
        with self.client(tenant) as client:
            while self.running():
                adapter = rng.choice(tasks.ADAPTER_NAMES)
                # 409: another adapter is merged (or another tenant's is); 403 where merging is an operator's call.
                self.note("merge", client.post(f"/v1/adapters/{adapter}/merge"), (200, 403, 409))
                time.sleep(rng.uniform(0.2, 1.0))
                self.note("unmerge", client.delete(f"/v1/adapters/{adapter}/merge"), (200, 403, 409))
                time.sleep(rng.uniform(0.1, 0.5))

    def memory_sampler(self) -> None:
        start = time.monotonic()
        status = Path(f"/proc/{self.server.process.pid}/status")
        while self.running():
            rss_kib = next(int(line.split()[1]) for line in status.read_text().splitlines()
                           if line.startswith("VmRSS:"))
            self.rss.append((time.monotonic() - start, rss_kib * 1024))
            time.sleep(1.0)


@pytest.mark.slow
def test_soak(tmp_path, soak_seconds, rng):
    keys_file = tmp_path / "keys.json"
    keys_file.write_text(json.dumps(KEYS))
    server = ServerProcess(tmp_path / "soak", "--api-keys", str(keys_file), "--merge-policy", "manual",
                           "--max-num-seqs", "8").wait_ready()
    try:
        soak = Soak(server, soak_seconds, rng.randrange(2**31))
        workers = [threading.Thread(target=soak.memory_sampler)]
        for tenant in TENANT_KEYS:
            workers += [threading.Thread(target=soak.generator, args=(tenant, i)) for i in range(2)]
            workers += [threading.Thread(target=soak.churner, args=(tenant,)),
                        threading.Thread(target=soak.merger, args=(tenant,)),
                        threading.Thread(target=soak.attacker, args=(tenant,))]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=soak_seconds + 120)
        assert not any(worker.is_alive() for worker in workers), "a soak worker hung"

        assert soak.server_errors == [], soak.server_errors[:10]
        assert soak.wrong_texts == [], soak.wrong_texts[:10]
        done = soak.statuses
        assert done["generate", 200] + done["generate-stream", 200] >= 20, done
        assert done["upload", 201] >= 2 and done["delete", 200] >= 1 and done["merge", 200] >= 1, done

        with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {ACME_ADMIN}"}) as admin:
            def idle() -> bool:
                samples = metrics(admin)
                return (value(samples, "lora_server_requests_running") + value(samples, "lora_server_requests_waiting")
                        == 0 and value(samples, "lora_server_kv_cache_usage_ratio") == 0)

            wait_for(idle, timeout_s=10)
            assert value(metrics(admin), "lora_server_engine_step_failures_total") == 0
        for (tenant, adapter_id), num_versions in soak.kept.items():
            with soak.client(tenant) as client:
                detail = client.get(f"/v1/adapters/{adapter_id}")
                assert detail.status_code == 200, (tenant, adapter_id, detail.text)
                assert [v["version"] for v in detail.json()["versions"]] == list(range(1, num_versions + 1))

        second_half = [rss for t, rss in soak.rss if t >= soak_seconds / 2]
        assert len(second_half) >= 2, soak.rss
        assert max(second_half) - second_half[0] < MAX_RSS_GROWTH_BYTES, \
            f"resident memory grew {(max(second_half) - second_half[0]) >> 20} MiB over the second half: {soak.rss}"
    finally:
        server.stop()
