"""Benchmark: segmented LoRA shrink/expand, Triton vs the plain-torch path, beside the base layer's dense matmul.

    python -m kernels.bench            # Llama-7B/8B shapes on CUDA; a tiny torch-path table on a machine without it
    python -m kernels.bench --quick    # Llama-3-8B qkv and gate_up, rank 16 only

Times are GPU time per call (CUDA events, median, L2 flushed before every call: in a real forward pass each layer's
adapter weights arrive cold). Host launch overhead is not included. GB/s counts the bytes a call must move at least:
    shrink: the A rows of every slot in the batch + x + y (fp32)
    expand: the Bᵀ rows of every slot in the batch + y (fp32) + out, read and written
    dense:  W + x + out
and "% peak" divides by the bandwidth of a 1 GiB device-to-device copy measured in the same run.
Decode: every token its own adapter (one token per segment). Prefill: two adapters, half the tokens each.
"""

import argparse
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from kernels.lora_batch import LoraBatch
from kernels.lora_torch import lora_expand_torch, lora_shrink_torch, max_active_rank

# name: (in_features, output slices)
LLAMA_LAYERS = {
    "qkv 7B": (4096, (4096, 4096, 4096)),
    "qkv 8B": (4096, (4096, 1024, 1024)),
    "gate_up 7B": (4096, (11008, 11008)),
    "gate_up 8B": (4096, (14336, 14336)),
    "down 7B": (11008, (4096,)),
    "down 8B": (14336, (4096,)),
}
RANKS = (8, 16, 64)
CASES = (("decode", 1), ("decode", 16), ("decode", 64), ("decode", 256), ("prefill", 64), ("prefill", 256))
CPU_LAYERS = {"qkv tiny": (256, (256, 64, 64)), "down tiny": (704, (256,))}


@dataclass(frozen=True)
class Setup:
    """One benchmark row's tensors: a row pool with one slot per segment, placed out of order."""

    x: torch.Tensor
    lora_a: torch.Tensor
    lora_bt: torch.Tensor
    dense_w: torch.Tensor
    out: torch.Tensor
    batch: LoraBatch
    row_starts: list[int]
    ranks: list[list[int]]
    scales: list[list[float]]
    slice_offsets: tuple[int, ...]
    tables: dict[str, torch.Tensor]


def make_setup(in_features: int, slice_sizes: tuple[int, ...], rank: int, mode: str, num_tokens: int,
               dtype: torch.dtype, device: torch.device) -> Setup:  # fmt: skip
    if mode == "decode":
        token_slots = list(range(num_tokens))
    else:
        token_slots = [0] * (num_tokens // 2) + [1] * (num_tokens - num_tokens // 2)
    num_slots, num_slices = max(token_slots) + 1, len(slice_sizes)
    placement = torch.randperm(num_slots).tolist()  # slot i sits at the placement[i]-th block of rows
    row_starts = [p * rank for p in placement]
    ranks = [[rank] * num_slices for _ in range(num_slots)]
    scales = [[0.5] * num_slices for _ in range(num_slots)]
    slice_offsets = tuple(sum(slice_sizes[:k]) for k in range(num_slices + 1))
    out_features = slice_offsets[-1]

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=device, dtype=dtype) * 0.02

    return Setup(
        x=randn(num_tokens, in_features),
        lora_a=randn(num_slices, num_slots * rank, in_features),
        lora_bt=randn(num_slots * rank, out_features),
        dense_w=randn(in_features, out_features),
        out=randn(num_tokens, out_features),
        batch=LoraBatch.build(token_slots, device=device),
        row_starts=row_starts,
        ranks=ranks,
        scales=scales,
        slice_offsets=slice_offsets,
        tables=dict(
            slot_row_starts=torch.tensor(row_starts, dtype=torch.int32, device=device),
            slot_ranks=torch.tensor(ranks, dtype=torch.int32, device=device),
            slot_scales=torch.tensor(scales, dtype=torch.float32, device=device),
            slice_offsets=torch.tensor(slice_offsets, dtype=torch.int32, device=device),
        ),
    )


# ---------------------------------------------------------------- bytes each call must move


def shrink_bytes(s: Setup) -> int:
    elt = s.x.element_size()
    a_rows = sum(sum(s.ranks[seg.slot]) for seg in s.batch.segments)  # every slice's rows, once per slot
    y_values = sum(seg.num_tokens * sum(s.ranks[seg.slot]) for seg in s.batch.segments)
    return a_rows * s.x.shape[1] * elt + s.x.numel() * elt + y_values * 4


def expand_bytes(s: Setup) -> int:
    elt = s.out.element_size()
    bt_values = sum(
        s.ranks[seg.slot][k] * (s.slice_offsets[k + 1] - s.slice_offsets[k])
        for seg in s.batch.segments
        for k in range(len(s.slice_offsets) - 1)
    )
    y_values = sum(seg.num_tokens * sum(s.ranks[seg.slot]) for seg in s.batch.segments)
    lora_tokens = sum(seg.num_tokens for seg in s.batch.segments)
    return bt_values * elt + y_values * 4 + 2 * lora_tokens * s.out.shape[1] * elt


def dense_bytes(s: Setup) -> int:
    return (s.dense_w.numel() + s.x.numel() + s.out.numel()) * s.x.element_size()


