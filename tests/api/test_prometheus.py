"""Observability checked, not assumed: a real Prometheus scrapes a running server while traffic flows, and every PromQL
expression of the shipped Grafana dashboard and every shipped alert rule is evaluated through Prometheus' HTTP API.
Skips (with the reason) where the `prometheus` binary is absent; `.ci/run` installs Debian's package."""

import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml

from tests.api.conftest import ACME_USER
from tests.api.server_process import ROOT, ServerProcess, free_port

DEPLOY = ROOT / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "lora-server.json"
ALERTS = DEPLOY / "prometheus" / "alerts.yml"
SCRAPE_INTERVAL_S = 1
DEADLINE_S = 60

needs_prometheus = pytest.mark.skipif(shutil.which("prometheus") is None or shutil.which("promtool") is None,
                                      reason="no `prometheus`/`promtool` on PATH (Debian: apt-get install prometheus)")


def dashboard_exprs() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel, rows' nested panels included."""
    panels = json.loads(DASHBOARD.read_text())["panels"]
    panels = panels + [inner for panel in panels for inner in panel.get("panels", [])]
    return [(panel.get("title", ""), target["expr"]) for panel in panels for target in panel.get("targets", [])
            if target.get("expr")]


def as_query(expr: str) -> str:
    """Grafana's variables as Grafana would fill them: every instance, a rate window of many scrape intervals."""
    return (expr.replace("$__rate_interval", "30s").replace("${instance:regex}", ".*").replace("$instance", ".*")
            .replace("$replica", ".*"))


@needs_prometheus
@pytest.mark.parametrize("args", [["check", "config", str(DEPLOY / "prometheus" / "prometheus.yml")],
                                  ["check", "rules", str(ALERTS)]], ids=["config", "rules"])
def test_promtool_accepts_the_shipped_files(args):
    done = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------- every alert fires on the state it is for (promtool)

MINUTES = 30  # of synthetic series, evaluated at the end: past every rule's `for`
ON = {"instance": "i", "job": "lora-server"}


def series(name: str, values: str, **labels: str) -> dict[str, str]:
    """promtool input: `values` in its expanding notation ('a+bxN': a, then N steps of b, one a minute)."""
    label_text = ",".join(f'{key}="{value}"' for key, value in {**ON, **labels}.items())
    return {"series": f"{name}{{{label_text}}}", "values": values}


def latency_series(name: str, per_minute: int, bucket: str, **labels: str) -> list[dict[str, str]]:
    """A histogram with `per_minute` observations a minute, each in the bucket whose upper bound is `bucket`."""
    return [series(f"{name}_count", f"0+{per_minute}x{MINUTES}", **labels)] + [
        series(f"{name}_bucket", f"0+{per_minute if float(le) >= float(bucket) else 0}x{MINUTES}", **labels, le=le)
        for le in ("0.1", "5.0", "10.0", "20.0", "+Inf")]


ADAPTER_TTFT = "lora_server_adapter_time_to_first_token_seconds"
# alert -> (synthetic series of the state it is for, the labels of the alerts it must raise: one dict each)
ALERT_CASES = {
    "LoraServerDown": ([series("up", f"0x{MINUTES}")], [ON]),
    "LoraServerQueueBacklog": ([series("lora_server_requests_waiting", f"40x{MINUTES}"),
                                series("lora_server_requests_running", f"4x{MINUTES}")], [ON]),
    "LoraServerKvCacheFull": ([series("lora_server_kv_cache_usage_ratio", f"0.99x{MINUTES}")], [ON]),
    "LoraServerPreempting": ([series("lora_server_preemptions_total", f"0+120x{MINUTES}")], [ON]),
    "LoraServerRejecting": ([series("lora_server_requests_total", f"0+60x{MINUTES}", route="/v1/generate", status=s)
                             for s in ("200", "429")], [{"instance": "i"}]),
    "LoraServerSlowFirstToken": (latency_series("lora_server_time_to_first_token_seconds", 10, "10.0"),
                                 [{"instance": "i"}]),
    # slow: 10 first tokens a minute, each 10-20 s; fast: each under 0.1 s; rare: slow, but too few for a p99.
    "LoraServerAdapterSlowFirstToken": (
        latency_series(ADAPTER_TTFT, 10, "20.0", adapter="t/slow") + latency_series(ADAPTER_TTFT, 10, "0.1",
                                                                                    adapter="t/fast")
        + latency_series(ADAPTER_TTFT, 1, "20.0", adapter="t/rare"), [{"instance": "i", "adapter": "t/slow"}]),
    "LoraServerAdapterLoadFailures": ([series("lora_server_adapter_load_failures_total", f"0+1x{MINUTES}")], [ON]),
}


