"""Merging and combining adapters over HTTP: a merge changes no one's greedy output (the merged adapter's, another
adapter's, the base model's, sent together so they share batches), /metrics and GET /v1/adapters/{id} follow the
switches; refusals are 409 (policy not manual, not merged, another tenant's adapter merged: named to no one), 403 (a
user key) and 404 (another tenant's adapter); a combined adapter generates what its sources say, and bad combine
requests are 400s naming the field."""

import argparse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lora_server.api.serve import add_serve_arguments, engine_options
from tests.api.conftest import ACME_ADMIN, ACME_USER, GLOBEX_ADMIN, client_for
from tests.api.helpers import HELLO, error_of, expected, generate, metrics, upload, value, wait_for

TEXTS = (HELLO, "merged mode", "hot swap")
ADAPTERS = (None, "upper", "title", "rot13")
MERGED_MODE = "lora_server_merged_mode"
SWITCHES = "lora_server_merge_switches_total"
MERGED_INFO = "lora_server_merged_adapter_info"
MERGE_TIMEOUT_S = 10  # the demo adapter is on the device at once: a merge that takes longer is stuck


@pytest.fixture(scope="module")
def admin(merge_server) -> Iterator[httpx.Client]:
    with client_for(merge_server, ACME_ADMIN) as client:
        yield client


@pytest.fixture(scope="module")
def user(merge_server) -> Iterator[httpx.Client]:
    with client_for(merge_server, ACME_USER) as client:
        yield client


@pytest.fixture(scope="module")
def other_tenant(merge_server) -> Iterator[httpx.Client]:
    with client_for(merge_server, GLOBEX_ADMIN) as client:
        yield client


def all_outputs(client: httpx.Client) -> dict[tuple[str | None, str], str]:
    """Every (adapter, text) pair's greedy text, all requests in flight at once so they share batches."""
    jobs = [(adapter, text) for adapter in ADAPTERS for text in TEXTS]
    with ThreadPoolExecutor(len(jobs)) as pool:
        responses = list(pool.map(lambda job: generate(client, job[1], job[0]), jobs))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    return {job: r.json()["text"] for job, r in zip(jobs, responses, strict=True)}


def merged_mode_is(client: httpx.Client, mode: int) -> bool:
    # /metrics reads the engine's snapshot of its last step, which may trail the merge's answer by one step.
    return value(metrics(client), MERGED_MODE) == mode


# ---------------------------------------------------------------- flags


def serve_args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_serve_arguments(parser)
    return parser.parse_args(list(argv))


def test_merge_flags_reach_the_engine_options():
    assert engine_options(serve_args()).merge_policy == "off"
    options = engine_options(serve_args("--merge-policy", "auto", "--merge-window-steps", "8", "--merge-share", "0.8",
                                        "--unmerge-share", "0.4", "--merge-min-steps-between-switches", "16",
                                        "--merge-budget-bytes", "2MiB"))
    assert (options.merge_policy, options.merge_window_steps, options.merge_share, options.unmerge_share,
            options.merge_min_steps_between_switches, options.merge_budget_bytes) == ("auto", 8, 0.8, 0.4, 16, 2 << 20)
    with pytest.raises(ValueError, match="unmerge_share"):  # before the model loads, not after
        engine_options(serve_args("--merge-share", "0.5", "--unmerge-share", "0.7"))
    with pytest.raises(SystemExit):
        serve_args("--merge-policy", "sometimes")


# ---------------------------------------------------------------- merge


