"""The sampler: greedy is argmax, top-k / top-p keep exactly the tokens they should, seeds reproduce; every number
is checked where it enters, and a row that cannot be sampled fails alone."""

import math
import os

import pytest
import torch

from lora_server.engine.sampler import (
    MAX_SEED,
    MIN_TEMPERATURE,
    SamplingError,
    SamplingParams,
    make_generator,
    sample_rows,
)
from tests.engine.offline_reference import sample


def random_logits(rows: int, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_greedy_is_argmax():
    logits = random_logits(6)
    params = [SamplingParams()] * 6
    assert sample(logits, params, [None] * 6) == logits.argmax(-1).tolist()


def test_top_k_only_draws_from_the_k_best():
    logits = random_logits(1, seed=1)
    params = SamplingParams(temperature=1.0, top_k=3, seed=7)
    best3 = set(logits[0].topk(3).indices.tolist())
    generator = make_generator(params)
    drawn = {sample(logits, [params], [generator])[0] for _ in range(300)}
    assert drawn == best3  # all three show up in 300 draws at temperature 1 with these logits, nothing else does


def test_top_p_keeps_the_smallest_prefix_reaching_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    params = SamplingParams(temperature=1.0, top_p=0.8, seed=3)
    generator = make_generator(params)
    drawn = {sample(logits, [params], [generator])[0] for _ in range(300)}
    assert drawn == {0, 1}  # 0.5 + 0.3 reaches 0.8; token 2 is outside


def test_seeded_sampling_does_not_depend_on_the_batch():
    logits = random_logits(5, seed=2)
    params = SamplingParams(temperature=0.9, top_p=0.95, seed=42)
    alone = [sample(logits[2:3], [params], [make_generator(params)])[0] for _ in range(1)]
    others = [SamplingParams(temperature=1.0, seed=s) for s in range(5)]
    batch_params = others[:2] + [params] + others[3:]
    in_batch = sample(logits, batch_params, [make_generator(p) for p in batch_params])
    assert in_batch[2] == alone[0]
    # and a whole seeded stream reproduces
    g1, g2 = make_generator(params), make_generator(params)
    assert [sample(logits, [params] * 5, [g1] * 5) for _ in range(5)] == [
        sample(logits, [params] * 5, [g2] * 5) for _ in range(5)]


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.5),
                                 dict(top_k=-1)])
def test_out_of_range_parameters_are_refused(bad):
    with pytest.raises(SamplingError, match=next(iter(bad))):
        SamplingParams(**bad)


@pytest.mark.parametrize("bad, field", [
    (dict(seed=2**64), "seed"), (dict(seed=-1), "seed"), (dict(seed=1.5), "seed"), (dict(seed=True), "seed"),
    (dict(temperature=1e-40), "temperature"), (dict(temperature=MIN_TEMPERATURE / 2), "temperature"),
    (dict(temperature=math.nan), "temperature"), (dict(temperature=math.inf), "temperature"),
    (dict(temperature=101.0), "temperature"), (dict(top_p=math.nan), "top_p"), (dict(top_p=math.inf), "top_p"),
    (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"), (dict(max_new_tokens=1.0), "max_new_tokens"),
])
def test_every_number_is_checked_and_the_error_names_its_field(bad, field):
    with pytest.raises(SamplingError, match=field) as error:
        SamplingParams(**bad)
    assert error.value.field == field


@pytest.mark.parametrize("seed", [0, 1, 2**63, MAX_SEED])
def test_every_seed_in_range_makes_a_generator(seed):
    assert make_generator(SamplingParams(temperature=1.0, seed=seed)).initial_seed() == seed


def test_a_tiny_top_p_keeps_just_the_most_likely_token():
    seed = int.from_bytes(os.urandom(4), "little")
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(seed)) * 3
    for top_p in (1e-300, 1e-45, 1e-8):
        params = [SamplingParams(temperature=1.0, top_p=top_p, seed=s) for s in range(4)]
        assert sample(logits, params, [make_generator(p) for p in params]) == logits.argmax(-1).tolist(), seed


def test_the_lowest_temperature_stays_finite_for_large_logits():
    logits = torch.tensor([[3e36, 1e36, -3e36]])  # / MIN_TEMPERATURE still under fp32's largest value
    params = SamplingParams(temperature=MIN_TEMPERATURE, seed=1)
    assert sample(logits, [params], [make_generator(params)]) == [0]


def test_rows_that_cannot_be_sampled_fail_alone_and_the_others_are_unchanged():
    seed = int.from_bytes(os.urandom(4), "little")
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(seed)) * 3
    params = [SamplingParams(), SamplingParams(temperature=0.8, top_p=0.9, seed=11), SamplingParams(),
              SamplingParams(temperature=1.0, seed=12), SamplingParams(temperature=1.0, seed=13), SamplingParams()]
    clean = sample_rows(logits, params, [make_generator(p) for p in params])
    assert not clean.errors, seed
    poisoned = logits.clone()
    poisoned[0, 3] = math.nan  # greedy row with a NaN
    poisoned[2] = -math.inf  # nothing left to choose
    poisoned[4, 7] = math.inf  # a sampled row with +inf
    rows = sample_rows(poisoned, params, [make_generator(p) for p in params])
    assert set(rows.errors) == {0, 2, 4}, (seed, rows.errors)
    assert all("non-finite logits" in why for why in rows.errors.values())
    assert [rows.token_ids[r] for r in (1, 3, 5)] == [clean.token_ids[r] for r in (1, 3, 5)], seed
    assert [rows.token_ids[r] for r in (0, 2, 4)] == [None] * 3


def test_a_draw_that_raises_fails_its_row_alone():
    logits = torch.tensor([[3e38, 0.0, 0.0], [0.0, 1.0, 2.0]])  # row 0 is finite, but / 0.5 overflows fp32
    params = [SamplingParams(temperature=0.5, seed=1), SamplingParams(temperature=0.5, seed=2)]
    rows = sample_rows(logits, params, [make_generator(p) for p in params])
    assert list(rows.errors) == [0] and "sampling failed" in rows.errors[0]
    assert rows.token_ids[1] == sample(logits[1:], params[1:], [make_generator(params[1])])[0]
    with pytest.raises(RuntimeError, match="row 0"):
        sample(logits, params, [make_generator(p) for p in params])
