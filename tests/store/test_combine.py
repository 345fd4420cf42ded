"""Combining adapters: `linear` is exactly the weighted sum of the sources' deltas; `svd` reports its relative
Frobenius error, which shrinks with the rank and vanishes at full rank, and matches a dense fp64 SVD. The result is a
PEFT adapter that our parser, the store and PEFT itself all read."""

import json

import pytest
import torch

from lora_server.adapters_store import AdapterError, AdapterStore, LoraAdapter, parse_peft_adapter
from lora_server.adapters_store.combine import combine_adapters
from tests.store.peft_helpers import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    describe,
    load_with_peft,
    make_adapter,
    peft_lora_layers,
    tiny_llama,
)

SOURCES = {  # different ranks, targets, layers, rsLoRA and patterns, so modules are shared by some sources only
    "plain": dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"]),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "o_proj", "up_proj"]),
    "patterned": dict(r=6, lora_alpha=12, target_modules=["q_proj", "gate_proj", "down_proj"],
                      rank_pattern={"down_proj": 2}, alpha_pattern={"gate_proj": 3}, layers_to_transform=[1]),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The tiny Llama, its description, and each source adapter as PEFT saved it and as we parse it."""
    root = tmp_path_factory.mktemp("combine")
    model = tiny_llama(seed=31)
    base = describe(model)
    adapters = {}
    for seed, (name, kwargs) in enumerate(SOURCES.items()):
        make_adapter(model, root / name, seed=300 + seed, **kwargs)
        adapters[name] = parse_peft_adapter((root / name / CONFIG_FILE).read_bytes(),
                                            (root / name / WEIGHTS_FILE).read_bytes(), base)
    return model, base, adapters


def delta(module) -> torch.Tensor:
    """scale·B·A [out, in] in fp64."""
    return module.scale * module.lora_b.double() @ module.lora_a.double()


def summed_deltas(sources: list[tuple[LoraAdapter, float]]) -> dict[tuple[int, str], torch.Tensor]:
    keys = {key for adapter, _ in sources for key in adapter.modules}
    return {key: sum(weight * delta(adapter.modules[key]) for adapter, weight in sources if key in adapter.modules)
            for key in keys}


def parse(files: dict[str, bytes], base) -> LoraAdapter:
    return parse_peft_adapter(files[CONFIG_FILE], files[WEIGHTS_FILE], base)


def random_weights(n: int) -> list[float]:
    return (torch.rand(n) * 3 - 1.5).tolist()  # fresh, of either sign


def test_linear_is_the_exact_weighted_sum(setup):
    _, base, adapters = setup
    sources = list(zip(adapters.values(), random_weights(len(adapters)), strict=True))
    files, error = combine_adapters(sources, "linear")
    combined = parse(files, base)
    assert error == 0.0
    expected = summed_deltas(sources)
    assert set(combined.modules) == set(expected)
    for key, module in combined.modules.items():
        assert module.scale == 1.0
        # The ranks of exactly the sources that target this module, concatenated: no zero padding.
        assert module.rank == sum(a.modules[key].rank for a in adapters.values() if key in a.modules)
        torch.testing.assert_close(delta(module), expected[key], rtol=1e-6, atol=1e-7)  # fp32 storage, one rounding


def test_svd_error_is_reported_shrinks_with_rank_and_vanishes_at_full_rank(setup):
    _, base, adapters = setup
    sources = list(zip(adapters.values(), random_weights(len(adapters)), strict=True))
    expected = summed_deltas(sources)
    full_rank = max(sum(a.modules[key].rank for a in adapters.values() if key in a.modules) for key in expected)
    errors = []
    for rank in (1, 2, 4, 8, full_rank):
        files, error = combine_adapters(sources, "svd", rank=rank)
        combined = parse(files, base)
        # The reported error is the real one: ‖Σ D − Σ D_k‖ / ‖Σ D‖ over all modules, from the stored factors.
        residual = sum(float((delta(combined.modules[key]) - d).square().sum()) for key, d in expected.items())
        total = sum(float(d.square().sum()) for d in expected.values())
        assert error == pytest.approx((residual / total) ** 0.5, rel=1e-4, abs=1e-6)
        assert max(module.rank for module in combined.modules.values()) == min(rank, full_rank)
        errors.append(error)
    assert all(later < earlier for earlier, later in zip(errors[:-1], errors[1:], strict=True)), errors
    assert errors[0] > 0.1 and errors[-1] < 1e-6, errors


def test_svd_factors_are_the_best_low_rank_approximation(setup):
    """Each module's product equals the dense fp64 SVD of its summed delta, truncated (Eckart–Young's optimum)."""
    _, base, adapters = setup
    sources = [(adapters["plain"], 0.8), (adapters["rslora"], -1.3)]
    combined = parse(combine_adapters(sources, "svd", rank=3)[0], base)
    for key, dense in summed_deltas(sources).items():
        u, s, vh = torch.linalg.svd(dense, full_matrices=False)
        best = (u[:, :3] * s[:3]) @ vh[:3]
        torch.testing.assert_close(delta(combined.modules[key]), best, rtol=1e-5, atol=1e-6)


def test_combined_adapter_is_read_by_the_store_and_by_peft(setup, tmp_path):
    model, base, adapters = setup
    sources = list(zip(adapters.values(), random_weights(len(adapters)), strict=True))
    files, _ = combine_adapters(sources, "linear")
    with AdapterStore.open(tmp_path / "store", base) as store:
        record = store.put("acme", "blend", files)
        stored = store.read(record)
    assert sorted(record.ranks) == sorted({m.rank for m in stored.modules.values()})
    ours = parse(files, base)
    for key, module in stored.modules.items():
        assert torch.equal(module.lora_a, ours.modules[key].lora_a) and module.scale == 1.0

    # PEFT reads the rank and alpha patterns on full module names as we do.
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    layers = peft_lora_layers(load_with_peft(model, tmp_path), base)
    assert set(layers) == set(ours.modules)
    for key, layer in layers.items():
        assert layer.r["default"] == ours.modules[key].rank and layer.scaling["default"] == 1.0
        assert torch.equal(layer.lora_B["default"].weight, ours.modules[key].lora_b)
    assert json.loads(files[CONFIG_FILE])["rank_pattern"], "the sources' ranks differ by module, so patterns are used"


def test_bad_requests_are_refused(setup):
    _, _, adapters = setup
    one = [(adapters["plain"], 1.0)]
    for sources, method, rank, field in [(one, "mean", None, "method"), ([], "linear", None, "sources"),
                                         (one, "svd", None, "rank"), (one, "svd", 0, "rank"),
                                         (one, "linear", 4, "rank"),
                                         ([(adapters["plain"], float("nan"))], "linear", None, "sources[0].weight")]:
        with pytest.raises(AdapterError) as refused:
            combine_adapters(sources, method, rank)
        assert refused.value.field == field
