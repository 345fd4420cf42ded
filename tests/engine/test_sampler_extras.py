"""vLLM's sampling extras in the batched sampler, each checked against transformers' own logits processors on fresh
random logits (presence and frequency against OpenAI's formula), every new field checked where it enters, and a
seeded row's tokens independent of whatever else shares its batch."""

import math
import os
import random

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from lora_server.engine import sampler
from lora_server.engine.request import EngineRequest, RequestError, check_request
from lora_server.engine.sampler import (
    SamplingError,
    SamplingParams,
    TokenHistory,
    make_generator,
    processed_logits,
    sample_rows,
)

VOCAB = 64


def fresh(rows: int) -> tuple[random.Random, torch.Tensor, int]:
    seed = int.from_bytes(os.urandom(4), "little")
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * 4
    return random.Random(seed), logits, seed


def random_history(rng: random.Random, stop: frozenset[int] = frozenset()) -> TokenHistory:
    prompt = [rng.randrange(VOCAB) for _ in range(rng.randint(1, 12))]
    output = [rng.randrange(VOCAB) for _ in range(rng.randint(0, 12))]
    return TokenHistory(prompt, output, stop)


# ---------------------------------------------------------------------------- every field checked where it enters


@pytest.mark.parametrize("bad, field", [
    (dict(repetition_penalty=0.0), "repetition_penalty"), (dict(repetition_penalty=-1.0), "repetition_penalty"),
    (dict(repetition_penalty=math.nan), "repetition_penalty"), (dict(repetition_penalty=True), "repetition_penalty"),
    (dict(presence_penalty=2.5), "presence_penalty"), (dict(presence_penalty=-2.01), "presence_penalty"),
    (dict(presence_penalty=math.inf), "presence_penalty"), (dict(frequency_penalty=-3), "frequency_penalty"),
    (dict(frequency_penalty=math.nan), "frequency_penalty"), (dict(min_p=-0.1), "min_p"), (dict(min_p=1.5), "min_p"),
    (dict(min_p=math.nan), "min_p"), (dict(min_tokens=-1), "min_tokens"), (dict(min_tokens=1.5), "min_tokens"),
    (dict(min_tokens=65), "min_tokens"), (dict(max_new_tokens=4, min_tokens=5), "min_tokens"),
    (dict(ignore_eos=1), "ignore_eos"), (dict(ignore_eos="yes"), "ignore_eos"),
    (dict(include_stop_str_in_output=None), "include_stop_str_in_output"),
    (dict(stop_token_ids=(-1,)), "stop_token_ids"), (dict(stop_token_ids=(1.5,)), "stop_token_ids"),
    (dict(stop_token_ids=(True,)), "stop_token_ids"), (dict(stop_token_ids=3), "stop_token_ids"),
])
def test_every_new_field_is_checked_and_the_error_names_it(bad, field):
    with pytest.raises(SamplingError, match=field) as error:
        SamplingParams(**bad)
    assert error.value.field == field


def test_the_extras_accept_their_whole_range():
    SamplingParams(repetition_penalty=1e-3, presence_penalty=-2, frequency_penalty=2.0, min_p=1.0, min_tokens=64,
                   ignore_eos=True, stop_token_ids=(0, 5), include_stop_str_in_output=True)
    assert SamplingParams(stop_token_ids=[3, 4]).stop_token_ids == (3, 4)  # a list (from JSON) is kept as a tuple


def test_stop_token_ids_outside_the_vocabulary_are_refused_naming_the_field():
    request = EngineRequest([1, 2], SamplingParams(stop_token_ids=(3, VOCAB)))
    with pytest.raises(RequestError, match="stop_token_ids") as error:
        check_request(request, max_model_len=128, vocab_size=VOCAB)
    assert error.value.field == "stop_token_ids"
    check_request(EngineRequest([1, 2], SamplingParams(stop_token_ids=(VOCAB - 1,))), 128, VOCAB)


# ---------------------------------------------------------------------------- against transformers' processors


