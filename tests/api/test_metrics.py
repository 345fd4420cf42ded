"""/metrics moves exactly as the requests made: counts, tokens, latency observations, per-adapter series, statuses."""

import random
import re

import pytest
from prometheus_client.parser import text_string_to_metric_families

from lora_server.api.adapter_traffic import LatencyCounts
from lora_server.api.metrics import LATENCY_BUCKETS, REQUEST_BUCKETS, ApiMetrics
from lora_server.demo import tasks
from tests.api.helpers import error_of, generate, metrics, sse_data, upload, value
from tests.api.server_process import ROOT

REQUESTS = "lora_server_requests_total"


def test_counters_and_histograms_move_exactly_as_the_requests_made(acme):
    before = metrics(acme)
    usages = [generate(acme).json()["usage"], generate(acme, adapter="upper").json()["usage"]]
    with acme.stream("POST", "/v1/generate", json={"prompt": tasks.make_prompt("hi there"), "adapter_id": "upper",
                                                   "stream": True}) as response:
        usages.append(sse_data(list(response.iter_lines()))[-1]["usage"])
    completion = acme.post("/v1/completions", json={"model": "rot13", "prompt": tasks.make_prompt("abc"),
                                                    "temperature": 0}).json()
    usages.append({"prompt_tokens": completion["usage"]["prompt_tokens"],
                   "completion_tokens": completion["usage"]["completion_tokens"]})
    assert generate(acme, adapter="missing").status_code == 404
    assert generate(acme, temperature=-1).status_code == 400
    after = metrics(acme)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    prompt_tokens = [u["prompt_tokens"] for u in usages]
    generated = [u["completion_tokens"] for u in usages]
    assert prompt_tokens == [16, 16, 13, 8] and generated == [12, 12, 9, 4]  # the texts' lengths, BOS and EOS
    assert delta(REQUESTS, route="/v1/generate", status="200") == 3
    assert delta(REQUESTS, route="/v1/completions", status="200") == 1
    assert delta(REQUESTS, route="/v1/generate", status="404") == 1
    assert delta(REQUESTS, route="/v1/generate", status="400") == 1
    assert delta("lora_server_finished_requests_total", finish_reason="stop") == 4
    assert delta("lora_server_prompt_tokens_total") == sum(prompt_tokens)
    assert delta("lora_server_generation_tokens_total") == sum(generated)
    for histogram in ("time_to_first_token", "e2e_request_latency", "request_queue_time"):
        assert delta(f"lora_server_{histogram}_seconds_count") == 4, histogram
    assert delta("lora_server_inter_token_latency_seconds_count") == sum(n - 1 for n in generated)
    assert delta("lora_server_adapter_requests_total", adapter="base") == 1
    assert delta("lora_server_adapter_requests_total", adapter="acme/upper") == 2
    assert delta("lora_server_adapter_generation_tokens_total", adapter="acme/upper") == 12 + 9
    assert delta("lora_server_adapter_prompt_tokens_total", adapter="acme/rot13") == 8
    for histogram in ("time_to_first_token", "e2e_request_latency"):  # per adapter, in the counters' series
        name = f"lora_server_adapter_{histogram}_seconds_count"
        assert (delta(name, adapter="base"), delta(name, adapter="acme/upper"), delta(name, adapter="acme/rot13")) == \
            (1, 2, 1), histogram


def test_upload_results_are_counted(acme):
    before = metrics(acme)
    assert upload(acme, "counted", "upper").status_code == 201
    assert upload(acme, "counted", "upper").status_code == 409
    assert acme.post("/v1/adapters", data={"adapter_id": "bad id!"},
                     files={"adapter_config": ("c", b"{}", "x"), "adapter_model": ("m", b"", "x")}).status_code == 400
    after = metrics(acme)
    name = "lora_server_adapter_uploads_total"
    assert {result: value(after, name, result=result) - value(before, name, result=result)
            for result in ("success", "conflict", "invalid", "too_large", "error")} == \
        {"success": 1, "conflict": 1, "invalid": 1, "too_large": 0, "error": 0}


