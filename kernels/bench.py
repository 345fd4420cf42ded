"""Benchmark: segmented LoRA shrink/expand in Triton against a gather+bmm torch baseline, beside the base layer.

    python -m lora_server.kernels.bench            # Llama-7B/8B shapes on CUDA; a tiny table on a machine without it
    python -m lora_server.kernels.bench --quick    # o, qkv 8B and gate_up 8B at rank 16 only
    python -m lora_server.kernels.bench --ranks 16 --batches 1 64 --popularity distinct zipf --layers qkv \
        --dtype float16
    python -m lora_server.kernels.bench --cpu-crossover --threads 1   # CPU: runs on views against the gathered form

A row is a layer shape, one rank for every adapter and slice, an adapter popularity and a batch:
    decode:   `tokens` sequences of one token each
    prefill:  two sequences of tokens / 2 tokens each (few long segments), for tokens >= 64
Each sequence uses one adapter slot of a pool of `--pool` loaded adapters (grown to the number of sequences where
`distinct` needs more), drawn by popularity:
    distinct   every sequence a different adapter
    uniform    every sequence draws an adapter uniformly at random from the pool
    zipf       every sequence draws adapter i with probability ∝ 1 / (i + 1) (S-LoRA's power law, exponent 1.0)
    identical  every sequence the same adapter
The draws are seeded per (phase, popularity, tokens, pool), so every layer and rank of a run sees the same batch.

Times are GPU time per call (triton.testing.do_bench: median, L2 flushed before every call: in a real forward pass
each layer's adapter weights arrive cold); host launch overhead is not included. On CPU, a wall-clock median.
    triton µs      `lora_shrink_triton`, `lora_expand_triton`: the kernels under test
    gather+bmm µs  the classic baseline Punica compares against: copy every token's own A (Bᵀ) rows, padded to the
                   largest rank, into a [tokens, rank, in] ([tokens, rank, out]) tensor, then torch.bmm (adapters
                   stacked in that padded layout, scale folded into A, once at load time and not timed)
    speed-up       gather+bmm / triton, shrink + expand together
    torch µs       the plain-torch backend (`apply_lora(backend="torch")`: runs on views), shrink + expand together
    GB/s, %bw      bytes the call must move at least, per second, and that over the bandwidth of a large device copy
                   measured in the same run (one read and one write per byte):
                       shrink: A rows of each distinct adapter in the batch, once + x + y (fp32)
                       expand: Bᵀ rows of each distinct adapter in the batch, once + y (fp32) + out, read and written
    dense µs       the base layer's x @ W; lora/dense = triton shrink + expand over it
Without CUDA or Triton's interpreter there are no Triton columns: GB/s and lora/dense time the torch backend.
Before timing, every row checks that the kernels, the baseline and the torch backend compute the same LoRA term.
The last lines set rank 16, 4096 -> 4096, distinct decode at batch 1 and 64 beside Punica's published SGMV figures
(A100: 37 µs and 46 µs), and give the lowest %bw of any row with at least 64 tokens (target: 75%).
"""

import argparse
import os
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from lora_server.kernels.lora_batch import GatheredTokens, LoraBatch
from lora_server.kernels.lora_gather import lora_gathered_torch
from lora_server.kernels.lora_ops import apply_lora
from lora_server.kernels.lora_torch import lora_runs_torch
from lora_server.kernels.lora_weights import LoraWeights

# name: (in_features, output slices)
LLAMA_LAYERS = {
    "o 7B/8B": (4096, (4096,)),  # one 4096 -> 4096 projection: the shape of Punica's published SGMV figures
    "qkv 7B": (4096, (4096, 4096, 4096)),
    "qkv 8B": (4096, (4096, 1024, 1024)),
    "gate_up 7B": (4096, (11008, 11008)),
    "gate_up 8B": (4096, (14336, 14336)),
    "down 7B": (11008, (4096,)),
    "down 8B": (14336, (4096,)),
}
QUICK_LAYERS = ("o 7B/8B", "qkv 8B", "gate_up 8B")
RANKS = (8, 16, 64)
BATCHES = (1, 16, 64, 256)
# Ragged on purpose: qkv's 192 columns end inside a 128-wide column tile, its slices straddle tiles, and 704 is no
# multiple of the 128-wide K blocks of decode.
CPU_LAYERS = {"o tiny": (128, (128,)), "qkv tiny": (128, (128, 32, 32)), "down tiny": (704, (128,))}
CPU_QUICK_LAYERS = ("o tiny", "qkv tiny")
CPU_RANKS = (8, 16)
CPU_BATCHES = (1, 64)

