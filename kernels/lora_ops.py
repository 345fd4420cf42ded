"""Backend-agnostic LoRA entry point: out += the LoRA term of every token's own slot, by plain torch or by Triton.

Semantics (t a token of slot s, k a slice, r = rank[s][k], a = row_start[s], lo:hi = slice k's columns):
    y[t, k, :r]    = scale[s][k] · x[t] @ lora_a[k, a : a + r]ᵀ            (fp32)
    out[t, lo:hi] += y[t, k, :r] @ lora_bt[a : a + r, lo:hi]
The "torch" backend runs `kernels.lora_torch` on the batch's runs (views of x and out) and `kernels.lora_gather` on
its short runs, gathered together; "triton" is `kernels.lora_shrink` + `kernels.lora_expand`. A call is
`apply_lora(backend, x, out, weights, batch)`: the layer's `LoraWeights` and the step's `LoraBatch` (or
`TokenSlots`, for a step captured in a CUDA graph), both built ahead of the call (weights when slots change, the batch
once per step). Under torch.compile the call is a custom op.
"""

import os
from importlib.util import find_spec

import torch

from lora_server.kernels.lora_batch import LoraBatch, TokenSlots
from lora_server.kernels.lora_gather import lora_gathered_torch, lora_per_token_torch
from lora_server.kernels.lora_torch import lora_runs_torch
from lora_server.kernels.lora_weights import LoraWeights

LORA_BACKENDS = ("auto", "triton", "torch")
# The torch backend gathers one-token runs (decodes of distinct adapters) into one set when there are at least
# GATHER_MIN_TOKENS of them and the layer is at most GATHER_MAX_IN_FEATURES wide; every other run gets its own matmuls
# on views. Why: measured on CPU (kernels/BENCHMARKS.md, "CPU crossover"), gathering copies each token's adapter rows
# and loses to runs on views at hidden 256, 1024 and 4096 for every run length and number of runs (1.2x to 80x the
# time); only at hidden 128 did it win, with 64 one-token runs (0.72-0.95x over three runs; 16 runs: a tie).
GATHER_MAX_RUN_TOKENS = 1
GATHER_MIN_TOKENS = 32
GATHER_MAX_IN_FEATURES = 128