def test_merging_and_unmerging_change_no_output(admin):
    unmerged = all_outputs(admin)
    assert all(unmerged[adapter, HELLO] == expected(adapter) for adapter in ADAPTERS)
    switches = value(metrics(admin), SWITCHES)

    response = admin.post("/v1/adapters/upper/merge", timeout=MERGE_TIMEOUT_S)
    assert response.status_code == 200 and response.json() == {"adapter_id": "upper", "version": 1, "merged": True}
    wait_for(lambda: merged_mode_is(admin, 1))
    samples = metrics(admin)
    assert value(samples, SWITCHES) == switches + 1
    assert value(samples, MERGED_INFO, adapter="acme/upper") == 1
    assert admin.get("/v1/adapters/upper").json()["merged"] is True
    assert admin.get("/v1/adapters/title").json()["merged"] is False
    assert all_outputs(admin) == unmerged

    response = admin.delete("/v1/adapters/upper/merge")
    assert response.status_code == 200 and response.json() == {"adapter_id": "upper", "merged": False}
    wait_for(lambda: merged_mode_is(admin, 0))
    samples = metrics(admin)
    assert value(samples, SWITCHES) == switches + 2
    assert not any(name == MERGED_INFO for name, _ in samples), "no merged adapter, no series"
    assert value(samples, "lora_server_merge_mode_seconds_total", mode="merged") > 0
    assert value(samples, "lora_server_merge_switch_seconds_total") > 0
    assert admin.get("/v1/adapters/upper").json()["merged"] is False
    assert all_outputs(admin) == unmerged


def test_unmerging_what_is_not_merged_is_a_409(admin):
    response = admin.delete("/v1/adapters/title/merge")
    assert response.status_code == 409 and "not merged" in error_of(response)["message"]


def test_merging_needs_the_manual_policy(acme):  # the main server runs with --merge-policy off
    for response in (acme.post("/v1/adapters/upper/merge"), acme.delete("/v1/adapters/upper/merge")):
        assert response.status_code == 409, response.text
        error = error_of(response)
        assert error["type"] == "conflict_error" and "--merge-policy manual" in error["message"]


def test_users_cannot_merge_or_combine(user):
    for response in (user.post("/v1/adapters/upper/merge"), user.delete("/v1/adapters/upper/merge"),
                     user.post("/v1/adapters/combine", json={"adapter_id": "u", "sources": [{"id": "upper"}]})):
        assert response.status_code == 403 and error_of(response)["type"] == "permission_error"


def test_another_tenants_adapter_is_a_404(admin, other_tenant):
    assert upload(admin, "acme-private", "upper").status_code == 201
    for adapter in ("acme-private", "never-existed"):
        for response in (other_tenant.post(f"/v1/adapters/{adapter}/merge"),
                         other_tenant.delete(f"/v1/adapters/{adapter}/merge"),
                         other_tenant.post("/v1/adapters/combine",
                                           json={"adapter_id": "stolen", "sources": [{"id": adapter}]})):
            assert response.status_code == 404, response.text
    assert other_tenant.get("/v1/adapters/stolen").status_code == 404, "nothing was stored"


def test_a_tenant_cannot_unmerge_another_tenants_merge_by_merging_its_own(admin, other_tenant):
    cases = [(admin, "acme", "upper", other_tenant, "title"), (other_tenant, "globex", "title", admin, "upper")]
    for holder, holder_tenant, holder_adapter, other, other_adapter in cases:
        assert holder.post(f"/v1/adapters/{holder_adapter}/merge", timeout=MERGE_TIMEOUT_S).status_code == 200
        try:
            refused = other.post(f"/v1/adapters/{other_adapter}/merge", timeout=MERGE_TIMEOUT_S)
            assert refused.status_code == 409, refused.text
            error = error_of(refused)
            assert error["type"] == "conflict_error" and "another tenant's adapter" in error["message"], error
            assert holder_tenant not in refused.text and holder_adapter not in refused.text, refused.text
            # The holder's view: still merged. The other tenant's: its adapter is not. (GET reads the engine's last
            # step, which may trail the merge's answer by one step.)
            wait_for(lambda client=holder, path=f"/v1/adapters/{holder_adapter}": client.get(path).json()["merged"])
            assert other.get(f"/v1/adapters/{other_adapter}").json()["merged"] is False
            assert other.delete(f"/v1/adapters/{holder_adapter}/merge").status_code == 409, "its own, unmerged"
        finally:
            assert holder.delete(f"/v1/adapters/{holder_adapter}/merge").status_code == 200
        wait_for(lambda: merged_mode_is(admin, 0))


