"""Numbers out of range are a 400 naming the field, on our route and the OpenAI ones, never a 500 from inside a step;
and `serve` refuses uploads over its --max-lora-rank."""

import pytest

from lora_server.api import serve
from lora_server.cli import build_parser
from tests.api.helpers import error_of, generate


@pytest.mark.parametrize("fields, field", [
    ({"seed": 2**64, "temperature": 1.0}, "seed"),  # past torch.Generator.manual_seed's range
    ({"temperature": 1e-40}, "temperature"),  # logits / temperature would overflow fp32
])
def test_an_out_of_range_number_is_a_400_naming_its_field(acme, fields, field):
    response = generate(acme, **fields)
    assert response.status_code == 400, response.text
    error = error_of(response)
    assert error["type"] == "invalid_request_error" and error["message"].startswith(field), error


def test_openai_routes_name_the_field_in_param(acme):
    response = acme.post("/v1/completions", json={"model": "demo", "prompt": "x", "seed": -1})
    assert response.status_code == 400, response.text
    assert error_of(response)["param"] == "seed"


def test_serve_caps_uploaded_ranks_at_max_lora_rank(monkeypatch, tmp_path):
    class Stop(Exception):
        pass

    targets = []

    def capture(**target):
        targets.append(target)
        raise Stop  # before the server starts

    monkeypatch.setattr(serve, "ServeTarget", capture)
    args = build_parser().parse_args(["serve", "--max-lora-rank", "8", "--store", str(tmp_path)])
    with pytest.raises(Stop):
        serve.run_serve(args)
    assert targets[0]["store_limits"].max_rank == 8
