"""apply_lora adds the same LoRA term through either backend; resolve_lora_backend picks and refuses as documented."""

import dataclasses

import pytest
import torch

from lora_server.kernels import lora_ops
from lora_server.kernels.lora_batch import NO_SLOT, TokenSlots
from lora_server.kernels.lora_gather import lora_gathered_torch
from lora_server.kernels.lora_ops import GATHER_MAX_IN_FEATURES, GATHER_MIN_TOKENS, apply_lora, resolve_lora_backend
from tests.kernels.lora_cases import TOLERANCE, LoraCase, assert_close_to_reference, make_case, reference

GQA = (40, 12, 12)
RANKS = [[8, 8, 8], [64, 64, 0], [3, 3, 3], [16, 16, 16]]
TOKEN_SLOTS = [1, NO_SLOT, 1, 3, 0, 1, NO_SLOT, 0, 1, 1, 1, 1, 1, 1]  # slot 2 has no tokens


def apply(case: LoraCase, backend: str, device: torch.device) -> tuple[dict, torch.Tensor]:
    tensors = case.tensors(device)
    out_before = tensors["out"].clone()
    apply_lora(backend, tensors["x"], tensors["out"], case.weights(tensors), case.batch(device))
    return tensors, out_before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("order", ["as given", "sorted"])
def test_apply_lora_adds_each_tokens_own_adapter(backend, order, dtype, kernel_device):
    token_slots = sorted(TOKEN_SLOTS) if order == "sorted" else TOKEN_SLOTS
    case = make_case(dtype, 50, GQA, RANKS, token_slots, seed=3)
    device = kernel_device if backend == "triton" else torch.device("cpu")
    tensors, out_before = apply(case, backend, device)
    expected = reference(case, {**tensors, "out": out_before})
    assert_close_to_reference(tensors["out"], expected["out"], expected["out_abs"], TOLERANCE[dtype], backend)
    no_slot = torch.tensor([s == NO_SLOT for s in token_slots], device=device)
    assert torch.equal(tensors["out"][no_slot], out_before[no_slot])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("in_features", [50, GATHER_MAX_IN_FEATURES + 1])
@pytest.mark.parametrize("num_one_token_runs", [GATHER_MIN_TOKENS - 1, GATHER_MIN_TOKENS])
def test_torch_backend_on_both_sides_of_the_gather_rule(num_one_token_runs, in_features, dtype, monkeypatch):
    """Decode tokens of distinct slots (gathered when the rule says so) beside two long runs (views), and no-slot
    tokens between: every token gets its own term, whichever form the rule picks."""
    gathered_calls = []
    monkeypatch.setattr(lora_ops, "lora_gathered_torch",
                        lambda *args: gathered_calls.append(args) or lora_gathered_torch(*args))
    num_slots = num_one_token_runs + 2
    ranks = [[4 + s % 5, 8, 0 if s % 3 == 0 else 6] for s in range(num_slots)]
    token_slots = [NO_SLOT, *range(num_one_token_runs), *[num_slots - 2] * 9, NO_SLOT, *[num_slots - 1] * 5]
    case = make_case(dtype, in_features, GQA, ranks, token_slots, seed=num_one_token_runs)
    tensors, out_before = apply(case, "torch", torch.device("cpu"))
    expected = reference(case, {**tensors, "out": out_before})
    assert_close_to_reference(tensors["out"], expected["out"], expected["out_abs"], TOLERANCE[dtype], "torch")
    no_slot = torch.tensor([s == NO_SLOT for s in token_slots])
    assert torch.equal(tensors["out"][no_slot], out_before[no_slot])
    should_gather = num_one_token_runs >= GATHER_MIN_TOKENS and in_features <= GATHER_MAX_IN_FEATURES
    assert len(gathered_calls) == should_gather


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_larger_rank_loaded_elsewhere_changes_nothing(backend, kernel_device):
    """The layer's largest loaded rank bounds every batch (Triton sizes y by it): a rank-80 adapter loaded in a slot
    the batch does not use leaves its result bit for bit as it was."""
    device = kernel_device if backend == "triton" else torch.device("cpu")
    case = make_case(torch.float16, 50, GQA, [*RANKS, [80, 80, 80]], TOKEN_SLOTS, seed=5)
    tensors, _ = apply(case, backend, device)
    without = case.tensors(device)
    weights = case.weights(without)
    weights.clear_slot(len(RANKS))
    assert weights.max_rank == 64
    apply_lora(backend, without["x"], without["out"], weights, case.batch(device))
    assert torch.equal(without["out"], tensors["out"])


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("token_slots", [[NO_SLOT] * 4, [2, NO_SLOT, 2, 2]], ids=["no lora tokens", "rank 0 slot"])
def test_apply_lora_without_work_leaves_out_alone(backend, token_slots, kernel_device):
    ranks = [[8, 8, 8], [4, 4, 4], [0, 0, 0]]  # slot 2: an adapter that skips every slice of this layer
    case = make_case(torch.float16, 24, GQA, ranks, token_slots, seed=4)
    tensors, out_before = apply(case, backend, kernel_device if backend == "triton" else torch.device("cpu"))
    assert torch.equal(tensors["out"], out_before)


