"""apply_lora adds the same LoRA term through either backend; resolve_lora_backend picks and refuses as documented."""

import pytest
import torch

from kernels.lora_batch import NO_SLOT
from kernels.lora_ops import apply_lora, resolve_lora_backend
from tests.kernels.lora_cases import TOLERANCE, LoraCase, assert_close_to_reference, make_case, reference

GQA = (40, 12, 12)
RANKS = [[8, 8, 8], [64, 64, 0], [3, 3, 3], [16, 16, 16]]
TOKEN_SLOTS = [1, NO_SLOT, 1, 3, 0, 1, NO_SLOT, 0, 1, 1, 1, 1, 1, 1]  # slot 2 has no tokens


def apply(case: LoraCase, backend: str, device: torch.device) -> tuple[dict, torch.Tensor]:
    tensors = case.tensors(device)
    out_before = tensors["out"].clone()
    apply_lora(backend, tensors["x"], tensors["out"], tensors["lora_a"], tensors["lora_bt"], case.batch(device),
               **case.host_tables(), **case.device_tables(device))
    return tensors, out_before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_apply_lora_adds_each_tokens_own_adapter(backend, dtype, kernel_device):
    case = make_case(dtype, 50, GQA, RANKS, TOKEN_SLOTS, seed=3)
    device = kernel_device if backend == "triton" else torch.device("cpu")
    tensors, out_before = apply(case, backend, device)
    expected = reference(case, {**tensors, "out": out_before})
    assert_close_to_reference(tensors["out"], expected["out"], expected["out_abs"], TOLERANCE[dtype], backend)
    no_slot = torch.tensor([s == NO_SLOT for s in TOKEN_SLOTS], device=device)
    assert torch.equal(tensors["out"][no_slot], out_before[no_slot])


def test_apply_lora_takes_any_bound_on_the_rank(kernel_device):
    case = make_case(torch.float16, 50, GQA, RANKS, TOKEN_SLOTS, seed=5)
    exact, _ = apply(case, "triton", kernel_device)
    bounded = case.tensors(kernel_device)
    apply_lora("triton", bounded["x"], bounded["out"], bounded["lora_a"], bounded["lora_bt"], case.batch(kernel_device),
               **case.host_tables(), **case.device_tables(kernel_device), max_rank=80)
    assert torch.equal(bounded["out"], exact["out"])


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
