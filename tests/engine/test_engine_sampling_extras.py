"""vLLM's extras through the engine on the demo model: ignore_eos runs past EOS, min_tokens holds back EOS and stop
tokens, stop_token_ids stop, include_stop_str_in_output keeps the stop string (or token), and a seeded request with
the extras draws the same tokens whatever its batch, preemption included."""

import os
import random

from lora_server.demo import tasks
from lora_server.engine.request import EngineRequest
from lora_server.engine.sampler import SamplingParams
from tests.engine.engine_helpers import open_demo_engine

EOS = 2  # the demo's
KV_BYTES_PER_TOKEN_DEMO = 2 * 4 * 2 * 32 * 4  # K and V x layers x kv heads x head_dim x fp32


def run(engine, sampling: SamplingParams, text: str = "hello world", **kwargs):
    prompt = engine.tokenizer.encode(tasks.make_prompt(text))
    return engine.generate([EngineRequest(prompt, sampling, **kwargs)])[0]


def token_of(engine, char: str) -> int:
    (token,) = engine.tokenizer.encode(char)[1:]  # after BOS
    return token


def test_ignore_eos_runs_past_eos_to_the_length(demo_engine):
    plain = run(demo_engine, SamplingParams(max_new_tokens=30))
    assert plain.finish_reason == "stop" and plain.token_ids[-1] == EOS and plain.text == "hello world"
    ignoring = run(demo_engine, SamplingParams(max_new_tokens=30, ignore_eos=True))
    assert ignoring.finish_reason == "length" and len(ignoring.token_ids) == 30
    assert ignoring.token_ids[:len(plain.token_ids)] == plain.token_ids, "the same greedy tokens up to the EOS"
    assert ignoring.text == demo_engine.tokenizer.decode(ignoring.token_ids)


def test_min_tokens_holds_back_eos_until_reached(demo_engine):
    plain = run(demo_engine, SamplingParams(max_new_tokens=30))
    min_tokens = len(plain.token_ids) + 3
    held = run(demo_engine, SamplingParams(max_new_tokens=30, min_tokens=min_tokens))
    assert EOS not in held.token_ids[:min_tokens] and len(held.token_ids) > min_tokens
    assert held.token_ids[:len(plain.token_ids) - 1] == plain.token_ids[:-1]


def test_stop_token_ids_stop_and_their_text_goes_unless_asked(demo_engine):
    o = token_of(demo_engine, "o")
    stopped = run(demo_engine, SamplingParams(max_new_tokens=30, stop_token_ids=(o,)))
    assert stopped.finish_reason == "stop" and stopped.token_ids[-1] == o and stopped.text == "hell"
    kept = run(demo_engine, SamplingParams(max_new_tokens=30, stop_token_ids=(o,), include_stop_str_in_output=True))
    assert kept.token_ids == stopped.token_ids and kept.text == "hello"


def test_min_tokens_holds_back_stop_tokens_and_stop_strings(demo_engine):
    o = token_of(demo_engine, "o")
    held = run(demo_engine, SamplingParams(max_new_tokens=30, stop_token_ids=(o,), min_tokens=5))
    assert o not in held.token_ids[:5], held.token_ids
    assert held.finish_reason == "stop" and held.token_ids[-1] in (o, EOS)
    # "hel" is the text of the first 3 tokens: not a stop there; the stop string counts once past min_tokens.
    late = run(demo_engine, SamplingParams(max_new_tokens=30, min_tokens=3), stop=("l",))
    assert late.text == "hel" and late.finish_reason == "stop"
    early = run(demo_engine, SamplingParams(max_new_tokens=30), stop=("l",))
    assert early.text == "he"


def test_include_stop_str_in_output_keeps_the_stop_string(demo_engine):
    kept = run(demo_engine, SamplingParams(max_new_tokens=30, include_stop_str_in_output=True), stop=("zzz", "o w"))
    assert kept.text == "hello w" and kept.finish_reason == "stop"
    cut = run(demo_engine, SamplingParams(max_new_tokens=30), stop=("zzz", "o w"))
    assert cut.text == "hell"


def test_a_seeded_request_with_the_extras_is_reproducible_whatever_the_batch_and_preemption(tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    rng = random.Random(seed)
    # 10 blocks of 16 tokens for 10 requests of up to ~50 tokens each: decodes must preempt.
    engine = open_demo_engine(tmp_path / "store", max_num_seqs=10, kv_cache_bytes=10 * 16 * KV_BYTES_PER_TOKEN_DEMO)
    try:
        sampling = SamplingParams(max_new_tokens=30, temperature=1.2, top_k=30, top_p=0.95, min_p=0.02,
                                  repetition_penalty=1.3, presence_penalty=0.5, frequency_penalty=0.3, min_tokens=10,
                                  ignore_eos=rng.random() < 0.5, seed=seed)
        prompt = engine.tokenizer.encode(tasks.make_prompt("seeded extras"))
        seeded = EngineRequest(prompt, sampling, adapter_id="rot13", request_id="seeded")
        alone = engine.generate([seeded])[0].token_ids
        crowd = []
        for i in range(9):
            text = "".join(rng.choice("abcdefgh ") for _ in range(rng.randint(8, 20)))
            crowd.append(EngineRequest(engine.tokenizer.encode(tasks.make_prompt(text)), SamplingParams(
                max_new_tokens=40, temperature=rng.choice([0.0, 1.0]), repetition_penalty=rng.choice([1.0, 1.5]),
                min_p=rng.choice([0.0, 0.1]), top_p=rng.choice([1.0, 0.5])),
                adapter_id=rng.choice([None, *tasks.ADAPTER_NAMES]), request_id=f"crowd-{i}"))
        results = engine.generate([*crowd, seeded], arrivals=[0] * len(crowd) + [2])
        assert engine.stats().num_preemptions > 0, "the cache was meant to be too small"
        assert results[-1].token_ids == alone, f"seed {seed}"
    finally:
        engine.close()
        engine.store.close()
