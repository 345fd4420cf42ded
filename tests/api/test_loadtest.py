"""The black-box load generator against real servers: every request accounted for with the server's own token counts,
adapters uploaded through the API, baselines, outputs, and one-line errors."""

import json
import subprocess
import sys
from collections.abc import Iterator

import pytest

from tests.api.conftest import ACME_USER, _serve
from tests.api.server_process import ROOT, ServerProcess, free_port


def loadtest(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "lora_server.loadtest", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=180)


@pytest.fixture(scope="module")
def merge_open_server(api_root) -> Iterator[ServerProcess]:
    # Its own open server: the uploaded adapters stay out of the shared server's tenants, and merging is allowed.
    yield from _serve(api_root / "loadtest", "--merge-policy", "manual")


def test_both_routes_count_tokens_from_the_servers_usage(server):
    for route in ("generate", "completions"):
        done = loadtest("--url", server.url, "--api-key", ACME_USER, "--route", route, "--workload", "closed",
                        "--num-requests", "8", "--concurrency", "4", "--output-tokens", "6:6",
                        "--adapters", "upper,rot13", "--json")
        assert done.returncode == 0, done.stderr + done.stdout
        [point] = json.loads(done.stdout)["points"]
        summary = point["summary"]
        assert summary["ok"] == 8 and summary["errors_by_status"] == {}
        assert sum(row["requests"] for row in summary["by_rank"].values()) == 8
        # The demo's adapters stop at EOS: at most 6 tokens each, counted the same way on both routes.
        assert 0 < summary["output_tokens"] <= 8 * 6 and summary["prompt_tokens"] > 0
        assert summary["latency"]["ttft_ms"]["p50"] <= summary["latency"]["e2e_ms"]["p50"]


def test_slora_sweep_with_uploaded_adapters_baselines_and_outputs(merge_open_server, tmp_path):
    out = tmp_path / "out"
    done = loadtest("--url", merge_open_server.url, "--upload-adapters", "4", "--ranks", "4,8",
                    "--adapter-prefix", "lt", "--num-adapters", "4", "--alpha", "1", "--rate", "20,40",
                    "--num-requests", "6", "--output-tokens", "2:4", "--baselines", "--slo-ttft-ms", "60000",
                    "--out", str(out))
    assert done.returncode == 0, done.stderr + done.stdout
    run = json.loads((out / "summary.json").read_text())
    assert [(p["rate"], p["mode"]) for p in run["points"]] == [(20, "lora"), (20, "base"), (20, "merged"),
                                                               (40, "lora"), (40, "base"), (40, "merged")]
    assert run["notes"] == []
    for point in run["points"]:
        assert point["summary"]["ok"] == 6 and point["summary"]["goodput"] > 0, point
    rows = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    assert len(rows) == 36 and all(row["ok"] for row in rows)
    assert {row["adapter"] for row in rows if row["mode"] == "base"} == {None}
    assert {row["adapter"] for row in rows if row["mode"] == "merged"} == {"lt-0000"}
    assert {row["adapter"] for row in rows if row["mode"] == "lora"} <= {f"lt-{i:04d}" for i in range(4)}
    for name in ("latency_cdf.png", "rate_sweep.png", "ttft_by_rank.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    report = (out / "report.md").read_text()
    assert "LoRA / base" in report and "rate_sweep.png" in report
    # Uploaded with mixed ranks, shaped for the served model; a rerun keeps them.
    models = loadtest("--url", merge_open_server.url, "--upload-adapters", "4", "--ranks", "4,8",
                      "--adapter-prefix", "lt", "--num-requests", "1", "--json", "--rate", "50")
    assert models.returncode == 0, models.stderr


def test_unreachable_server_is_one_line():
    done = loadtest("--url", f"http://127.0.0.1:{free_port()}", "--num-requests", "1")
    assert done.returncode == 2
    assert done.stderr.startswith("lora-loadtest: error: cannot reach the server at") and "Traceback" not in done.stderr
    assert done.stderr.count("\n") == 1


def test_missing_key_and_unknown_adapter_are_one_line(server):
    done = loadtest("--url", server.url, "--num-requests", "1")
    assert done.returncode == 2 and "HTTP 401" in done.stderr and "--api-key" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr
    done = loadtest("--url", server.url, "--api-key", ACME_USER, "--adapters", "upper,nosuch", "--num-requests", "1")
    assert done.returncode == 2 and "unknown adapter 'nosuch'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_trace_replay(merge_open_server, tmp_path):
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps(row) for row in [
        {"timestamp": 10.0, "adapter": "upper", "prompt": "ab cd => ", "max_new_tokens": 3},
        {"timestamp": 10.1, "adapter": None, "prompt": "ef => ", "max_new_tokens": 3},
        {"timestamp": 10.2, "adapter": "upper", "prompt": "gh => ", "max_new_tokens": 3}]))
    done = loadtest("--url", merge_open_server.url, "--workload", "trace", "--trace", str(trace), "--json")
    assert done.returncode == 0, done.stderr
    [point] = json.loads(done.stdout)["points"]
    assert point["summary"]["ok"] == 3 and set(point["summary"]["by_rank"]) == {"0", "1"}
