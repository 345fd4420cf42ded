"""The embedded demo's acceptance test: on 200 held-out strings, all adapters mixed in one greedy batch, the base
copies and every adapter transforms with at least 95% exact match."""

import json

import pytest
import torch
import transformers
from peft import PeftModel

from lora_server.adapters_store import load_peft_adapter
from lora_server.cli import main
from lora_server.demo import tasks
from lora_server.demo.paths import DEMO_MODEL_DIR, demo_adapter_dirs
from lora_server.engine.build import describe_base_model
from lora_server.engine.sampler import SamplingParams
from lora_server.kernels.lora_batch import LoraBatch
from lora_server.model.attention import ContiguousKVCache, SequenceChunk
from lora_server.model.loader import load_model
from lora_server.model.tokenizer import load_tokenizer
from tests.engine.offline_reference import GenerationRequest, generate, load_adapters_into_slots
from tests.reference import assert_close_relative

MAX_NEW_TOKENS = tasks.MAX_TEXT_CHARS + 2  # the longest transform, its EOS, and one token of slack


@pytest.fixture(scope="module")
def demo():
    model = load_model(DEMO_MODEL_DIR, torch.device("cpu"), torch.float32)
    tokenizer = load_tokenizer(DEMO_MODEL_DIR, model.config.eos_token_ids)
    base = describe_base_model(model.config)
    adapters = {name: load_peft_adapter(path, base) for name, path in demo_adapter_dirs().items()}
    return model, tokenizer, adapters


def test_demo_has_the_promised_adapters(demo):
    _, _, adapters = demo
    assert set(adapters) == set(tasks.ADAPTER_NAMES)
    assert len({adapter.max_rank for adapter in adapters.values()}) >= 3, "the demo adapters use different ranks"
    assert any(adapter.config.get("use_rslora") for adapter in adapters.values())


@pytest.mark.slow
def test_demo_acceptance_all_adapters_in_one_batch(demo):
    model, tokenizer, adapters = demo
    texts = tasks.held_out_texts(tasks.NUM_EVAL_TEXTS, tasks.EVAL_SEED)
    jobs = [(text, adapter) for text in texts for adapter in (None, *tasks.ADAPTER_NAMES)]
    # Interleave adapters so every decode step mixes all five (base included) in one batch.
    requests = [GenerationRequest(tokenizer.encode(tasks.make_prompt(text)), adapter,
                                  SamplingParams(max_new_tokens=MAX_NEW_TOKENS)) for text, adapter in jobs]
    results = generate(model, requests, adapters, tokenizer.eos_token_ids)

    correct: dict[str, int] = {}
    for (text, adapter), result in zip(jobs, results, strict=True):
        task = adapter or "copy"
        expected = tasks.TRANSFORMS[task](text)
        ok = result.finish_reason == "stop" and tokenizer.decode(result.token_ids) == expected
        correct[task] = correct.get(task, 0) + ok
    accuracy = {task: n / len(texts) for task, n in correct.items()}
    assert all(a >= 0.95 for a in accuracy.values()), accuracy


def test_cli_generate_on_the_demo(tmp_path, capsys):
    requests = tmp_path / "requests.jsonl"
    rows = [{"prompt": tasks.make_prompt("hello world"), "adapter": name, "max_new_tokens": 20}
            for name in (None, *tasks.ADAPTER_NAMES)]
    rows.append({"prompt_token_ids": [1, 70, 71], "max_new_tokens": 3, "temperature": 0.8, "seed": 1})
    requests.write_text("".join(json.dumps(r) + "\n" for r in rows))
    main(["generate", "--requests", str(requests)])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == len(rows)
    for row, line in zip(rows[:-1], lines, strict=False):
        assert line["text"] == tasks.TRANSFORMS[row["adapter"] or "copy"]("hello world")
        assert line["finish_reason"] == "stop"
    assert len(lines[-1]["token_ids"]) == 3 and lines[-1]["finish_reason"] == "length"


@pytest.mark.parametrize("line, message", [
    ('{"prompt": "abc => ", "adapter": "nope"}', "unknown adapter 'nope'"),
    ('{"prompt": "abc"', "not valid JSON"),
    ('{"prompt": "abc", "prompt_token_ids": [1]}', "exactly one of"),
    ('{"prompt": "abc", "temperature": -1}', "temperature"),
    ('{"prompt": "abc", "max_new_tokens": "ten"}', "max_new_tokens must be an integer"),
    ('{"prompt": "abc", "colour": "red"}', "unknown fields"),
])
def test_cli_bad_requests_get_a_clear_error(tmp_path, line, message):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(line + "\n")
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--requests", str(requests)])
    assert message in str(exit_info.value.code)


def test_transformers_and_peft_load_the_demo_files(demo):
    """The committed demo is a real HF checkpoint and real PEFT adapters: their logits match ours."""
    model, tokenizer, adapters = demo
    ids = tokenizer.encode(tasks.make_prompt("check the files"))
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(DEMO_MODEL_DIR).eval()
    slots = load_adapters_into_slots(model, adapters)
    for name, path in demo_adapter_dirs().items():
        peft_model = PeftModel.from_pretrained(hf_model, path).eval()
        with torch.no_grad():
            reference = peft_model(torch.tensor([ids])).logits[0]
        hf_model = peft_model.unload()
        c = model.config
        cache = ContiguousKVCache(c.num_layers, 1, len(ids), c.num_kv_heads, c.head_dim, torch.float32, "cpu")
        cache.set_batch((SequenceChunk(0, 0, len(ids), 0),))
        ours = model.compute_logits(model(torch.tensor(ids), torch.arange(len(ids)), cache,
                                          LoraBatch.build([slots[name]] * len(ids))))
        assert_close_relative(ours, reference)