def test_apply_lora_refuses_an_unresolved_backend():
    case = make_case(torch.float32, 8, (4,), [[2]], [0])
    with pytest.raises(ValueError, match="resolved backend"):
        apply(case, "auto", torch.device("cpu"))


# ---------------------------------------------------------------- TokenSlots: the captured step's batch

GRAPH_RANK_BOUND = 72  # above every rank loaded here, as the engine's max_lora_rank is


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_token_slots_batch_adds_each_tokens_own_adapter(backend, dtype, kernel_device):
    """One run per token, slots read from device memory: the same term as the runs of a LoraBatch, NO_SLOT rows
    untouched."""
    case = make_case(dtype, 50, GQA, RANKS, TOKEN_SLOTS, seed=6)
    device = kernel_device if backend == "triton" else torch.device("cpu")
    tensors = case.tensors(device)
    out_before = tensors["out"].clone()
    slots = torch.tensor(TOKEN_SLOTS, dtype=torch.int32, device=device)
    apply_lora(backend, tensors["x"], tensors["out"], case.weights(tensors), TokenSlots.over(slots, GRAPH_RANK_BOUND))
    expected = reference(case, {**tensors, "out": out_before})
    assert_close_to_reference(tensors["out"], expected["out"], expected["out_abs"], TOLERANCE[dtype], backend)
    no_slot = torch.tensor([s == NO_SLOT for s in TOKEN_SLOTS], device=device)
    assert torch.equal(tensors["out"][no_slot], out_before[no_slot])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_token_slots_batch_follows_its_slots_and_the_pool_in_place(backend, kernel_device):
    """What a CUDA graph replay relies on: one TokenSlots object, its slots rewritten in place for a new mix, and an
    adapter loaded into a slot after the first call (which rewrites the pool's device tables in place, never
    replaces them): each call matches the reference for the slots and pool as they are then."""
    device = kernel_device if backend == "triton" else torch.device("cpu")
    ranks = [[8, 8, 8], [4, 4, 0], [0, 0, 0]]  # slot 2 empty at first
    # A pool of 64 rows: rows 40..55 (random like the rest) are where slot 2's adapter is loaded later.
    first = dataclasses.replace(make_case(torch.float32, 40, GQA, ranks, [0, 1, NO_SLOT, 1, 0, 2], seed=7),
                                total_rows=64)
    tensors = first.tensors(device)
    weights = first.weights(tensors)
    tables = (weights.device_row_starts.data_ptr(), weights.device_ranks.data_ptr(), weights.device_scales.data_ptr())
    slots = torch.tensor(first.token_slots, dtype=torch.int32, device=device)
    batch = TokenSlots.over(slots, GRAPH_RANK_BOUND)

    base = tensors["out"].clone()
    apply_lora(backend, tensors["x"], tensors["out"], weights, batch)
    expected = reference(first, {**tensors, "out": base})
    assert_close_to_reference(tensors["out"], expected["out"], expected["out_abs"], TOLERANCE[torch.float32], backend)

    # Load slot 2 (rank 16, rows past every other slot's) and change the mix, through the same objects.
    weights.set_slot(2, 40, (16, 16, 16), (0.5, -1.5, 2.0))
    second = dataclasses.replace(first, token_slots=(2, NO_SLOT, 2, 0, 1, 2),
                                 row_starts=(*first.row_starts[:2], 40), ranks=(*ranks[:2], (16, 16, 16)),
                                 scales=(*first.scales[:2], (0.5, -1.5, 2.0)))
    slots.copy_(torch.tensor(second.token_slots, dtype=torch.int32))
    tensors["out"].copy_(base)
    apply_lora(backend, tensors["x"], tensors["out"], weights, batch)
    expected = reference(second, {**tensors, "out": base})
    assert_close_to_reference(tensors["out"], expected["out"], expected["out_abs"], TOLERANCE[torch.float32], backend)
    assert tables == (weights.device_row_starts.data_ptr(), weights.device_ranks.data_ptr(),
                      weights.device_scales.data_ptr())