POPULARITIES = ("distinct", "uniform", "zipf", "identical")
PHASES = ("decode", "prefill")
ZIPF_EXPONENT = 1.0
PREFILL_SEQUENCES = 2
PREFILL_MIN_TOKENS = 64
# Punica's SGMV (A100; hidden 4096, rank 16, every token a distinct adapter): µs per call by batch size.
PUNICA_RANK = 16
PUNICA_US = {1: 37.0, 64: 46.0}
BANDWIDTH_TARGET = 0.75  # of the measured copy bandwidth, at >= BANDWIDTH_TARGET_TOKENS tokens
BANDWIDTH_TARGET_TOKENS = 64


@dataclass(frozen=True)
class BenchConfig:
    layers: dict[str, tuple[int, tuple[int, ...]]]
    ranks: tuple[int, ...]
    batches: tuple[int, ...]
    popularities: tuple[str, ...]
    phases: tuple[str, ...]
    pool: int  # loaded adapters to draw from
    dtype: torch.dtype
    device: torch.device
    with_triton: bool  # time the Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1); else the torch backend
    peak_bytes: int  # size of the copy that measures the device's bandwidth
    cpu_runs: int  # timed calls per measurement on CPU (their median), after one warm-up call
    reference_layer: str  # the layer set beside Punica's figures

    def __post_init__(self) -> None:
        assert self.layers and self.ranks and self.batches and self.popularities and self.phases
        assert all(r > 0 for r in self.ranks) and all(b > 0 for b in self.batches), (self.ranks, self.batches)
        assert set(self.popularities) <= set(POPULARITIES) and set(self.phases) <= set(PHASES)
        assert self.pool > 0 and self.cpu_runs > 0


# ---------------------------------------------------------------- which adapter each token uses


def sequence_lens(phase: str, num_tokens: int) -> list[int]:
    num_sequences = num_tokens if phase == "decode" else PREFILL_SEQUENCES
    return [num_tokens // num_sequences + (i < num_tokens % num_sequences) for i in range(num_sequences)]


def pool_size_for(popularity: str, num_sequences: int, pool: int) -> int:
    return max(pool, num_sequences) if popularity == "distinct" else pool


def draw_slots(popularity: str, num_sequences: int, pool_size: int, generator: torch.Generator) -> list[int]:
    """The adapter slot of each sequence. Slot i is the i-th most popular adapter; where its rows sit is random."""
    if popularity == "distinct":
        assert num_sequences <= pool_size, (num_sequences, pool_size)
        return torch.randperm(pool_size, generator=generator)[:num_sequences].tolist()
    if popularity == "uniform":
        return torch.randint(pool_size, (num_sequences,), generator=generator).tolist()
    if popularity == "zipf":
        weights = torch.arange(1, pool_size + 1, dtype=torch.float64) ** -ZIPF_EXPONENT
        return torch.multinomial(weights, num_sequences, replacement=True, generator=generator).tolist()
    if popularity == "identical":
        return torch.randint(pool_size, (1,), generator=generator).tolist() * num_sequences
    raise ValueError(f"unknown popularity {popularity!r}")


def make_token_slots(phase: str, popularity: str, num_tokens: int, pool_size: int) -> list[int]:
    """[num_tokens] slot per token: each sequence's tokens are contiguous and share its slot."""
    seq_lens = sequence_lens(phase, num_tokens)
    # A fixed seed per batch, not Python's salted hash(): the same batch for every layer, rank and run.
    generator = torch.Generator().manual_seed(zlib.crc32(f"{phase}/{popularity}/{num_tokens}/{pool_size}".encode()))
    seq_slots = draw_slots(popularity, len(seq_lens), pool_size, generator)
    return [slot for slot, seq_len in zip(seq_slots, seq_lens, strict=True) for _ in range(seq_len)]


# ---------------------------------------------------------------- one row's tensors


@dataclass(frozen=True)
class Setup:
    """One row's tensors: a row pool of `pool_size` slots placed out of order, and the batch's metadata."""

    x: torch.Tensor  # [num_tokens, in]
    dense_w: torch.Tensor  # [in, out]
    out: torch.Tensor  # [num_tokens, out]
    batch: LoraBatch
    weights: LoraWeights  # lora_a [num_slices, pool_size * rank, in], lora_bt [pool_size * rank, out], slot tables
    # The gather+bmm baseline's own layout of the same adapters (see `stack_for_gather_bmm`).
    token_slots: torch.Tensor  # [num_tokens] int64
    a_stack: torch.Tensor  # [pool_size, num_slices * max_rank, in], scale folded in
    bt_stack: torch.Tensor  # [pool_size, max_rank, out]


def make_setup(in_features: int, slice_sizes: tuple[int, ...], rank: int, token_slots: list[int], pool_size: int,
               dtype: torch.dtype, device: torch.device) -> Setup:
    num_slices = len(slice_sizes)
    placement = torch.randperm(pool_size).tolist()  # slot i sits at the placement[i]-th block of rows
    row_starts = [p * rank for p in placement]
    ranks = [[rank] * num_slices for _ in range(pool_size)]
    scales = [[0.5] * num_slices for _ in range(pool_size)]
    slice_offsets = tuple(sum(slice_sizes[:k]) for k in range(num_slices + 1))
    out_features = slice_offsets[-1]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype) * 0.02

    weights = LoraWeights(randn(num_slices, pool_size * rank, in_features), randn(pool_size * rank, out_features),
                          slice_offsets, pool_size)
    for slot in range(pool_size):
        weights.set_slot(slot, row_starts[slot], ranks[slot], scales[slot])
    a_stack, bt_stack = stack_for_gather_bmm(weights.lora_a, weights.lora_bt, row_starts, ranks, scales,
                                             slice_offsets)
    return Setup(
        x=randn(len(token_slots), in_features),
        dense_w=randn(in_features, out_features),
        out=randn(len(token_slots), out_features),
        batch=LoraBatch.build(token_slots, device=device),
        weights=weights,
        token_slots=torch.tensor(token_slots, dtype=torch.int64, device=device),
        a_stack=a_stack,
        bt_stack=bt_stack,
    )