def test_repetition_penalty_matches_transformers():
    rng, logits, seed = fresh(8)
    params = [SamplingParams(repetition_penalty=rng.choice([1.0, 0.5, 1.3, 2.0, rng.uniform(0.1, 3)]))
              for _ in range(8)]
    histories = [random_history(rng) for _ in range(8)]
    ours = processed_logits(logits, params, histories)
    for row, (p, h) in enumerate(zip(params, histories, strict=True)):
        input_ids = torch.tensor([list(h.prompt_token_ids) + list(h.output_token_ids)])
        expected = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(input_ids, logits[row:row + 1].clone())[0]
        torch.testing.assert_close(ours[row], expected, msg=f"seed {seed}, row {row}")


def test_presence_and_frequency_penalties_match_openais_formula():
    rng, logits, seed = fresh(8)
    params = [SamplingParams(presence_penalty=rng.uniform(-2, 2), frequency_penalty=rng.uniform(-2, 2),
                             repetition_penalty=rng.choice([1.0, 1.2])) for _ in range(8)]
    histories = [random_history(rng) for _ in range(8)]
    ours = processed_logits(logits, params, histories)
    for row, (p, h) in enumerate(zip(params, histories, strict=True)):
        # OpenAI: mu[j] - c[j] * frequency_penalty - float(c[j] > 0) * presence_penalty, c counting the output only;
        # repetition first, over prompt and output (transformers, as vLLM orders them).
        input_ids = torch.tensor([list(h.prompt_token_ids) + list(h.output_token_ids)])
        expected = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(input_ids, logits[row:row + 1].clone())[0]
        expected = expected.double()
        for token in range(VOCAB):
            count = list(h.output_token_ids).count(token)
            expected[token] -= count * p.frequency_penalty + (count > 0) * p.presence_penalty
        torch.testing.assert_close(ours[row].double(), expected, atol=1e-5, rtol=1e-6,
                                   msg=f"seed {seed}, row {row}")


def test_min_tokens_matches_transformers_for_eos_and_stop_tokens():
    rng, logits, seed = fresh(8)
    params, histories = [], []
    for _ in range(8):
        history = random_history(rng, frozenset(rng.sample(range(VOCAB), rng.randint(1, 3))))
        params.append(SamplingParams(min_tokens=rng.randint(0, 16)))
        histories.append(history)
    ours = processed_logits(logits, params, histories)
    for row, (p, h) in enumerate(zip(params, histories, strict=True)):
        input_ids = torch.tensor([list(h.prompt_token_ids) + list(h.output_token_ids)])
        processor = MinNewTokensLengthLogitsProcessor(len(h.prompt_token_ids), p.min_tokens, sorted(h.stop_token_ids))
        expected = processor(input_ids, logits[row:row + 1].clone())[0]
        torch.testing.assert_close(ours[row], expected, msg=f"seed {seed}, row {row}")


def test_temperature_top_k_top_p_and_min_p_match_transformers():
    rng, logits, seed = fresh(16)
    params = [SamplingParams(temperature=rng.choice([0.5, 1.0, 1.7]), top_k=rng.choice([0, 1, 5, 20, VOCAB + 3]),
                             top_p=rng.choice([1.0, 0.9, 0.5, 0.05]), min_p=rng.choice([0.0, 0.05, 0.2, 1.0]), seed=row)
              for row in range(16)]
    ours = processed_logits(logits, params)
    for row, p in enumerate(params):
        expected = TemperatureLogitsWarper(p.temperature)(None, logits[row:row + 1].clone())
        if p.top_k:
            expected = TopKLogitsWarper(p.top_k)(None, expected)
        if p.top_p < 1.0:
            expected = TopPLogitsWarper(p.top_p)(None, expected)
        if p.min_p:
            expected = MinPLogitsWarper(p.min_p)(None, expected)
        expected = expected[0]
        assert torch.equal(ours[row].isinf(), expected.isinf()), f"seed {seed}, row {row}: {p}"
        kept = ~expected.isinf()
        torch.testing.assert_close(ours[row][kept], expected[kept], msg=f"seed {seed}, row {row}")


def test_greedy_rows_take_the_argmax_of_the_penalised_logits():
    rng, logits, seed = fresh(6)
    params = [SamplingParams(repetition_penalty=3.0, frequency_penalty=2.0) for _ in range(6)]
    histories = [random_history(rng) for _ in range(6)]
    for h in histories:
        h.output_token_ids.extend(logits[len(h.output_token_ids) % 6].topk(3).indices.tolist())
    rows = sample_rows(logits, params, [None] * 6, histories)
    expected = processed_logits(logits, params, histories).argmax(-1).tolist()
    assert rows.token_ids == expected, seed