def test_gauges_at_rest_and_adapters_per_tier(acme, globex):
    samples = metrics(acme)
    assert value(samples, "lora_server_requests_running") == value(samples, "lora_server_requests_waiting") == 0
    assert value(samples, "lora_server_kv_cache_usage_ratio") == 0
    assert value(samples, "lora_server_adapters", tier="device") >= 1
    assert 0 < value(samples, "lora_server_adapter_device_pool_used_bytes") <= \
        value(samples, "lora_server_adapter_device_pool_capacity_bytes")
    stored = sum(len(client.get(f"/v1/adapters/{a['id']}").json()["versions"])
                 for client in (acme, globex) for a in client.get("/v1/adapters").json()["data"])
    assert value(samples, "lora_server_adapters", tier="disk") == stored
    assert value(samples, "lora_server_adapter_loads_total", source="disk") >= 1


def test_a_401_is_counted_under_its_route(anonymous, acme):
    before = metrics(acme)
    assert anonymous.get("/v1/adapters").status_code == 401
    assert value(metrics(acme), REQUESTS, route="/v1/adapters", status="401") == \
        value(before, REQUESTS, route="/v1/adapters", status="401") + 1


def test_names_follow_prometheus_conventions(acme):
    text = acme.get("/metrics").text
    assert "_created" not in text, "no _created twins"
    families = list(text_string_to_metric_families(text))
    assert families and all(f.name.startswith("lora_server_") for f in families)
    types = {f.name: f.type for f in families}
    for family in families:
        if family.type == "counter":
            assert all(s.name.endswith("_total") for s in family.samples), family.name
        if family.type == "histogram":
            assert family.name.endswith("_seconds"), family.name
        if "bytes" in family.name or "usage" in family.name:
            assert family.name.endswith(("_bytes", "_ratio")), family.name
    assert types["lora_server_build_info"] == "gauge" and "lora_server_build_info{" in text
    assert error_of(acme.get("/v1/nothing")) and "unmatched" in acme.get("/metrics").text


def test_dashboards_and_alerts_use_only_metrics_the_server_exports(acme):
    exported = {name for name, _ in metrics(acme)}
    for path in (ROOT / "deploy/prometheus/alerts.yml", ROOT / "deploy/grafana/dashboards/lora-server.json"):
        used = set(re.findall(r"lora_server_[a-z0-9_]+", path.read_text()))
        assert used and used <= exported, f"{path.name}: {sorted(used - exported)}"


# ---------------------------------------------------------------- per-adapter latency, bounded like the counters

ADAPTER_HISTOGRAMS = {"lora_server_adapter_time_to_first_token_seconds": LATENCY_BUCKETS,
                      "lora_server_adapter_e2e_request_latency_seconds": REQUEST_BUCKETS}


@pytest.fixture
def rng() -> random.Random:
    seed = random.randrange(2**32)
    print(f"seed = {seed}")  # shown with a failure
    return random.Random(seed)


def test_latency_buckets_count_a_value_as_prometheus_le_does(rng):
    bounds = (0.1, 0.5, 1.0, 2.5)
    values = [rng.uniform(0, 3) for _ in range(200)] + list(bounds) + [0.0, 1e9]  # on a bound: in that bucket
    latencies = LatencyCounts(bounds)
    for v in values:
        latencies.observe(v)
    assert latencies.cumulative() == [(b, sum(v <= b for v in values)) for b in (*bounds, float("inf"))]
    assert latencies.count == len(values) and latencies.sum == pytest.approx(sum(values))
    copy = latencies.copy()
    latencies.observe(0.2)
    assert copy.count == len(values), "a copy does not share its buckets"


def scrape(api_metrics: ApiMetrics) -> dict[tuple[str, str, str], float]:
    """The per-adapter samples: (sample name, adapter, le or '') -> value."""
    return {(sample.name, sample.labels["adapter"], sample.labels.get("le", "")): sample.value
            for family in text_string_to_metric_families(api_metrics.render().decode())
            for sample in family.samples if "adapter" in sample.labels}