# ---------------------------------------------------------------- the gather+bmm baseline


def stack_for_gather_bmm(
    lora_a: torch.Tensor,
    lora_bt: torch.Tensor,
    row_starts: list[int],
    ranks: list[list[int]],
    scales: list[list[float]],
    slice_offsets: tuple[int, ...],
) -> tuple[torch.Tensor, torch.Tensor]:
    """The baseline's layout, built once at load time: one block per slot, zero past the slot's rank.

    a_stack [num_slots, num_slices * max_rank, in] (scale folded in), bt_stack [num_slots, max_rank, out].
    """
    num_slices, _, in_features = lora_a.shape
    max_rank = max(max(slot_ranks) for slot_ranks in ranks)
    a_stack = lora_a.new_zeros(len(row_starts), num_slices, max_rank, in_features)
    bt_stack = lora_bt.new_zeros(len(row_starts), max_rank, lora_bt.shape[1])
    for slot, row in enumerate(row_starts):
        for k in range(num_slices):
            rank, (lo, hi) = ranks[slot][k], slice_offsets[k : k + 2]
            a_stack[slot, k, :rank] = scales[slot][k] * lora_a[k, row : row + rank]
            bt_stack[slot, :rank, lo:hi] = lora_bt[row : row + rank, lo:hi]
    return a_stack.view(len(row_starts), num_slices * max_rank, in_features), bt_stack


def gather_bmm_shrink(
    x: torch.Tensor, a_stack: torch.Tensor, token_slots: torch.Tensor, num_slices: int
) -> torch.Tensor:
    """x [num_tokens, in] -> y [num_tokens, num_slices, max_rank] in x's dtype."""
    a = a_stack.index_select(0, token_slots)  # [num_tokens, num_slices * max_rank, in]: a copy per token
    y = torch.bmm(a, x.unsqueeze(2))  # [num_tokens, num_slices * max_rank, 1]
    return y.view(x.shape[0], num_slices, -1)


def gather_bmm_expand(y: torch.Tensor, bt_stack: torch.Tensor, out: torch.Tensor, token_slots: torch.Tensor,
                      slice_offsets: tuple[int, ...]) -> None:
    """out [num_tokens, out] += y [num_tokens, num_slices, max_rank] @ each token's own Bᵀ, slice by slice."""
    bt = bt_stack.index_select(0, token_slots)  # [num_tokens, max_rank, out]: a copy per token
    for k in range(len(slice_offsets) - 1):
        lo, hi = slice_offsets[k], slice_offsets[k + 1]
        out[:, lo:hi] += torch.bmm(y[:, k : k + 1], bt[:, :, lo:hi]).squeeze(1)  # [num_tokens, 1, n_k]


