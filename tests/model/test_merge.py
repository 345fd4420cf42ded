"""Merging one adapter slot into the base: in one mixed batch, the merged model (with the compensation term for every
other token) computes what the unmerged one does, for the merged adapter's requests, other adapters' and base-only
ones; unmerge restores every base weight bit for bit, NF4 bases included; the Triton path takes the compensation."""

import pytest
import torch
import transformers

from lora_server.adapters_store import load_peft_adapter
from lora_server.engine.build import describe_base_model
from lora_server.kernels.lora_batch import NO_SLOT, LoraBatch
from lora_server.model.attention import ContiguousKVCache, SequenceChunk
from lora_server.model.llama import LlamaModel
from lora_server.model.loader import load_model
from lora_server.model.lora_linear import DenseBase, LoraLinear
from lora_server.model.merge import (
    MergeBudgetError,
    merge_device_bytes,
    merge_slot_,
    merged_lora_batches,
    unmerge_,
)
from tests.engine.offline_reference import load_adapters_into_slots
from tests.reference import add_random_lora, assert_close_relative, one_torch_thread, save_random_hf_model

ADAPTERS = {
    "plain": dict(r=8, lora_alpha=16),
    "rslora": dict(r=4, lora_alpha=8, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"]),
    "patterned": dict(r=8, lora_alpha=8, rank_pattern={"o_proj": 2, "mlp.up_proj": 16},
                      alpha_pattern={"gate_proj": 32}, layers_to_transform=[1],
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]),
}
PROMPT_LENS = (7, 3, 12, 5, 9)
NUM_DECODE = 6


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    save_random_hf_model(root / "base", "LlamaForCausalLM", tie_word_embeddings=False, hidden_size=128,
                         intermediate_size=192, seed=21)
    for seed, (name, kwargs) in enumerate(ADAPTERS.items()):
        add_random_lora(transformers.LlamaForCausalLM.from_pretrained(root / "base"), root / name, seed=200 + seed,
                        **kwargs)
    return root


def loaded_model(root, dtype: torch.dtype = torch.float32, nf4: bool = False) -> tuple[LlamaModel, dict[str, int]]:
    """A fresh model with every adapter in its own slot (name -> slot)."""
    model = load_model(root / "base", torch.device("cpu"), dtype)
    if nf4:
        from lora_server.model.nf4 import quantize_nf4_

        quantize_nf4_(model)
    base = describe_base_model(model.config)
    adapters = {name: load_peft_adapter(root / name, base) for name in ADAPTERS}
    return model, load_adapters_into_slots(model, adapters)


def base_weights(model: LlamaModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if ".base." in name}


def greedy(model: LlamaModel, prompts: list[list[int]], token_slot: list[int], lora_for) -> tuple[list, list]:
    """Prefill every prompt in one flat batch, then decode NUM_DECODE tokens each, greedily, in one batch per step.
    `lora_for(token_slots)` gives the LoRA argument of each pass. Returns (prefill logits per prompt, tokens)."""
    c = model.config
    dtype = model.embed_tokens.weight.dtype
    cache = ContiguousKVCache(c.num_layers, len(prompts), max(map(len, prompts)) + NUM_DECODE, c.num_kv_heads,
                              c.head_dim, dtype, "cpu")
    lens = [len(p) for p in prompts]
    cache.set_batch(tuple(SequenceChunk(row, sum(lens[:row]), n, 0) for row, n in enumerate(lens)))
    slots = [slot for slot, n in zip(token_slot, lens, strict=True) for _ in range(n)]
    hidden = model(torch.tensor([t for p in prompts for t in p]), torch.tensor([i for n in lens for i in range(n)]),
                   cache, lora_for(slots))
    prefill = list(model.compute_logits(hidden).split(lens))
    tokens = [[int(logits[-1].argmax())] for logits in prefill]
    for step in range(NUM_DECODE - 1):
        positions = [n + step for n in lens]
        cache.set_batch(tuple(SequenceChunk(row, row, 1, pos) for row, pos in enumerate(positions)))
        hidden = model(torch.tensor([t[-1] for t in tokens]), torch.tensor(positions), cache, lora_for(token_slot))
        for row, logits in enumerate(model.compute_logits(hidden)):
            tokens[row].append(int(logits.argmax()))
    return prefill, tokens


def mixed_requests(slots: dict[str, int]) -> tuple[list[list[int]], list[int]]:
    """Every adapter and the base, interleaved, on fresh random prompts."""
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    owners = [*slots.values(), NO_SLOT] * 2
    prompts = [torch.randint(0, 97, (PROMPT_LENS[i % len(PROMPT_LENS)],), generator=generator).tolist()
               for i in range(len(owners))]
    return prompts, owners