# ---------------------------------------------------------------- timing


def make_timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """fn -> seconds per call."""
    if device.type == "cuda":
        import triton.testing

        return lambda fn: triton.testing.do_bench(fn, warmup=10, rep=50, return_mode="median") * 1e-3

    def cpu_timer(fn: Callable[[], object]) -> float:
        fn()
        times = []
        for _ in range(5):
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


# ---------------------------------------------------------------- table


def run(layers: dict, ranks: tuple[int, ...], cases: tuple, dtype: torch.dtype, device: torch.device,
        with_triton: bool, peak_bytes: int) -> None:  # fmt: skip
    timer = make_timer(device)
    peak = measure_peak_bandwidth(device, timer, peak_bytes)
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}, dtype: {dtype}, "
          f"measured peak (copy): {peak / 1e9:.0f} GB/s")  # fmt: skip
    if with_triton:
        from kernels.lora_expand import lora_expand_triton
        from kernels.lora_shrink import lora_shrink_triton

    header = (f"{'layer':<11}{'rank':>5} {'mode':<8}{'tokens':>7}{'segs':>5} |{'shrink µs':>10}{'torch':>9} |"
              f"{'expand µs':>10}{'torch':>9} |{'dense µs':>9}{'lora/dense':>11} |"
              f"{'shrink GB/s':>12}{'%peak':>6} |{'expand GB/s':>12}{'%peak':>6}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for layer, (in_features, slice_sizes) in layers.items():
        for rank in ranks:
            for mode, num_tokens in cases:
                s = make_setup(in_features, slice_sizes, rank, mode, num_tokens, dtype, device)
                max_rank = max_active_rank(s.batch, s.ranks)
                t = s.tables

                def torch_shrink(s=s):
                    return lora_shrink_torch(s.x, s.lora_a, s.batch, s.row_starts, s.ranks, s.scales)

                y = torch_shrink()
                shrink_torch = timer(torch_shrink)
                expand_torch = timer(lambda s=s, y=y: lora_expand_torch(y, s.lora_bt, s.out, s.batch, s.row_starts,
                                                                        s.ranks, s.slice_offsets))  # fmt: skip
                dense = timer(lambda s=s: s.x @ s.dense_w)
                shrink_tr = expand_tr = float("nan")
                if with_triton:
                    shrink_tr = timer(lambda s=s, t=t, r=max_rank: lora_shrink_triton(
                        s.x, s.lora_a, s.batch, t["slot_row_starts"], t["slot_ranks"], t["slot_scales"], r))
                    expand_tr = timer(lambda s=s, t=t, y=y: lora_expand_triton(
                        y, s.lora_bt, s.out, s.batch, t["slot_row_starts"], t["slot_ranks"], t["slice_offsets"]))
                # The LoRA term's cost next to the base layer it rides on: best backend, shrink + expand.
                best = min(shrink_tr + expand_tr, shrink_torch + expand_torch) if with_triton else (
                    shrink_torch + expand_torch)  # fmt: skip
                shrink_time = shrink_tr if with_triton else shrink_torch
                expand_time = expand_tr if with_triton else expand_torch
                shrink_gbs = shrink_bytes(s) / shrink_time
                expand_gbs = expand_bytes(s) / expand_time
                print(f"{layer:<11}{rank:>5} {mode:<8}{num_tokens:>7}{len(s.batch.segments):>5} |"
                      f"{_us(shrink_tr):>10}{_us(shrink_torch):>9} |{_us(expand_tr):>10}{_us(expand_torch):>9} |"
                      f"{_us(dense):>9}{best / dense:>11.2f} |"
                      f"{shrink_gbs / 1e9:>12.1f}{100 * shrink_gbs / peak:>6.1f} |"
                      f"{expand_gbs / 1e9:>12.1f}{100 * expand_gbs / peak:>6.1f}")  # fmt: skip
                del s, y
    if with_triton:
        print("GB/s columns: Triton kernels.")
    else:
        print("GB/s columns: torch path (no Triton timings here).")


def _us(seconds: float) -> str:
    return "-" if seconds != seconds else f"{seconds * 1e6:.1f}"  # NaN: not timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Llama-3-8B qkv and gate_up at rank 16 only")
    parser.add_argument("--dtype", choices=("float16", "bfloat16"), default="bfloat16")
    args = parser.parse_args()
    torch.manual_seed(0)
    if torch.cuda.is_available():
        layers = {k: LLAMA_LAYERS[k] for k in ("qkv 8B", "gate_up 8B")} if args.quick else LLAMA_LAYERS
        run(layers, (16,) if args.quick else RANKS, CASES, getattr(torch, args.dtype), torch.device("cuda"),
            with_triton=True, peak_bytes=1 << 30)  # fmt: skip
        return
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    also = " and of the Triton kernels under the interpreter (TRITON_INTERPRET=1: not a measurement)"
    print("No CUDA device: Triton timings need a GPU. Below, a tiny CPU table of the torch path"
          f"{also if interpreted else ''}.")  # fmt: skip
    run(CPU_LAYERS, (8, 16), (("decode", 1), ("decode", 8), ("prefill", 16)), torch.float32, torch.device("cpu"),
        with_triton=interpreted, peak_bytes=1 << 26)  # fmt: skip


if __name__ == "__main__":
    main()