def test_every_drawn_token_is_one_the_cuts_kept():
    rng, logits, seed = fresh(12)
    params = [SamplingParams(temperature=rng.uniform(0.3, 2), top_k=rng.choice([0, 3, 10]),
                             top_p=rng.choice([1.0, 0.8]), min_p=rng.choice([0.0, 0.1]),
                             presence_penalty=rng.choice([0.0, 1.0]), min_tokens=rng.choice([0, 30]),
                             seed=rng.randrange(1 << 32)) for _ in range(12)]
    histories = [random_history(rng, frozenset({0, 1})) for _ in range(12)]
    kept = ~processed_logits(logits, params, histories).isinf()
    generators = [make_generator(p) for p in params]
    seen = [set() for _ in params]
    for _ in range(200):
        for row, token in enumerate(sample_rows(logits, params, generators, histories).token_ids):
            assert kept[row, token], f"seed {seed}, row {row}: token {token} was cut"
            seen[row].add(token)
    assert any(len(s) > 1 for s in seen), f"seed {seed}: nothing was drawn at random"


def test_a_seeded_rows_tokens_do_not_depend_on_its_batch():
    rng, logits, seed = fresh(9)
    params = [SamplingParams(temperature=rng.uniform(0.5, 1.5), top_k=rng.choice([0, 8]), top_p=rng.choice([1.0, 0.9]),
                             min_p=rng.choice([0.0, 0.1]), repetition_penalty=rng.choice([1.0, 1.5]),
                             frequency_penalty=rng.choice([0.0, 0.5]), min_tokens=rng.choice([0, 20]),
                             seed=rng.randrange(1 << 62)) for _ in range(9)]
    params[4] = SamplingParams()  # a greedy neighbour
    histories = [random_history(rng, frozenset({2})) for _ in range(9)]
    target = 6
    alone_generator = make_generator(params[target])
    alone = [sample_rows(logits[target:target + 1], params[target:target + 1], [alone_generator],
                         histories[target:target + 1]).token_ids[0] for _ in range(20)]
    generators = [make_generator(p) for p in params]
    in_batch = [sample_rows(logits, params, generators, histories).token_ids[target] for _ in range(20)]
    assert in_batch == alone, f"seed {seed}"


def test_logprobs_come_with_the_tokens_and_are_the_models_own():
    rng, logits, seed = fresh(4)
    params = [SamplingParams(), SamplingParams(temperature=1.0, seed=1, repetition_penalty=2.0), SamplingParams(),
              SamplingParams(temperature=0.7, seed=2)]
    histories = [random_history(rng) for _ in range(4)]
    rows = sample_rows(logits, params, [make_generator(p) for p in params], histories, [3, 0, None, 5])
    log_probs = torch.log_softmax(logits, -1)
    assert rows.logprobs[2] is None
    for row, n in ((0, 3), (1, 0), (3, 5)):
        token, lp = rows.token_ids[row], rows.logprobs[row]
        assert abs(lp.logprob - log_probs[row, token].item()) < 1e-6, seed
        assert [t for t, _ in lp.top] == log_probs[row].topk(n).indices.tolist() if n else lp.top == (), seed


def test_a_step_that_raises_after_the_draws_rewinds_every_stream(monkeypatch):
    _, logits, seed = fresh(3)
    params = [SamplingParams(temperature=1.0, seed=s) for s in (1, 2, 3)]
    generators = [make_generator(p) for p in params]
    generators[2] = generators[1]  # a stream shared by two rows gets its first state back too
    before = [g.get_state() for g in generators]

    def device_fault(*args, **kwargs):
        raise RuntimeError("injected device fault")

    with monkeypatch.context() as patch:
        patch.setattr(sampler, "_sample_on_device", device_fault)
        with pytest.raises(RuntimeError, match="device fault"):
            sample_rows(logits, params, generators)
    assert all(torch.equal(g.get_state(), state) for g, state in zip(generators, before, strict=True)), seed
    fresh_generators = [make_generator(p) for p in params]
    fresh_generators[2] = fresh_generators[1]
    assert sample_rows(logits, params, generators).token_ids == \
        sample_rows(logits, params, fresh_generators).token_ids, seed