# ---------------------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("merged_name", list(ADAPTERS))
def test_merged_mixed_batch_equals_unmerged(checkpoint, merged_name):
    model, slots = loaded_model(checkpoint)
    prompts, owners = mixed_requests(slots)
    before = base_weights(model)
    unmerged_logits, unmerged_tokens = greedy(model, prompts, owners, LoraBatch.build)

    merge = merge_slot_(model, slots[merged_name])
    merged_logits, merged_tokens = greedy(model, prompts, owners, lambda s: merged_lora_batches(s, merge))
    unmerge_(model, merge)

    for ours, reference in zip(merged_logits, unmerged_logits, strict=True):
        assert_close_relative(ours, reference, tol=1e-4)
    assert merged_tokens == unmerged_tokens
    assert all(torch.equal(weight, before[name]) for name, weight in base_weights(model).items())
    # The merge did change the base: without the compensation term, base-only requests would come out differently.
    merge = merge_slot_(model, slots[merged_name])
    uncompensated, _ = greedy(model, prompts, owners, lambda token_slots: None)
    unmerge_(model, merge)
    base_rows = [row for row, owner in enumerate(owners) if owner == NO_SLOT]
    assert max((uncompensated[row] - unmerged_logits[row]).abs().max() for row in base_rows) > 1e-3


def test_merged_batch_equals_unmerged_in_bf16(checkpoint):
    model, slots = loaded_model(checkpoint, torch.bfloat16)
    prompts, owners = mixed_requests(slots)
    unmerged_logits, _ = greedy(model, prompts, owners, LoraBatch.build)
    merge = merge_slot_(model, slots["plain"])
    merged_logits, _ = greedy(model, prompts, owners, lambda s: merged_lora_batches(s, merge))
    unmerge_(model, merge)
    for ours, reference in zip(merged_logits, unmerged_logits, strict=True):
        assert_close_relative(ours, reference, tol=3e-2)  # bf16: W + δ rounded once, then −δ added back per token


# ---------------------------------------------------------------------------------------------------- bit-exact unmerge


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_thousand_merge_unmerge_cycles_leave_base_bit_identical(checkpoint, dtype):
    model, slots = loaded_model(checkpoint, dtype)
    before = base_weights(model)
    for cycle in range(1000):
        unmerge_(model, merge_slot_(model, list(slots.values())[cycle % len(slots)]))
    assert all(torch.equal(weight, before[name]) for name, weight in base_weights(model).items())
    assert all(not any(linear.slot_ranks[linear.compensation_slot]) for linear in model.lora_linears())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merged_weight_is_the_sum_rounded_once(checkpoint, dtype):
    model, slots = loaded_model(checkpoint, dtype)
    qkv = model.layers[1].self_attn.qkv_proj
    q_rows = qkv.slice_offsets[1]
    a, b, scale = qkv.slot_slices(slots["plain"])[0]
    exact = qkv.base.weight[:q_rows].double() + scale * b.double() @ a.double()  # W + scale·B·A in fp64
    merge = merge_slot_(model, slots["plain"])
    # Within half an ulp of the dtype (plus fp32's own summation error): one rounding, not one per step.
    error = (qkv.base.weight[:q_rows].double() - exact).abs()
    assert (error <= exact.abs() * torch.finfo(dtype).eps / 2 + 1e-6).all()
    unmerge_(model, merge)


def test_merge_changes_only_targeted_slices(checkpoint):
    model, slots = loaded_model(checkpoint)
    before = base_weights(model)
    merge = merge_slot_(model, slots["rslora"])  # q, v and down only
    qkv = model.layers[0].self_attn.qkv_proj
    lo, hi = qkv.slice_offsets[1], qkv.slice_offsets[2]  # k_proj
    assert torch.equal(qkv.base.weight[lo:hi], before["layers.0.self_attn.qkv_proj.base.weight"][lo:hi])
    assert not torch.equal(qkv.base.weight[:lo], before["layers.0.self_attn.qkv_proj.base.weight"][:lo])
    assert torch.equal(model.layers[0].mlp.gate_up_proj.base.weight, before["layers.0.mlp.gate_up_proj.base.weight"])
    assert merge.snapshot_bytes == sum(s.host_rows.numel() * 4 for s in merge.snapshots) > 0
    unmerge_(model, merge)


def test_one_merge_at_a_time_and_one_unmerge(checkpoint):
    model, slots = loaded_model(checkpoint)
    merge = merge_slot_(model, slots["plain"])
    with pytest.raises(AssertionError, match="unmerge it first"):
        merge_slot_(model, slots["rslora"])
    unmerge_(model, merge)
    with pytest.raises(AssertionError, match="already unmerged"):
        unmerge_(model, merge)


# ---------------------------------------------------------------------------------------------------- NF4 base