def test_a_tenant_may_replace_its_own_merged_adapter(admin):
    assert admin.post("/v1/adapters/upper/merge", timeout=MERGE_TIMEOUT_S).status_code == 200
    try:
        assert admin.post("/v1/adapters/title/merge", timeout=MERGE_TIMEOUT_S).status_code == 200
        wait_for(lambda: admin.get("/v1/adapters/title").json()["merged"] is True)
        assert admin.get("/v1/adapters/upper").json()["merged"] is False
    finally:
        assert admin.delete("/v1/adapters/title/merge").status_code == 200
    wait_for(lambda: merged_mode_is(admin, 0))


def test_deleting_the_merged_adapter_unmerges_it(admin):
    assert upload(admin, "short-lived", "rot13").status_code == 201
    assert admin.post("/v1/adapters/short-lived/merge", timeout=MERGE_TIMEOUT_S).status_code == 200
    wait_for(lambda: merged_mode_is(admin, 1))
    assert admin.delete("/v1/adapters/short-lived").status_code == 200
    wait_for(lambda: merged_mode_is(admin, 0))
    assert generate(admin, adapter="rot13").json()["text"] == expected("rot13")


# ---------------------------------------------------------------- combine


def combine(client: httpx.Client, adapter_id: str, sources: list[dict], **fields) -> httpx.Response:
    return client.post("/v1/adapters/combine", json={"adapter_id": adapter_id, "sources": sources, **fields})


def test_a_linear_combination_of_one_adapter_generates_as_it_does(admin):
    response = combine(admin, "upper-copy", [{"id": "upper", "weight": 1.0}])
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["id"] == "upper-copy" and body["version"] == 1 and body["relative_error"] == 0.0
    assert body["ranks"] == admin.get("/v1/adapters/upper").json()["versions"][-1]["ranks"]
    assert len(body["sha256"]) == 64 and body["parent"] == "demo"
    for text in TEXTS:
        assert generate(admin, text, "upper-copy").json()["text"] == generate(admin, text, "upper").json()["text"]
    assert generate(admin, HELLO, "upper-copy").json()["text"] == "HELLO WORLD"
    conflict = combine(admin, "upper-copy", [{"id": "upper", "weight": 1.0}])
    assert conflict.status_code == 409 and "already exists" in error_of(conflict)["message"]


def test_svd_reports_its_relative_error(admin):
    exact = combine(admin, "upper-svd-full", [{"id": "upper", "weight": 1.0}], method="svd", rank=64)
    truncated = combine(admin, "mix-svd-1", [{"id": "upper", "weight": 0.5}, {"id": "title", "weight": 0.5}],
                        method="svd", rank=1)
    assert exact.status_code == truncated.status_code == 201, (exact.text, truncated.text)
    assert exact.json()["relative_error"] < 1e-5 and exact.json()["ranks"] == [4]
    assert 0 < truncated.json()["relative_error"] < 1 and truncated.json()["ranks"] == [1]
    assert generate(admin, HELLO, "upper-svd-full").json()["text"] == "HELLO WORLD"


@pytest.mark.parametrize("fields, param", [
    ({"method": "cat"}, "method"),
    ({"method": "svd"}, "rank"),  # svd needs a rank
    ({"method": "svd", "rank": 0}, "rank"),
    ({"rank": 2}, "rank"),  # linear takes none
    ({"sources": []}, "sources"),
    ({"sources": [{"id": "upper", "weight": "heavy"}]}, "sources.0.weight"),
    ({"sources": [{"id": "upper", "scale": 1.0}]}, "sources.0.scale"),
    ({"adapter_id": "demo"}, "adapter_id"),  # the base model's name
    ({"adapter_id": "bad id!"}, "adapter_id"),
])
def test_bad_combine_requests_are_400s_naming_the_field(admin, fields, param):
    body = {"adapter_id": "never-stored", "sources": [{"id": "upper", "weight": 1.0}], **fields}
    response = admin.post("/v1/adapters/combine", json=body)
    assert response.status_code == 400, response.text
    assert error_of(response)["type"] == "invalid_request_error" and param in error_of(response)["message"]
    assert admin.get("/v1/adapters/never-stored").status_code == 404
