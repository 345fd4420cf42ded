"""`lora-server generate --lora-backend triton` (interpreted on CPU, compiled on a GPU) and `--lora-backend torch`
generate the same greedy tokens on the demo, with every adapter and the base mixed in one batch."""

import json

from lora_server.cli import main
from lora_server.demo import tasks


def test_triton_and_torch_backends_generate_the_same_tokens(tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    rows = [{"prompt": tasks.make_prompt(text), "adapter": adapter, "max_new_tokens": 8}
            for text in tasks.held_out_texts(2, seed=99) for adapter in (None, *tasks.ADAPTER_NAMES)]
    requests.write_text("".join(json.dumps(row) + "\n" for row in rows))
    outputs = {}
    for backend in ("torch", "triton"):
        main(["generate", "--lora-backend", backend, "--requests", str(requests)])
        outputs[backend] = [json.loads(line)["token_ids"] for line in capsys.readouterr().out.splitlines()]
    assert outputs["triton"] == outputs["torch"]
    assert len({tuple(tokens) for tokens in outputs["torch"]}) == len(rows)  # every adapter visibly differs