def shipped_alerts() -> dict[str, dict]:
    return {rule["alert"]: rule for group in yaml.safe_load(ALERTS.read_text())["groups"] for rule in group["rules"]}


def test_every_shipped_alert_has_a_case():
    assert sorted(ALERT_CASES) == sorted(shipped_alerts())


@needs_prometheus
@pytest.mark.parametrize("alert", sorted(ALERT_CASES))
def test_each_alert_fires_on_the_state_it_is_for(alert, tmp_path):
    rule = shipped_alerts()[alert]
    inputs, raised = ALERT_CASES[alert]

    def expected(labels: dict[str, str]) -> dict:
        summary = re.sub(r"{{ \$labels\.(\w+) }}", lambda match: labels[match.group(1)], rule["annotations"]["summary"])
        return {"exp_labels": {**labels, **rule["labels"]}, "exp_annotations": {"summary": summary}}

    tests = {"rule_files": [str(ALERTS)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m", "input_series": inputs,
        "alert_rule_test": [{"eval_time": f"{MINUTES}m", "alertname": alert,
                             "exp_alerts": [expected(labels) for labels in raised]}]}]}
    (tmp_path / "tests.yml").write_text(json.dumps(tests))  # JSON is YAML
    done = subprocess.run(["promtool", "test", "rules", str(tmp_path / "tests.yml")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------- a real Prometheus scraping a real server


@pytest.fixture(scope="module")
def prometheus(server: ServerProcess, tmp_path_factory) -> Iterator[httpx.Client]:
    if shutil.which("prometheus") is None:
        pytest.skip("no `prometheus` on PATH (Debian: apt-get install prometheus)")
    root = tmp_path_factory.mktemp("prometheus")
    dead = f"127.0.0.1:{free_port()}"  # a target nothing answers on: LoraServerDown must go pending for it
    config = {"global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
              "rule_files": [str(ALERTS)],
              "scrape_configs": [{"job_name": "lora-server", "metrics_path": "/metrics",
                                  "static_configs": [{"targets": [server.url.removeprefix("http://"), dead]}]}]}
    (root / "prometheus.yml").write_text(json.dumps(config))  # JSON is YAML
    port = free_port()
    log = open(root / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    process = subprocess.Popen(["prometheus", f"--config.file={root / 'prometheus.yml'}",
                                f"--storage.tsdb.path={root / 'data'}", f"--web.listen-address=127.0.0.1:{port}"],
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=10) as client:
            _wait(lambda: _ready(client), "Prometheus to be ready", root)
            yield client
    finally:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
        log.close()


def drive_traffic(server: ServerProcess) -> None:
    headers = {"Authorization": f"Bearer {ACME_USER}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        for adapter in (None, "upper", "rot13", None):
            response = client.post("/v1/generate", json={"prompt": "abc def => ", "adapter_id": adapter,
                                                         "max_new_tokens": 8})
            assert response.status_code == 200, response.text
            with client.stream("POST", "/v1/generate", json={"prompt": "gh => ", "adapter_id": adapter,
                                                             "max_new_tokens": 8, "stream": True}) as stream:
                assert stream.status_code == 200
                stream.read()


@needs_prometheus
@pytest.mark.slow  # ~20 s: two rounds of traffic, and rate() windows filling at one scrape a second
def test_every_dashboard_expression_and_alert_rule_evaluates(server, prometheus):
    # Traffic, then again after Prometheus has scraped once: rate() needs two samples that differ.
    drive_traffic(server)
    _wait(lambda: bool(_query(prometheus, 'lora_server_requests_total')), "a first scrape of the server")
    drive_traffic(server)
    exprs = dashboard_exprs()
    assert len(exprs) >= 15
    missing: dict[str, str] = {}

    def all_return_data() -> bool:
        missing.clear()
        for title, expr in exprs:
            if not _query(prometheus, as_query(expr)):
                missing[title] = expr
        return not missing

    _wait(all_return_data, "every dashboard expression to return data", detail=lambda: missing)

    rules = {rule["name"]: rule for group in _get(prometheus, "/api/v1/rules")["groups"] for rule in group["rules"]}
    shipped = [line.split(":", 1)[1].strip() for line in ALERTS.read_text().splitlines()
               if line.strip().startswith("- alert:")]
    assert sorted(rules) == sorted(shipped)
    for name, rule in rules.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
        _query(prometheus, rule["query"])  # evaluates without an error (an empty result is a quiet alert)

    def down_is_pending() -> bool:
        states = {name: rule["state"] for group in _get(prometheus, "/api/v1/rules")["groups"]
                  for name, rule in ((r["name"], r) for r in group["rules"])}
        return states["LoraServerDown"] == "pending"

    _wait(down_is_pending, "LoraServerDown to go pending for the dead target")
    alerts = _get(prometheus, "/api/v1/alerts")["alerts"]
    # The healthy server raises nothing; only the dead target does.
    assert {(a["labels"]["alertname"], a["labels"]["instance"]) for a in alerts} == {
        ("LoraServerDown", a["labels"]["instance"]) for a in alerts if a["labels"]["alertname"] == "LoraServerDown"}
    assert all(a["labels"]["instance"] != server.url.removeprefix("http://") for a in alerts), alerts


# ---------------------------------------------------------------- helpers


def _ready(client: httpx.Client) -> bool:
    try:
        return client.get("/-/ready").status_code == 200
    except httpx.TransportError:
        return False


def _get(client: httpx.Client, path: str, **params: str) -> dict:
    response = client.get(path, params=params)
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (path, params, body)
    return body["data"]


def _query(client: httpx.Client, promql: str) -> list:
    """The instant query's result (raises on a PromQL error); NaN samples count as no data."""
    data = _get(client, "/api/v1/query", query=promql)
    return [sample for sample in data["result"] if sample["value"][1] not in ("NaN", "+Inf", "-Inf")]


def _wait(condition, what: str, root: Path | None = None, detail=lambda: "") -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():
        if time.monotonic() > deadline:
            log = (root / "prometheus.log").read_text()[-3000:] if root else ""
            raise AssertionError(f"waited {DEADLINE_S} s for {what}: {detail()}\n{log}")
        time.sleep(0.5)


def test_dashboard_imports_into_an_existing_grafana():
    # A datasource variable (not a hard-coded uid), and instance and replica variables (a cluster's ingress is one
    # target whose replicas differ by the `replica` label, see server/cluster) that every query is scoped by.
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {variable["name"]: variable for variable in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    assert variables["instance"]["includeAll"] and variables["instance"]["datasource"]["uid"] == "${datasource}"
    assert variables["replica"]["includeAll"] and variables["replica"]["allValue"] == ".*"  # also series without it
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    for title, expr in dashboard_exprs():
        names = re.findall(r"lora_server_\w+(\{[^}]*\})?", expr)
        assert names and all('instance=~"$instance", replica=~"$replica"' in labels for labels in names), (title, expr)
    titles = " ".join(panel["title"] for panel in dashboard["panels"]).lower()
    assert "residency" in titles
