"""The black-box load generator runs against a real server and accounts for every request."""

import json
import subprocess
import sys

from tests.api.conftest import ACME_USER
from tests.api.server_process import ROOT


def test_loadtest_streams_every_request_and_reports_latencies(server):
    for route in ("generate", "completions"):
        done = subprocess.run([sys.executable, "-m", "lora_server.loadtest", "--url", server.url,
                               "--api-key", ACME_USER,
                               "--route", route, "--requests", "10", "--concurrency", "4", "--max-new-tokens", "8",
                               "--adapters", "base,upper,rot13", "--json"],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr + done.stdout
        summary = json.loads(done.stdout)
        assert summary["ok"] == 10 and summary["statuses"] == {"200": 10}
        assert sum(summary["by_adapter"].values()) == 10
        assert 0 < summary["output_tokens"] <= 10 * 8
        assert summary["latency"]["ttft_ms"]["p50"] <= summary["latency"]["e2e_ms"]["p50"]