def test_nf4_merge_is_a_dense_copy_of_the_dequantized_merge(checkpoint):
    nf4_model, slots = loaded_model(checkpoint, nf4=True)
    dense_model, _ = loaded_model(checkpoint)
    for nf4_linear, dense_linear in zip(nf4_model.lora_linears(), dense_model.lora_linears(), strict=True):
        dense_linear.base.weight.copy_(nf4_linear.base.dequantized_weight())
    nf4_modules = [linear.base for linear in nf4_model.lora_linears()]
    packed = [base.packed_weight.clone() for base in nf4_modules]
    prompts, owners = mixed_requests(slots)
    unmerged_logits, unmerged_tokens = greedy(nf4_model, prompts, owners, LoraBatch.build)

    slot = slots["patterned"]  # layer 1 only: layer 0 keeps its NF4 modules
    assert merge_device_bytes(dense_model, slot) == 0
    needed = merge_device_bytes(nf4_model, slot)
    assert needed == sum(m.out_features * m.in_features * 4 for m in nf4_model.layers[1].modules()
                         if isinstance(m, LoraLinear))
    nf4_merge, dense_merge = merge_slot_(nf4_model, slot, budget_bytes=needed), merge_slot_(dense_model, slot)
    assert nf4_merge.dense_copy_bytes == needed
    for nf4_linear, dense_linear, original in zip(nf4_model.lora_linears(), dense_model.lora_linears(), nf4_modules,
                                                  strict=True):
        if any(nf4_linear.slot_ranks[slot]):
            assert isinstance(nf4_linear.base, DenseBase)
            assert torch.equal(nf4_linear.base.weight, dense_linear.base.weight)
        else:
            assert nf4_linear.base is original
    merged_logits, merged_tokens = greedy(nf4_model, prompts, owners, lambda s: merged_lora_batches(s, nf4_merge))
    unmerge_(nf4_model, nf4_merge)
    unmerge_(dense_model, dense_merge)

    for ours, reference in zip(merged_logits, unmerged_logits, strict=True):
        assert_close_relative(ours, reference, tol=1e-4)
    assert merged_tokens == unmerged_tokens
    for linear, original, codes in zip(nf4_model.lora_linears(), nf4_modules, packed, strict=True):
        assert linear.base is original and torch.equal(original.packed_weight, codes)


def test_nf4_merge_over_budget_is_refused_and_changes_nothing(checkpoint):
    model, slots = loaded_model(checkpoint, nf4=True)
    bases = [linear.base for linear in model.lora_linears()]
    needed = merge_device_bytes(model, slots["plain"])
    with pytest.raises(MergeBudgetError, match=r"needs 0\.\d+ MiB of dense copies.*over the merge budget"):
        merge_slot_(model, slots["plain"], budget_bytes=needed - 1)
    assert [linear.base for linear in model.lora_linears()] == bases
    assert all(not any(linear.slot_ranks[linear.compensation_slot]) for linear in model.lora_linears())
    unmerge_(model, merge_slot_(model, slots["plain"], budget_bytes=needed))


# ------------------------------------------------------------------------------------ one layer, both backends


def random_lora_linear(dtype: torch.dtype = torch.float32) -> LoraLinear:
    """in 48, slices (32, 16, 16); slots 0..2 with ranks that differ per slot and slice (one slice skipped)."""
    generator = torch.Generator().manual_seed(int(torch.randint(0, 2**31, ())))
    linear = LoraLinear(48, (32, 16, 16))
    linear.base.weight.copy_(torch.randn(64, 48, generator=generator) / 7)
    linear.allocate_lora_pool(total_rows=40, num_slots=3, dtype=dtype, device=torch.device("cpu"))
    for slot, (row_start, ranks, scales) in enumerate([(0, (8, 8, 0), (2.0, 2.0, 0.0)),
                                                       (8, (4, 2, 16), (1.5, 0.5, 4.0)),
                                                       (24, (16, 16, 16), (0.25, 1.0, 2.0))]):
        slices = []
        for k, (rank, scale) in enumerate(zip(ranks, scales, strict=True)):
            n_k = linear.slice_sizes[k]
            slices.append((torch.randn(rank, 48, generator=generator) / 7, torch.randn(n_k, rank, generator=generator),
                           scale) if rank else None)
        linear.load_slot(slot, row_start, slices)
    return linear.to(dtype)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("token_slots", [[0, 1, NO_SLOT, 2, 1, 0, 1, NO_SLOT, 0, 2],  # long and short segments
                                         [1, 0]],  # decode: every segment one token
                         ids=["prefill", "decode"])
def test_compensation_batch_on_one_layer(backend, token_slots):
    linear = random_lora_linear()
    x = torch.randn(len(token_slots), 48)
    linear.lora_backend = "torch"
    reference = linear(x, LoraBatch.build(token_slots))
    merge = merge_slot_(linear, 0)
    linear.lora_backend = backend
    merged = linear(x, merged_lora_batches(token_slots, merge))
    unmerge_(linear, merge)
    assert_close_relative(merged, reference, tol=1e-5)
    assert (reference - linear(x)).abs().max() > 1e-1  # the adapters matter here
