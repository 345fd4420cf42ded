"""Adapter uploads over HTTP: upload -> generate -> new version (hot-swap) -> generate -> delete -> 404, and what is
refused."""

import json

from tests.api.helpers import adapter_files, error_of, expected, generate, put_version, upload


def test_upload_generate_new_version_generate_delete(acme):
    created = upload(acme, "lifecycle", "upper")
    assert created.status_code == 201, created.text
    body = created.json()
    assert body["id"] == "lifecycle" and body["version"] == 1 and body["ranks"] == [4] and body["parent"] == "demo"
    assert len(body["sha256"]) == 64
    assert generate(acme, adapter="lifecycle").json()["text"] == expected("upper")

    swapped = put_version(acme, "lifecycle", "reverse")
    assert swapped.status_code == 201, swapped.text
    assert swapped.json()["version"] == 2 and swapped.json()["ranks"] == [16]
    after = generate(acme, adapter="lifecycle").json()
    assert after["text"] == expected("reverse") and after["adapter_version"] == 2, "new requests run the new version"

    detail = acme.get("/v1/adapters/lifecycle").json()
    assert detail["current_version"] == 2 and [v["version"] for v in detail["versions"]] == [1, 2]
    assert detail["requests_served"] == 2 and detail["requests_served_by_version"] == {"1": 1, "2": 1}
    assert detail["tier"] == "device"
    listed = {a["id"]: a for a in acme.get("/v1/adapters").json()["data"]}
    assert listed["lifecycle"]["version"] == 2

    deleted = acme.delete("/v1/adapters/lifecycle")
    assert deleted.status_code == 200 and deleted.json() == {"id": "lifecycle", "deleted": True, "versions": [1, 2]}
    gone = generate(acme, adapter="lifecycle")
    assert gone.status_code == 404 and error_of(gone)["type"] == "not_found_error"
    assert acme.get("/v1/adapters/lifecycle").status_code == 404
    assert acme.delete("/v1/adapters/lifecycle").status_code == 404
    assert "lifecycle" not in {m["id"] for m in acme.get("/v1/models").json()["data"]}


def test_post_of_an_existing_adapter_is_a_conflict_put_creates(acme):
    assert upload(acme, "twice", "title").status_code == 201
    conflict = upload(acme, "twice", "title")
    assert conflict.status_code == 409 and "PUT" in error_of(conflict)["message"]
    created_by_put = put_version(acme, "put-made", "rot13")
    assert created_by_put.status_code == 201 and created_by_put.json()["version"] == 1
    assert generate(acme, adapter="put-made").json()["text"] == expected("rot13")


def test_put_with_a_different_form_id_is_refused(acme):
    response = acme.put("/v1/adapters/one", data={"adapter_id": "other"}, files=adapter_files("upper"))
    assert response.status_code == 400 and "differs" in error_of(response)["message"]


def test_refused_uploads_say_why(acme):
    files = adapter_files("upper")
    config = json.loads(files["adapter_config"][1])
    dora = {**files, "adapter_config": ("adapter_config.json", json.dumps({**config, "use_dora": True}).encode(),
                                        "application/json")}
    cases = [
        (dict(data={"adapter_id": "dora"}, files=dora), "use_dora"),
        (dict(data={"adapter_id": "no weights"}, files=files), "adapter_id"),
        (dict(data={"adapter_id": "half"}, files={"adapter_config": files["adapter_config"]}), "adapter_model"),
        (dict(data={"adapter_id": "garbage"}, files={**files, "adapter_model": ("x", b"not safetensors", "x")}),
         "adapter_model.safetensors"),
        (dict(data={"adapter_id": "demo"}, files=files), "base model"),
    ]
    for request, fragment in cases:
        response = acme.post("/v1/adapters", **request)
        assert response.status_code == 400, (fragment, response.text)
        error = error_of(response)
        assert error["type"] == "invalid_request_error" and fragment in error["message"], error


def test_the_demo_adapters_were_registered_for_each_tenant(acme, globex):
    for client in (acme, globex):
        listed = {a["id"] for a in client.get("/v1/adapters").json()["data"]}
        assert {"upper", "reverse", "rot13", "title"} <= listed
