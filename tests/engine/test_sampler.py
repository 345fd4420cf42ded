"""The sampler: greedy is argmax, top-k / top-p keep exactly the tokens they should, seeds reproduce."""

import pytest
import torch

from server.engine.sampler import SamplingError, SamplingParams, make_generator, sample


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