# ---------------------------------------------------------------- bytes each call must move


def adapter_slots(s: Setup) -> set[int]:
    """Each distinct adapter of the batch once, however many tokens or segments use it."""
    return {seg.slot for seg in s.batch.segments}


def y_values(s: Setup) -> int:
    return sum(seg.num_tokens * sum(s.weights.ranks[seg.slot]) for seg in s.batch.segments)


def shrink_bytes(s: Setup) -> int:
    elt = s.x.element_size()
    a_values = sum(sum(s.weights.ranks[slot]) for slot in adapter_slots(s)) * s.x.shape[1]  # every slice's rows
    x_values = sum(seg.num_tokens for seg in s.batch.segments) * s.x.shape[1]
    return (a_values + x_values) * elt + y_values(s) * 4


def expand_bytes(s: Setup) -> int:
    elt, offsets = s.out.element_size(), s.weights.slice_offsets
    bt_values = sum(
        s.weights.ranks[slot][k] * (offsets[k + 1] - offsets[k])
        for slot in adapter_slots(s)
        for k in range(len(offsets) - 1)
    )
    out_values = sum(seg.num_tokens for seg in s.batch.segments) * s.out.shape[1]
    return (bt_values + 2 * out_values) * elt + y_values(s) * 4


# ---------------------------------------------------------------- timing


def make_timer(device: torch.device, cpu_runs: int) -> Callable[[Callable[[], object]], float]:
    """fn -> seconds per call."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e-3

    def cpu_timer(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(cpu_runs):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2]

    return cpu_timer


def measure_peak_bandwidth(device: torch.device, timer: Callable, num_bytes: int) -> float:
    """Bytes per second of a large copy: one read and one write per byte."""
    src = torch.empty(num_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    seconds = timer(lambda: dst.copy_(src))
    return 2 * num_bytes / seconds


# ---------------------------------------------------------------- one row

ShrinkFn = Callable[[], torch.Tensor]  # () -> y [num_tokens, num_slices, max_rank]
ExpandFn = Callable[[torch.Tensor, torch.Tensor], None]  # (y, out): out += the LoRA term, in place


@dataclass(frozen=True)
class Row:
    layer: str
    rank: int
    popularity: str
    phase: str
    num_tokens: int
    num_adapters: int
    shrink_s: float  # the Triton kernels; NaN without them
    expand_s: float
    baseline_shrink_s: float  # gather+bmm
    baseline_expand_s: float
    torch_s: float  # the torch backend (`apply_lora`), shrink and expand together
    dense_s: float
    shrink_bytes: int
    expand_bytes: int

    @property
    def lora_s(self) -> float:
        """The LoRA term through the backend under test: Triton's kernels where they ran, else the torch backend."""
        triton_s = self.shrink_s + self.expand_s
        return self.torch_s if triton_s != triton_s else triton_s  # NaN: Triton did not run


def triton_fns(s: Setup) -> tuple[ShrinkFn, ExpandFn]:
    """(shrink() -> y, expand(y, out)) of the Triton kernels."""
    from lora_server.kernels.lora_expand import lora_expand_triton
    from lora_server.kernels.lora_shrink import lora_shrink_triton

    w = s.weights
    return (
        lambda: lora_shrink_triton(s.x, w.lora_a, s.batch, w.device_row_starts, w.device_ranks, w.device_scales,
                                   w.max_rank),
        lambda y, out: lora_expand_triton(y, w.lora_bt, out, s.batch, w.device_row_starts, w.device_ranks,
                                          w.device_slice_offsets),
    )


def torch_fn(s: Setup) -> Callable[[torch.Tensor], None]:
    """out -> None: out += the LoRA term through the torch backend, as a layer calls it."""
    return lambda out: apply_lora("torch", s.x, out, s.weights, s.batch)


def baseline_fns(s: Setup) -> tuple[ShrinkFn, ExpandFn]:
    num_slices = s.weights.num_slices
    return (
        lambda: gather_bmm_shrink(s.x, s.a_stack, s.token_slots, num_slices),
        lambda y, out: gather_bmm_expand(y, s.bt_stack, out, s.token_slots, s.weights.slice_offsets),
    )


