"""Keys, tenants and roles: another tenant's adapter is a 404 exactly like a missing one, both ways; users generate
and list but cannot upload or delete; every route but /health, /ready and /metrics needs a key."""

import pytest

from tests.api.helpers import error_of, expected, generate, upload


def test_tenants_cannot_see_each_others_adapters(acme, globex):
    assert upload(acme, "acme-only", "upper").status_code == 201
    assert upload(globex, "globex-only", "reverse").status_code == 201
    for owner, other, adapter in ((acme, globex, "acme-only"), (globex, acme, "globex-only")):
        assert generate(owner, adapter=adapter).status_code == 200
        for request in (lambda c, a: generate(c, adapter=a), lambda c, a: c.get(f"/v1/adapters/{a}"),
                        lambda c, a: c.delete(f"/v1/adapters/{a}"),
                        lambda c, a: c.post("/v1/completions", json={"model": a, "prompt": "x => "})):
            hidden, missing = request(other, adapter), request(other, "never-existed")
            assert hidden.status_code == missing.status_code == 404
            assert hidden.json() == _renamed(missing.json(), "never-existed", adapter), "nothing tells them apart"
        assert adapter not in {a["id"] for a in other.get("/v1/adapters").json()["data"]}
        assert adapter not in {m["id"] for m in other.get("/v1/models").json()["data"]}


def test_the_same_name_in_two_tenants_is_two_adapters(acme, globex):
    assert upload(acme, "same-name", "upper").status_code == 201
    assert upload(globex, "same-name", "rot13").status_code == 201
    assert generate(acme, adapter="same-name").json()["text"] == expected("upper")
    assert generate(globex, adapter="same-name").json()["text"] == expected("rot13")


def test_users_generate_and_list_but_do_not_upload_or_delete(acme_user):
    assert generate(acme_user, adapter="upper").json()["text"] == expected("upper")
    assert acme_user.get("/v1/adapters").status_code == 200
    assert acme_user.get("/v1/adapters/upper").status_code == 200
    for response in (upload(acme_user, "from-user", "upper"), acme_user.delete("/v1/adapters/upper")):
        assert response.status_code == 403 and error_of(response)["type"] == "permission_error"
    assert generate(acme_user, adapter="upper").status_code == 200, "the refused delete deleted nothing"


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong-key-0000000000"},
                                     {"Authorization": "Basic abc"}, {"Authorization": "Bearer"}])
def test_requests_without_a_valid_key_are_401(anonymous, headers):
    for method, path in (("POST", "/v1/generate"), ("GET", "/v1/adapters"), ("GET", "/v1/models"),
                         ("POST", "/v1/chat/completions"), ("DELETE", "/v1/adapters/upper")):
        response = anonymous.request(method, path, headers=headers, json={})
        assert response.status_code == 401, (method, path)
        assert response.headers["www-authenticate"] == "Bearer"
        assert error_of(response)["type"] == "authentication_error"


def test_probes_and_metrics_need_no_key(anonymous):
    for path in ("/health", "/ready", "/metrics"):
        assert anonymous.get(path).status_code == 200


def _renamed(body: dict, old: str, new: str) -> dict:
    return {"error": {key: value.replace(old, new) if isinstance(value, str) else value
                      for key, value in body["error"].items()}}


def test_without_a_key_file_the_server_is_open_and_says_so(small_server, small):
    models = small.get("/v1/models").json()["data"]
    assert {m["id"] for m in models if m["owned_by"] == "default"} == {"upper", "reverse", "rot13", "title"}
    assert "the server is OPEN" in small_server.log()