def resolve_lora_backend(name: str, device: torch.device) -> str:
    """Resolve a configured backend name ("auto", "triton" or "torch") to the one that runs on `device`."""
    if name not in LORA_BACKENDS:
        raise ValueError(f"unknown LoRA backend {name!r}; choose one of {', '.join(LORA_BACKENDS)}")
    device = torch.device(device)
    if name == "auto":
        return "triton" if device.type == "cuda" and find_spec("triton") is not None else "torch"
    if name == "triton":
        if find_spec("triton") is None:
            raise ValueError("LoRA backend 'triton' needs the triton package, which is not installed")
        if device.type != "cuda" and not (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"):
            raise ValueError(
                f"LoRA backend 'triton' runs on CUDA devices, not {device.type}; on CPU only under Triton's "
                "interpreter (TRITON_INTERPRET=1, for tests: slow). Use 'torch' or 'auto' here."
            )
    return name


def apply_lora(backend: str, x: torch.Tensor, out: torch.Tensor, weights: LoraWeights,
               batch: LoraBatch | TokenSlots) -> None:
    """out [num_tokens, out_features] += LoRA(x [num_tokens, in]) for each token's slot, in place.

    `backend` is a resolved one ("torch" or "triton", see `resolve_lora_backend`). The torch path reads the host
    tables of `weights` and `batch`, the Triton path their device tables; both describe the same slots and runs.
    Inside `torch.compile` the call is one custom op (`lora_server::apply_lora`), opaque to the compiler: the
    batch's runs are host data that change every step, and tracing a loop over them would recompile every step.
    """
    if isinstance(batch, TokenSlots):
        if torch.compiler.is_compiling():
            torch.ops.lora_server.apply_lora_per_token(x, out, backend, weights.key, batch.slots, batch.max_rank)
        else:
            _apply_lora_per_token(backend, x, out, weights, batch)
    elif torch.compiler.is_compiling():
        torch.ops.lora_server.apply_lora(x, out, backend, weights.key, batch.host_table, batch.device_table)
    else:
        _apply_lora(backend, x, out, weights, batch)


def _apply_lora(backend: str, x: torch.Tensor, out: torch.Tensor, weights: LoraWeights, batch: LoraBatch) -> None:
    if not batch.has_lora or weights.max_rank == 0:  # no token has a slot, or no slot has rows in this layer
        return
    if backend == "torch":
        split = batch.split_runs(GATHER_MAX_RUN_TOKENS)
        gathered = split.gathered
        if gathered is not None and gathered.num_tokens >= GATHER_MIN_TOKENS and x.shape[1] <= GATHER_MAX_IN_FEATURES:
            lora_gathered_torch(x, out, weights, gathered)
            lora_runs_torch(x, out, weights, split.long_segments)
        else:
            lora_runs_torch(x, out, weights, batch.segments)
    elif backend == "triton":
        _apply_lora_triton(x, out, weights, batch, weights.max_rank)
    else:
        raise ValueError(f"apply_lora needs a resolved backend ('torch' or 'triton'), got {backend!r}")


def _apply_lora_per_token(backend: str, x: torch.Tensor, out: torch.Tensor, weights: LoraWeights,
                          batch: TokenSlots) -> None:
    """A `TokenSlots` batch: the same launches whatever the slots hold and whatever is loaded (no early exit on the
    host), so that a captured graph stays right when adapters come and go."""
    assert weights.max_rank <= batch.max_rank, f"a slot of rank {weights.max_rank} exceeds the bound {batch.max_rank}"
    if backend == "torch":
        lora_per_token_torch(x, out, weights, batch)
    elif backend == "triton":
        _apply_lora_triton(x, out, weights, batch, batch.max_rank)
    else:
        raise ValueError(f"apply_lora needs a resolved backend ('torch' or 'triton'), got {backend!r}")


def _apply_lora_triton(x: torch.Tensor, out: torch.Tensor, weights: LoraWeights, batch: LoraBatch | TokenSlots,
                       max_rank: int) -> None:
    # Imported on first use: @triton.jit reads TRITON_INTERPRET when the kernel module is imported, and a CPU-only
    # server never pays for importing triton.
    from lora_server.kernels.lora_expand import lora_expand_triton
    from lora_server.kernels.lora_shrink import lora_shrink_triton

    y = lora_shrink_triton(x, weights.lora_a, batch, weights.device_row_starts, weights.device_ranks,
                           weights.device_scales, max_rank)
    lora_expand_triton(y, weights.lora_bt, out, batch, weights.device_row_starts, weights.device_ranks,
                       weights.device_slice_offsets)


@torch.library.custom_op("lora_server::apply_lora", mutates_args=("out",))
def _apply_lora_op(x: torch.Tensor, out: torch.Tensor, backend: str, weights_key: int, host_table: torch.Tensor,
                   device_table: torch.Tensor) -> None:
    """`apply_lora` as the compiled graph calls it: the layer's pool by its key, the step's runs as tables (host and
    device copies, both built once per step by LoraBatch.build; the host one is read here, with no device sync)."""
    batch = LoraBatch.from_tables(x.shape[0], host_table, device_table)
    _apply_lora(backend, x, out, LoraWeights.by_key(weights_key), batch)


@_apply_lora_op.register_fake
def _(x: torch.Tensor, out: torch.Tensor, backend: str, weights_key: int, host_table: torch.Tensor,
      device_table: torch.Tensor) -> None:
    return None


@torch.library.custom_op("lora_server::apply_lora_per_token", mutates_args=("out",))
def _apply_lora_per_token_op(x: torch.Tensor, out: torch.Tensor, backend: str, weights_key: int,
                             slots: torch.Tensor, max_rank: int) -> None:
    """`apply_lora` of a `TokenSlots` batch as the compiled graph calls it (the batch is its slots and bound)."""
    _apply_lora_per_token(backend, x, out, LoraWeights.by_key(weights_key), TokenSlots.over(slots, max_rank))


@_apply_lora_per_token_op.register_fake
def _(x: torch.Tensor, out: torch.Tensor, backend: str, weights_key: int, slots: torch.Tensor, max_rank: int) -> None:
    return None
