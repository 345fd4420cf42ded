"""The load generator's arithmetic, without a server: S-LoRA's workload, percentiles, goodput, trace replay."""

import json
import random

import numpy as np
import pytest

from lora_server.loadtest.client import Result
from lora_server.loadtest.errors import LoadtestError
from lora_server.loadtest.stats import Slo, distribution, summarize
from lora_server.loadtest.workload import (
    SLoraWorkload,
    adapter_probabilities,
    gamma_arrivals,
    load_trace,
    slora_jobs,
    with_adapter,
)


def test_percentiles_interpolate_like_numpy_not_off_by_one():
    # The old nearest-rank code gave p50 = 6 and p90 = 10 for 1..10.
    row = distribution([float(v) for v in range(1, 11)])
    assert row["p50"] == pytest.approx(5.5) and row["p90"] == pytest.approx(9.1) and row["p99"] == pytest.approx(9.91)
    assert row["mean"] == pytest.approx(5.5)
    assert np.isnan(distribution([])["p50"])


def test_power_law_probabilities():
    assert adapter_probabilities(4, 0.0) == pytest.approx([0.25] * 4)
    p = adapter_probabilities(3, 1.0)
    assert p == pytest.approx(np.array([1, 1 / 2, 1 / 3]) / (1 + 1 / 2 + 1 / 3))


def test_slora_jobs_follow_the_power_law_and_the_gamma_rate():
    seed = random.randrange(1 << 30)
    workload = SLoraWorkload(rate=50.0, cv=2.0, alpha=1.0, num_requests=20_000, input_words=(2, 5),
                             output_tokens=(3, 9))
    adapters = [f"a{i}" for i in range(10)]
    jobs = slora_jobs(workload, adapters, seed)
    counts = np.array([sum(job.adapter == name for job in jobs) for name in adapters])
    expected = adapter_probabilities(10, 1.0) * len(jobs)
    assert np.all(np.abs(counts - expected) < 6 * np.sqrt(expected)), (seed, counts, expected)
    assert all(job.adapter_rank == adapters.index(job.adapter) + 1 for job in jobs[:100]), seed
    gaps = np.diff([job.arrival_s for job in jobs])
    assert gaps.mean() == pytest.approx(1 / 50, rel=0.1), seed
    assert gaps.std() / gaps.mean() == pytest.approx(2.0, rel=0.15), seed
    assert all(3 <= job.max_new_tokens <= 9 and 2 <= len(job.prompt.split()) - 1 <= 5 for job in jobs), seed
    assert slora_jobs(workload, adapters, seed) == jobs  # the seed names the workload


def test_gamma_arrivals_start_at_zero_and_grow():
    arrivals = gamma_arrivals(np.random.default_rng(1), 5.0, 0.5, 50)
    assert arrivals[0] == 0 and np.all(np.diff(arrivals) >= 0)


def test_baseline_jobs_keep_arrivals_and_lengths():
    jobs = slora_jobs(SLoraWorkload(2.0, 1.0, 1.0, 20, (2, 4), (4, 8)), ["x", "y"], seed=3)
    base = with_adapter(jobs, None)
    assert [(j.arrival_s, j.prompt, j.max_new_tokens) for j in base] == [
        (j.arrival_s, j.prompt, j.max_new_tokens) for j in jobs]
    assert {j.adapter for j in base} == {None}


def test_bad_workload_options_are_one_line_errors():
    with pytest.raises(LoadtestError, match="--rate"):
        SLoraWorkload(0.0, 1.0, 1.0, 1, (1, 2), (1, 2))
    with pytest.raises(LoadtestError, match="--output-tokens"):
        SLoraWorkload(1.0, 1.0, 1.0, 1, (1, 2), (3, 2))


def test_trace_replay_is_relative_and_ranks_by_frequency(tmp_path):
    rows = [{"timestamp": 100.5, "adapter": "b", "prompt": "x", "max_new_tokens": 4},
            {"timestamp": 100.0, "model": "a", "prompt": "y"},
            {"timestamp": 101.0, "adapter": "b", "prompt": "z", "max_new_tokens": 2},
            {"timestamp": 102.0, "adapter": None, "prompt": "w"}]
    trace = tmp_path / "trace.jsonl"
    trace.write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    jobs = load_trace(trace)
    assert [(j.arrival_s, j.adapter, j.adapter_rank) for j in jobs] == [(0.0, "a", 2), (0.5, "b", 1), (1.0, "b", 1),
                                                                         (2.0, None, 0)]
    trace.write_text('{"prompt": "ok"}\nnot json\n')
    with pytest.raises(LoadtestError, match=r"trace.jsonl:2"):
        load_trace(trace)


def test_goodput_counts_only_requests_within_every_slo():
    fast = Result("a", 1, 0.0, status=200, ttft_s=0.05, e2e_s=0.5, completion_tokens=10, prompt_tokens=3)
    slow_first = Result("a", 1, 0.0, status=200, ttft_s=0.5, e2e_s=0.6, completion_tokens=10, prompt_tokens=3)
    failed = Result("b", 2, 0.0, status=404, error="no adapter")
    assert fast.tpot_s == pytest.approx(0.05)
    summary = summarize([fast, slow_first, failed], wall_s=2.0, slo=Slo(ttft_ms=100, tpot_ms=60))
    assert summary["goodput"] == pytest.approx(0.5)
    assert summary["request_throughput"] == pytest.approx(1.0)
    assert summary["output_tokens"] == 20 and summary["errors_by_status"] == {"404": 1}
    assert summary["by_rank"]["1"]["requests"] == 2