def check_agreement(s: Setup, with_triton: bool) -> None:
    """The kernels, the baseline and the torch backend compute the same LoRA term, so that a wrong gather or slot
    table cannot pass for a speed-up. Compared on out = 0, against the torch backend."""
    candidates = {"gather+bmm": baseline_fns(s)}
    if with_triton:
        candidates["triton"] = triton_fns(s)
    expected = torch.zeros_like(s.out)
    torch_fn(s)(expected)
    expected = expected.float()
    # Half-precision rounding of y (baseline) and of out (all) stays within a few ulps of bf16: 2e-2 of the largest
    # value is far under the O(1) error of a token given another token's adapter.
    tolerance = (1e-4 if s.out.dtype == torch.float32 else 2e-2) * expected.abs().max().item()
    for name, (shrink, expand) in candidates.items():
        got = torch.zeros_like(s.out)
        expand(shrink(), got)
        error = (got.float() - expected).abs().max().item()
        if not error <= tolerance:
            raise RuntimeError(f"{name} disagrees with the torch backend: max error {error:.3g} > {tolerance:.3g}")


def bench_row(s: Setup, timer: Callable, with_triton: bool, **labels) -> Row:  # labels: Row's descriptive fields
    check_agreement(s, with_triton)
    baseline_shrink, baseline_expand = baseline_fns(s)
    baseline_y = baseline_shrink()
    shrink_s = expand_s = float("nan")
    if with_triton:
        shrink, expand = triton_fns(s)
        y = shrink()
        shrink_s, expand_s = timer(shrink), timer(lambda: expand(y, s.out))
    add_lora = torch_fn(s)
    return Row(
        **labels,
        num_adapters=len(adapter_slots(s)),
        shrink_s=shrink_s,
        expand_s=expand_s,
        baseline_shrink_s=timer(baseline_shrink),
        baseline_expand_s=timer(lambda: baseline_expand(baseline_y, s.out)),
        torch_s=timer(lambda: add_lora(s.out)),
        dense_s=timer(lambda: s.x @ s.dense_w),
        shrink_bytes=shrink_bytes(s),
        expand_bytes=expand_bytes(s),
    )


# ---------------------------------------------------------------- table


def table_columns(with_triton: bool) -> list[tuple[str, list[tuple[str, int]]]]:
    """(group title, [(column name, width)]) in print order; the first group is left-aligned text."""
    groups = [("", [("layer", 11), ("rank", 5), ("popularity", 11), ("phase", 8), ("tokens", 7), ("adapters", 9)])]
    if with_triton:
        groups.append(("triton µs", [("shrink", 9), ("expand", 9)]))
    groups += [
        ("gather+bmm µs", [("shrink", 9), ("expand", 9), ("speed-up", 9)]),
        ("torch µs", [("sh+ex", 9)]),
    ]
    if with_triton:
        groups += [("triton shrink", [("GB/s", 9), ("%bw", 6)]), ("triton expand", [("GB/s", 9), ("%bw", 6)])]
    else:
        groups.append(("torch sh+ex", [("GB/s", 9), ("%bw", 6)]))
    groups.append(("base layer", [("dense µs", 9), ("lora/dense", 11)]))
    return groups


def row_cells(r: Row, peak: float, with_triton: bool) -> list[list[str]]:
    speed_up = (r.baseline_shrink_s + r.baseline_expand_s) / r.lora_s
    cells = [[r.layer, str(r.rank), r.popularity, r.phase, str(r.num_tokens), str(r.num_adapters)]]
    if with_triton:
        cells.append([_us(r.shrink_s), _us(r.expand_s)])
    cells += [
        [_us(r.baseline_shrink_s), _us(r.baseline_expand_s), f"{speed_up:.2f}x"],
        [_us(r.torch_s)],
    ]
    if with_triton:
        for num_bytes, seconds in ((r.shrink_bytes, r.shrink_s), (r.expand_bytes, r.expand_s)):
            cells.append([f"{num_bytes / seconds / 1e9:.1f}", f"{100 * num_bytes / seconds / peak:.1f}"])
    else:
        bps = (r.shrink_bytes + r.expand_bytes) / r.torch_s
        cells.append([f"{bps / 1e9:.1f}", f"{100 * bps / peak:.1f}"])
    cells.append([_us(r.dense_s), f"{r.lora_s / r.dense_s:.2f}"])
    return cells


def render(groups: list[tuple[str, list[tuple[str, int]]]], cells: list[list[str]]) -> str:
    parts = []
    for index, ((_, columns), values) in enumerate(zip(groups, cells, strict=True)):
        align = "<" if index == 0 else ">"
        parts.append("".join(f"{value:{align}{width}}" for (_, width), value in zip(columns, values, strict=True)))
    return " |".join(parts)


