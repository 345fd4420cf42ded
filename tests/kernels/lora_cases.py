"""Random multi-LoRA batches for the kernel tests, and the float64 per-token loop they are checked against.

A case is drawn as structure (dtype, sizes, slots, which token uses which slot) plus a seed; the tensors are made
from the seed on the device under test. Every weight row is random, gaps between slots included, so a kernel that
reads the wrong rows or the wrong slice gets a wrong answer rather than a lucky zero.
"""

from dataclasses import dataclass
from itertools import accumulate

import torch
from hypothesis import strategies as st

from lora_server.kernels.lora_batch import NO_SLOT, LoraBatch
from lora_server.kernels.lora_weights import LoraWeights

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Errors are bounded relative to the sum of |terms| (see `assert_close_to_reference`). y is an fp32 sum of exact
# products in every dtype (fp16/bf16 products fit fp32): at most in_features (≤ 200) · 2^-24 ≈ 1.2e-5 of it.
Y_TOLERANCE = 2e-5
# out: y's error, then for fp16/bf16 the tf32 mma on GPU (y keeps 10 mantissa bits: 2^-11) and at most two roundings
# to the output dtype (2^-11 for fp16, 2^-8 for bf16; the torch path rounds the delta, then the sum).
TOLERANCE = {torch.float32: 3e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


@dataclass(frozen=True)
class LoraCase:
    dtype: torch.dtype
    in_features: int
    slice_sizes: tuple[int, ...]
    total_rows: int
    row_starts: tuple[int, ...]  # per slot
    ranks: tuple[tuple[int, ...], ...]  # per slot, per slice
    scales: tuple[tuple[float, ...], ...]  # per slot, per slice
    token_slots: tuple[int, ...]
    seed: int

    @property
    def num_tokens(self) -> int:
        return len(self.token_slots)

    @property
    def slice_offsets(self) -> tuple[int, ...]:
        return (0, *accumulate(self.slice_sizes))

    def tensors(self, device: torch.device) -> dict[str, torch.Tensor]:
        """x, lora_a, lora_bt and a random base `out`, scaled so every term is O(1)."""
        gen = torch.Generator().manual_seed(self.seed)
        out_features = self.slice_offsets[-1]
        max_rank = max((r for ranks in self.ranks for r in ranks), default=1) or 1

        def randn(*shape: int, scale: float = 1.0) -> torch.Tensor:
            return (torch.randn(*shape, generator=gen) * scale).to(self.dtype).to(device)

        return dict(
            x=randn(self.num_tokens, self.in_features),
            lora_a=randn(len(self.slice_sizes), self.total_rows, self.in_features, scale=self.in_features**-0.5),
            lora_bt=randn(self.total_rows, out_features, scale=max_rank**-0.5),
            out=randn(self.num_tokens, out_features),
        )

    def batch(self, device: torch.device) -> LoraBatch:
        return LoraBatch.build(list(self.token_slots), device=device)

    def weights(self, tensors: dict[str, torch.Tensor]) -> LoraWeights:
        """The layer object over tensors' lora_a and lora_bt (shared, not copied), with this case's slots."""
        weights = LoraWeights(tensors["lora_a"], tensors["lora_bt"], self.slice_offsets, len(self.row_starts))
        for slot, (row, ranks, scales) in enumerate(zip(self.row_starts, self.ranks, self.scales, strict=True)):
            weights.set_slot(slot, row, ranks, scales)
        return weights


def make_case(
    dtype: torch.dtype,
    in_features: int,
    slice_sizes: tuple[int, ...],
    ranks: list[list[int]],
    token_slots: list[int],
    seed: int = 0,
    gaps: list[int] | None = None,
    order: list[int] | None = None,
) -> LoraCase:
    """Place slots in the row pool in `order` (default: reversed), `gaps[i]` free rows before the i-th placed."""
    num_slots = len(ranks)
    order = list(reversed(range(num_slots))) if order is None else order
    gaps = [3] * num_slots if gaps is None else gaps
    row_starts, row = [0] * num_slots, 0
    for slot, gap in zip(order, gaps, strict=True):
        row_starts[slot] = row + gap
        row = row_starts[slot] + max(ranks[slot], default=0)
    gen = torch.Generator().manual_seed(seed + 1)
    scales = (torch.rand(num_slots, len(slice_sizes), generator=gen) * 4 - 2).tolist()
    return LoraCase(
        dtype=dtype,
        in_features=in_features,
        slice_sizes=tuple(slice_sizes),
        total_rows=row + 2,
        row_starts=tuple(row_starts),
        ranks=tuple(tuple(r) for r in ranks),
        scales=tuple(tuple(s) for s in scales),
        token_slots=tuple(token_slots),
        seed=seed,
    )


@st.composite
def lora_cases(draw: st.DrawFn, max_tokens: int = 48) -> LoraCase:
    num_slices = draw(st.integers(1, 3))
    slice_sizes = tuple(draw(st.lists(st.integers(1, 100), min_size=num_slices, max_size=num_slices)))
    num_slots = draw(st.integers(1, 10))
    ranks = []
    for _ in range(num_slots):
        base = draw(st.integers(1, 64))  # one adapter's rank; a slice it skips has rank 0, rank_pattern may differ
        kinds = draw(st.lists(st.sampled_from(("same", "same", "same", "skip", "other")), min_size=num_slices,
                              max_size=num_slices))
        ranks.append([base if k == "same" else 0 if k == "skip" else draw(st.integers(1, 64)) for k in kinds])

    pattern = draw(st.sampled_from(("mixed", "sorted", "runs", "one_slot", "every_token_its_own_slot", "decode")))
    choices = st.sampled_from([*range(num_slots), NO_SLOT])
    if pattern == "every_token_its_own_slot":
        token_slots = draw(st.permutations(range(num_slots)))
    elif pattern == "one_slot":
        slot = draw(st.integers(0, num_slots - 1))
        token_slots = [slot] * draw(st.integers(1, 3 * max_tokens))  # long enough for every token-tile height
    elif pattern == "sorted":  # as the engine orders a step: each slot's tokens one run, no-slot tokens together
        token_slots = sorted(draw(st.lists(choices, min_size=1, max_size=max_tokens)))
    elif pattern == "runs":  # a few runs of any length, a slot possibly in several of them
        run_slots = draw(st.lists(choices, min_size=1, max_size=5))
        token_slots = [slot for slot in run_slots for _ in range(draw(st.integers(1, 2 * max_tokens)))]
    else:  # "decode": at most a couple of tokens per slot; "mixed": anything, interleaved slots and no-slot tokens
        token_slots = draw(st.lists(choices, min_size=1, max_size=max_tokens if pattern == "mixed" else num_slots))

    return make_case(
        dtype=draw(st.sampled_from(DTYPES)),
        in_features=draw(st.integers(1, 200)),
        slice_sizes=slice_sizes,
        ranks=ranks,
        token_slots=list(token_slots),
        seed=draw(st.integers(0, 2**31 - 1)),
        gaps=draw(st.lists(st.integers(0, 6), min_size=num_slots, max_size=num_slots)),
        order=draw(st.permutations(range(num_slots))),
    )


# ---------------------------------------------------------------- float64 reference


def reference(case: LoraCase, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per token, per slice, in float64: y, out + y @ Bᵀ, and the same sums over |terms| (the error scale)."""
    x, lora_a, lora_bt = (tensors[k].cpu().double() for k in ("x", "lora_a", "lora_bt"))
    out = tensors["out"].cpu().double()
    max_rank = max((max(case.ranks[s]) for s in case.token_slots if s != NO_SLOT), default=0)
    y = torch.zeros(case.num_tokens, len(case.slice_sizes), max_rank, dtype=torch.float64)
    y_abs = torch.zeros_like(y)
    expected, expected_abs = out.clone(), out.abs()
    offsets = case.slice_offsets
    for t, slot in enumerate(case.token_slots):
        if slot == NO_SLOT:
            continue
        row = case.row_starts[slot]
        for k, rank in enumerate(case.ranks[slot]):
            a = lora_a[k, row : row + rank]  # [rank, in]
            bt = lora_bt[row : row + rank, offsets[k] : offsets[k + 1]]  # [rank, n_k]
            scale = case.scales[slot][k]
            y[t, k, :rank] = scale * (a @ x[t])
            y_abs[t, k, :rank] = abs(scale) * (a.abs() @ x[t].abs())
            expected[t, offsets[k] : offsets[k + 1]] += y[t, k, :rank] @ bt
            expected_abs[t, offsets[k] : offsets[k + 1]] += y_abs[t, k, :rank] @ bt.abs()
    return dict(y=y, y_abs=y_abs, out=expected, out_abs=expected_abs)


def assert_close_to_reference(got: torch.Tensor, expected: torch.Tensor, expected_abs: torch.Tensor, tolerance: float,
                              what: str) -> None:
    got = got.cpu().double()
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    if got.numel() == 0:
        return
    assert torch.isfinite(got).all(), f"{what}: non-finite values at {torch.nonzero(~torch.isfinite(got))[:5].tolist()}"
    error = (got - expected).abs()
    allowed = tolerance * expected_abs + 1e-30
    worst = torch.argmax(error / allowed)
    assert (error <= allowed).all(), (
        f"{what}: error {error.flatten()[worst]:.3g} > allowed {allowed.flatten()[worst]:.3g} at flat index {worst}"
    )