def test_a_token_slots_batch_refuses_a_rank_above_its_bound():
    case = make_case(torch.float32, 8, (4,), [[8]], [0])
    tensors = case.tensors(torch.device("cpu"))
    with pytest.raises(AssertionError, match="exceeds the bound 4"):
        apply_lora("torch", tensors["x"], tensors["out"], case.weights(tensors),
                   TokenSlots.over(torch.zeros(1, dtype=torch.int32), 4))


# ---------------------------------------------------------------- resolve_lora_backend


def test_auto_is_triton_on_cuda_and_torch_elsewhere():
    assert resolve_lora_backend("auto", torch.device("cuda")) == "triton"
    assert resolve_lora_backend("auto", torch.device("cpu")) == "torch"
    assert resolve_lora_backend("torch", torch.device("cuda")) == "torch"
    assert resolve_lora_backend("triton", torch.device("cuda", 0)) == "triton"


def test_triton_on_cpu_only_under_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_lora_backend("triton", torch.device("cpu")) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
        resolve_lora_backend("triton", torch.device("cpu"))
    with pytest.raises(ValueError, match="CUDA"):
        resolve_lora_backend("triton", torch.device("meta"))


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="auto, triton, torch"):
        resolve_lora_backend("cuda", torch.device("cpu"))


def test_the_torch_path_runs_on_one_thread_and_gives_the_pool_back(monkeypatch):
    """Runs compute on one CPU thread (waking the intra-op pool per tiny matmul cost more than the matmul), and the
    caller's thread count is restored afterwards, even when a run raises."""
    case = make_case(torch.float32, 50, GQA, RANKS, sorted(TOKEN_SLOTS), seed=4)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        original = torch.bmm
        monkeypatch.setattr(torch, "bmm", lambda *args: seen.append(torch.get_num_threads()) or original(*args))
        apply(case, "torch", torch.device("cpu"))
        assert seen and set(seen) == {1} and torch.get_num_threads() == 2

        monkeypatch.setattr(torch, "bmm", lambda *args: (_ for _ in ()).throw(RuntimeError("injected")))
        with pytest.raises(RuntimeError, match="injected"):
            apply(case, "torch", torch.device("cpu"))
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)


def test_a_token_slots_batch_compiles_as_one_custom_op():
    """Under torch.compile a TokenSlots batch is the `apply_lora_per_token` custom op (no graph break), equal to
    eager, and a second call with other slots in the same tensor reuses the graph."""
    import torch._dynamo.testing

    case = make_case(torch.float32, 50, GQA, RANKS, TOKEN_SLOTS, seed=8)
    tensors = case.tensors(torch.device("cpu"))
    weights = case.weights(tensors)
    slots = torch.tensor(TOKEN_SLOTS, dtype=torch.int32)
    batch = TokenSlots.over(slots, GRAPH_RANK_BOUND)

    def lora_term(x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        out = out.clone()
        apply_lora("torch", x, out, weights, batch)
        return out

    counter = torch._dynamo.testing.CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(lora_term, backend=counter, fullgraph=True)
    for step_slots in (TOKEN_SLOTS, list(reversed(TOKEN_SLOTS))):
        slots.copy_(torch.tensor(step_slots, dtype=torch.int32))
        got = compiled(tensors["x"], tensors["out"])
        torch.testing.assert_close(got, lora_term(tensors["x"], tensors["out"]))
    assert counter.frame_count == 1
    assert any("apply_lora_per_token" in str(node.target) for graph in counter.graphs for node in graph.graph.nodes)