def run(config: BenchConfig) -> list[Row]:
    timer = make_timer(config.device, config.cpu_runs)
    peak = measure_peak_bandwidth(config.device, timer, config.peak_bytes)
    device_name = torch.cuda.get_device_name(config.device) if config.device.type == "cuda" else "cpu"
    print(f"device: {device_name}, dtype: {config.dtype}, measured copy bandwidth: {peak / 1e9:.0f} GB/s, "
          f"adapter pool: {config.pool}")
    kernel = "triton" if config.with_triton else "torch"
    groups = table_columns(config.with_triton)
    widths = [sum(width for _, width in columns) for _, columns in groups]
    print(" |".join(title.center(width) for (title, _), width in zip(groups, widths, strict=True)))
    print(render(groups, [[name for name, _ in columns] for _, columns in groups]))
    print("-" * (sum(widths) + 2 * (len(widths) - 1)))
    rows = []
    for layer, (in_features, slice_sizes) in config.layers.items():
        for rank in config.ranks:
            for phase in config.phases:
                for num_tokens in config.batches:
                    if phase == "prefill" and num_tokens < PREFILL_MIN_TOKENS:
                        continue
                    for popularity in config.popularities:
                        pool_size = pool_size_for(popularity, len(sequence_lens(phase, num_tokens)), config.pool)
                        token_slots = make_token_slots(phase, popularity, num_tokens, pool_size)
                        s = make_setup(in_features, slice_sizes, rank, token_slots, pool_size, config.dtype,
                                       config.device)
                        row = bench_row(s, timer, config.with_triton, layer=layer, rank=rank, popularity=popularity,
                                        phase=phase, num_tokens=num_tokens)
                        print(render(groups, row_cells(row, peak, config.with_triton)), flush=True)
                        rows.append(row)
                        del s
    print_summary(rows, config, kernel, peak)
    return rows


def print_summary(rows: list[Row], config: BenchConfig, kernel: str, peak: float) -> None:
    if config.reference_layer in config.layers:
        in_features, slice_sizes = config.layers[config.reference_layer]
        shape = f"{config.reference_layer} [{in_features} -> {sum(slice_sizes)}]"
    else:
        shape = f"{config.reference_layer} (not in this run)"
    picks = {
        r.num_tokens: r
        for r in rows
        if (r.layer, r.rank, r.popularity, r.phase) == (config.reference_layer, PUNICA_RANK, "distinct", "decode")
    }
    ours = "; ".join(
        f"batch {batch}: {_us(picks[batch].lora_s) + ' µs' if batch in picks else 'not run'} (Punica {punica:.0f} µs)"
        for batch, punica in PUNICA_US.items()
    )
    print(f"vs Punica SGMV (A100, hidden 4096, rank {PUNICA_RANK}, distinct): {kernel} shrink + expand on {shape}, "
          f"rank {PUNICA_RANK}, distinct decode: {ours}")
    big = [r for r in rows if r.num_tokens >= BANDWIDTH_TARGET_TOKENS]
    if not big:
        print(f"no row with >= {BANDWIDTH_TARGET_TOKENS} tokens: no bandwidth figure against the target")
        return

    def label(r: Row) -> str:
        return f"{r.layer} rank {r.rank} {r.popularity} {r.phase} {r.num_tokens}"

    if config.with_triton:
        per_call = [(b / t, op, r) for r in big for op, b, t in (("shrink", r.shrink_bytes, r.shrink_s),
                                                                    ("expand", r.expand_bytes, r.expand_s))]
    else:  # the torch backend runs shrink and expand together
        per_call = [((r.shrink_bytes + r.expand_bytes) / r.torch_s, "sh+ex", r) for r in big]
    worst_bps, worst_op, worst = min(per_call, key=lambda item: item[0])
    together = min(big, key=lambda r: (r.shrink_bytes + r.expand_bytes) / r.lora_s)
    together_bps = (together.shrink_bytes + together.expand_bytes) / together.lora_s
    print(f"lowest % of copy bandwidth at >= {BANDWIDTH_TARGET_TOKENS} tokens ({kernel}; target "
          f"{100 * BANDWIDTH_TARGET:.0f}%): one call {100 * worst_bps / peak:.1f}% ({worst_op}, {label(worst)}); "
          f"shrink + expand together {100 * together_bps / peak:.1f}% ({label(together)})")


