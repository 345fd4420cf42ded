"""The local Ray cluster the Ray tests share (started once per session, only when a test asks for it): two CPU
replicas of the demo model on one shared repository, behind the ingress."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.api.server_process import free_port

STARTUP_TIMEOUT_S = 180


@dataclass(frozen=True)
class Cluster:
    url: str
    repository: Path
    log: Path


@pytest.fixture(scope="session")
def cluster(tmp_path_factory) -> Cluster:
    pytest.importorskip("ray.serve", reason="the `cluster` extra (ray[serve]) is not installed")
    work = tmp_path_factory.mktemp("cluster")
    port = free_port()
    log_path = work / "cluster.log"
    log = open(log_path, "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen([sys.executable, "-m", "lora_server", "serve-cluster", "--num-replicas", "2",
                                "--num-cpus-per-replica", "0.5", "--adapter-repository", str(work / "repository"),
                                "--port", str(port)], cwd=work, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "RAY_DEDUP_LOGS": "0"})
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + STARTUP_TIMEOUT_S
    try:
        while True:
            assert process.poll() is None and time.monotonic() < deadline, log_path.read_text()[-6000:]
            try:
                if httpx.get(f"{url}/ready", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        yield Cluster(url, work / "repository", log_path)
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