def test_per_adapter_latency_is_bounded_like_the_counters_and_exact_in_sum(rng):
    # 15 adapters by a power law (and the base model), 3 series; halfway, popularity reverses: adapters are promoted
    # and demoted.
    max_series = 3
    api_metrics = ApiMetrics(max_series, stats=lambda: None, num_stored_versions=lambda: None)
    adapters = [None] + [f"a{k}" for k in range(15)]
    alpha = rng.uniform(0.8, 1.5)
    weights = [1 / (k + 1) ** alpha for k in range(len(adapters))]
    observed: dict[str, list[float]] = {name: [] for name in ADAPTER_HISTOGRAMS}
    increase: dict[tuple[str, str], float] = {}  # (sample name, le) -> what increase() summed over adapters reads
    previous: dict[tuple[str, str, str], float] = {}
    seen: set[str] = set()
    for i in range(300):
        adapter = rng.choices(adapters, weights if i < 150 else weights[::-1])[0]
        ttft = None if rng.random() < 0.1 else rng.lognormvariate(-2, 1.5)  # None: aborted before its first token
        e2e = rng.lognormvariate(0, 1.5)
        api_metrics.record_finished("t", adapter, 1, "stop", 5, 7, e2e, ttft)
        observed["lora_server_adapter_e2e_request_latency_seconds"].append(e2e)
        if ttft is not None:
            observed["lora_server_adapter_time_to_first_token_seconds"].append(ttft)
        samples = scrape(api_metrics)
        labels = {adapter for name, adapter, _ in samples if name == "lora_server_adapter_requests_total"}
        assert "base" in labels and "other" in labels and len(labels) <= max_series + 2
        seen |= labels
        for name in ADAPTER_HISTOGRAMS:
            assert {adapter for sample, adapter, _ in samples if sample.startswith(name)} == labels, name
        for label in labels:  # the same request lands in the counter's and the histograms' series
            assert samples[("lora_server_adapter_e2e_request_latency_seconds_count", label, "")] == \
                samples[("lora_server_adapter_requests_total", label, "")], label
        for key, count in samples.items():
            before = previous.get(key, 0.0)
            # A series that is new, or whose adapter was re-promoted since, counts from zero: a counter reset.
            increase[key[0], key[2]] = increase.get((key[0], key[2]), 0.0) + (count - before if count >= before
                                                                              else count)
        previous = samples
    assert len(seen) > max_series + 2, "the workload promoted adapters"
    for name, bounds in ADAPTER_HISTOGRAMS.items():
        values = observed[name]
        for bound in (*bounds, float("inf")):
            le = "+Inf" if bound == float("inf") else str(float(bound))
            assert increase[f"{name}_bucket", le] == sum(v <= bound for v in values), (name, le)
        assert increase[f"{name}_count", ""] == len(values)
        assert increase[f"{name}_sum", ""] == pytest.approx(sum(values))


def test_per_adapter_queue_gauges_follow_the_counters_labels(rng):
    """Running and waiting requests per adapter: an adapter with its own counter series gets its own gauge series,
    every other one is summed into 'other', the base model into 'base'; the totals are the engine's."""
    from lora_server.engine.engine import EngineStats

    max_series = 2
    queue = {None: (rng.randint(0, 5), rng.randint(0, 5))}
    queue |= {("t", f"a{k}"): (rng.randint(0, 5), rng.randint(0, 5)) for k in range(6)}
    stats = EngineStats(num_running=sum(r for r, _ in queue.values()), num_waiting=sum(w for _, w in queue.values()),
                        num_kv_blocks=8, num_kv_blocks_used=0, num_preemptions=0, num_steps=0,
                        num_prompt_tokens_total=0, num_generated_tokens_total=0, num_step_failures=0,
                        num_step_retries=0, queue_by_adapter=queue)
    api_metrics = ApiMetrics(max_series, stats=lambda: stats, num_stored_versions=lambda: None)
    for adapter in ("a0", "a0", "a3"):  # a0 and a3 get their own series; a1, a2, a4, a5 are 'other'
        api_metrics.record_finished("t", adapter, 1, "stop", 1, 1, 0.1, 0.05)
    samples = scrape(api_metrics)
    for index, name in enumerate(("lora_server_adapter_requests_running", "lora_server_adapter_requests_waiting")):
        gauge = {adapter: value for (sample, adapter, _), value in samples.items() if sample == name}
        assert gauge == {"base": queue[None][index], "t/a0": queue["t", "a0"][index],
                         "t/a3": queue["t", "a3"][index],
                         "other": sum(queue["t", f"a{k}"][index] for k in (1, 2, 4, 5))}, name
    idle = ApiMetrics(max_series, stats=lambda: EngineStats(0, 0, 8, 0, 0, 0, 0, 0, 0, 0),
                      num_stored_versions=lambda: None)
    assert scrape(idle)[("lora_server_adapter_requests_waiting", "base", "")] == 0  # an idle server has its series