# ---------------------------------------------------------------- CPU: runs on views against the gathered form

CROSSOVER_HIDDEN = (1024, 4096)
CROSSOVER_RUN_LENS = (1, 2, 4, 8, 16, 32, 64)
CROSSOVER_NUM_RUNS = (4, 16, 64)
# The gathered form copies every token's adapter rows: past this many bytes of copies it is not timed (it is many
# times slower than runs long before that, and at hidden 4096 a few hundred tokens would copy gigabytes).
CROSSOVER_MAX_GATHERED_BYTES = 128 << 20


def crossover(hidden_sizes: tuple[int, ...], rank: int, dtype: torch.dtype, cpu_runs: int) -> None:
    """For the torch backend on CPU: time one qkv call as runs on views (`kernels.lora_torch`) and as one gathered
    set (`kernels.lora_gather`), for batches of `num_runs` runs of `run_len` tokens, each run a distinct adapter."""
    timer = make_timer(torch.device("cpu"), cpu_runs)
    print(f"CPU crossover: one qkv layer (hidden -> hidden + 2 × hidden/4, Llama-3's GQA ratio), rank {rank} on "
          f"every slice, {dtype}, {torch.get_num_threads()} thread(s); µs per call, median of {cpu_runs}")
    header = (f"{'hidden':>7}{'run len':>8}{'runs':>6}{'tokens':>7} |{'runs µs':>10}{'gathered µs':>12}"
              f"{'gath/runs':>10} |{'dense µs':>10}{'runs/dense':>11}{'gath/dense':>11}")
    print(header)
    print("-" * len(header))
    wins: dict[tuple[int, int], list[int]] = {}  # (hidden, num_runs) -> run lengths where gathering was faster
    for hidden in hidden_sizes:
        for num_runs in CROSSOVER_NUM_RUNS:
            for run_len in CROSSOVER_RUN_LENS:
                runs_s, gathered_s, dense_s = crossover_times(hidden, run_len, num_runs, rank, dtype, timer)
                if gathered_s < runs_s:
                    wins.setdefault((hidden, num_runs), []).append(run_len)
                print(f"{hidden:>7}{run_len:>8}{num_runs:>6}{num_runs * run_len:>7} |{_us(runs_s):>10}"
                      f"{_us(gathered_s):>12}{gathered_s / runs_s:>10.2f} |{_us(dense_s):>10}"
                      f"{runs_s / dense_s:>11.2f}{gathered_s / dense_s:>11.2f}", flush=True)
    for hidden in hidden_sizes:
        for num_runs in CROSSOVER_NUM_RUNS:
            lens = wins.get((hidden, num_runs), [])
            print(f"hidden {hidden}, {num_runs} runs: gathered faster at run lengths {lens or 'none'}")


