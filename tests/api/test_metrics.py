"""/metrics moves exactly as the requests made: counts, tokens, latency observations, per-adapter series, statuses."""

import re

from prometheus_client.parser import text_string_to_metric_families

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