def crossover_times(hidden: int, run_len: int, num_runs: int, rank: int, dtype: torch.dtype,
                    timer: Callable) -> tuple[float, float, float]:
    """Seconds per call: (runs on views, the gathered form or NaN past the bytes cap, the dense qkv matmul)."""
    pool_size = max(num_runs, 64)
    run_slots = torch.randperm(pool_size)[:num_runs].tolist()  # every run its own adapter
    token_slots = [slot for slot in run_slots for _ in range(run_len)]
    s = make_setup(hidden, (hidden, hidden // 4, hidden // 4), rank, token_slots, pool_size, dtype,
                   torch.device("cpu"))
    runs_s = timer(lambda: lora_runs_torch(s.x, s.out, s.weights, s.batch.segments))
    gathered_s = float("nan")
    gathered_bytes = len(token_slots) * rank * (3 * hidden + hidden + hidden // 2) * s.x.element_size()
    if gathered_bytes <= CROSSOVER_MAX_GATHERED_BYTES:
        gathered = s.batch.split_runs(run_len).gathered
        check_gathered_agrees(s, gathered)
        gathered_s = timer(lambda: lora_gathered_torch(s.x, s.out, s.weights, gathered))
    return runs_s, gathered_s, timer(lambda: s.x @ s.dense_w)


def check_gathered_agrees(s: Setup, gathered: GatheredTokens) -> None:
    """Both forms add the same term, so that a wrong gather cannot pass for a speed-up."""
    by_runs, by_gather = torch.zeros_like(s.out), torch.zeros_like(s.out)
    lora_runs_torch(s.x, by_runs, s.weights, s.batch.segments)
    lora_gathered_torch(s.x, by_gather, s.weights, gathered)
    tolerance = (1e-4 if s.out.dtype == torch.float32 else 2e-2) * by_runs.abs().max().item()
    error = (by_runs.float() - by_gather.float()).abs().max().item()
    if not error <= tolerance:
        raise RuntimeError(f"the gathered form disagrees with the run form: max error {error:.3g} > {tolerance:.3g}")


def _us(seconds: float) -> str:
    if seconds != seconds:  # NaN: not timed
        return "-"
    return f"{seconds * 1e6:.1f}" if seconds < 0.1 else f"{seconds * 1e6:.2e}"  # at most 8 characters


def _ints(values: tuple[int, ...]) -> str:
    return " ".join(map(str, values))


def select_layers(layers: dict, patterns: list[str] | None) -> dict:
    if not patterns:
        return layers
    chosen = {name: shape for name, shape in layers.items() if any(p.lower() in name.lower() for p in patterns)}
    if not chosen:
        raise SystemExit(f"--layers {' '.join(patterns)} matches none of: {', '.join(layers)}")
    return chosen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="o, qkv 8B and gate_up 8B at rank 16 only")
    parser.add_argument("--dtype", choices=("float16", "bfloat16", "float32"),
                        help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--layers", nargs="+", metavar="NAME", help="layers whose name contains any of these")
    parser.add_argument("--ranks", nargs="+", type=int,
                        help=f"default: {_ints(RANKS)} on CUDA, {_ints(CPU_RANKS)} on CPU")
    parser.add_argument(
        "--batches",
        nargs="+",
        type=int,
        metavar="TOKENS",
        help=f"tokens in a batch; default: {_ints(BATCHES)} on CUDA, {_ints(CPU_BATCHES)} on CPU",
    )
    parser.add_argument("--popularity", nargs="+", choices=POPULARITIES, default=list(POPULARITIES))
    parser.add_argument("--phases", nargs="+", choices=PHASES, default=list(PHASES))
    parser.add_argument("--pool", type=int, default=64, help="loaded adapters to draw from (default: 64)")
    parser.add_argument("--cpu-crossover", action="store_true",
                        help="instead of the table: the torch backend's run form against its gathered form, on CPU")
    parser.add_argument("--hidden", nargs="+", type=int, default=list(CROSSOVER_HIDDEN),
                        help=f"hidden sizes for --cpu-crossover (default: {_ints(CROSSOVER_HIDDEN)})")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own choice)")
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_crossover:
        crossover(tuple(args.hidden), (args.ranks or [PUNICA_RANK])[0], getattr(torch, args.dtype or "float32"),
                  cpu_runs=9)
        return

    if torch.cuda.is_available():
        device, with_triton, peak_bytes, dtype = torch.device("cuda"), True, 1 << 30, args.dtype or "bfloat16"
        cpu_runs = 1  # unused: do_bench decides
        layers, ranks, batches = LLAMA_LAYERS, RANKS, BATCHES
        quick_layers, reference_layer = QUICK_LAYERS, "o 7B/8B"
    else:
        with_triton = os.environ.get("TRITON_INTERPRET") == "1"
        device, peak_bytes, dtype = torch.device("cpu"), 1 << 26, args.dtype or "float32"
        cpu_runs = 1 if with_triton else 5  # interpreted kernels are slow, and their times mean nothing
        layers, ranks, batches = CPU_LAYERS, CPU_RANKS, CPU_BATCHES
        quick_layers, reference_layer = CPU_QUICK_LAYERS, "o tiny"
        also = "Triton kernels under the interpreter (TRITON_INTERPRET=1: they run, the times mean nothing)"
        print(f"No CUDA device: tiny CPU shapes, timing the {also if with_triton else 'torch backend'}; "
              "Punica's figures are for 4096 -> 4096 on an A100, not comparable with these.")
    if args.quick:
        layers, ranks = {name: layers[name] for name in quick_layers}, (PUNICA_RANK,)
    config = BenchConfig(
        layers=select_layers(layers, args.layers),
        ranks=tuple(args.ranks or ranks),
        batches=tuple(args.batches or batches),
        popularities=tuple(args.popularity),
        phases=tuple(args.phases),
        pool=args.pool,
        dtype=getattr(torch, dtype),
        device=device,
        with_triton=with_triton,
        peak_bytes=peak_bytes,
        cpu_runs=cpu_runs,
        reference_layer=reference_layer,
    )
    run(config)


if __name__ == "__main__":
    main()
