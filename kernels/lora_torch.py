"""Plain-torch LoRA on runs: the CPU path. Each run's rows of x and out are views; nothing is gathered or scattered.

Semantics (a run of slot s is rows t0:t1; R = the slot's largest rank in this layer, a = row_start[s]; per slice k
with r = rank[s][k] > 0 and columns lo:hi; weights and slot tables as in `kernels.lora_weights`):
    y[k]                = x[t0:t1] @ lora_a[k, a : a + R]ᵀ                       one bmm for all slices   (fp32)
    out[t0:t1, lo:hi]  += scale[s][k] · y[k][:, :r] @ lora_bt[a : a + r, lo:hi]  one addmm_ per slice, in place
Slices that share x (q/k/v, gate/up) share the first line: [S, T, in] (x expanded, not copied) x [S, in, R]. A slice
of rank r < R reads only y's first r columns (the others are the slot's rows of other slices' ranks, or unused rows of
its own, and are never added). fp16/bf16 layers compute y and each slice's product in fp32 and round into out once.
"""

from collections.abc import Sequence

import torch

from lora_server.kernels.lora_batch import LoraSegment
from lora_server.kernels.lora_weights import LoraWeights


def lora_runs_torch(x: torch.Tensor, out: torch.Tensor, weights: LoraWeights, segments: Sequence[LoraSegment]) -> None:
    """out [num_tokens, out_features] += the LoRA term of x [num_tokens, in] on every run of `segments`, in place.

    On CPU the runs are computed on one thread. Why: a run's matmuls are a few microseconds of work (rank 16), and
    handing each to the intra-op pool first wakes its sleeping threads: in an engine step (power-law over 100
    adapters, hidden 1024, 2 threads) a one-token run's bmm took ~95 µs on two threads against ~7 µs on one, and the
    workload went from 0.54 to ~0.8 of base-only throughput (server/engine/BENCHMARKS.md). A long prefill run loses
    little by it: its LoRA FLOPs are ~5% of the base layer's at rank 16."""
    num_threads = torch.get_num_threads()
    if num_threads == 1 or x.device.type != "cpu":
        _add_runs(x, out, weights, segments)
        return
    torch.set_num_threads(1)
    try:
        _add_runs(x, out, weights, segments)
    finally:
        torch.set_num_threads(num_threads)


def _add_runs(x: torch.Tensor, out: torch.Tensor, weights: LoraWeights, segments: Sequence[LoraSegment]) -> None:
    # fp32 layers add straight into out; fp16/bf16 ones compute the term in fp32 and round it into out once.
    in_place = out.dtype == torch.float32
    offsets = weights.slice_offsets
    num_slices = len(offsets) - 1
    out_slices = [out[:, offsets[k] : offsets[k + 1]] for k in range(num_slices)]  # [num_tokens, n_k] views
    for seg in segments:
        plan = weights.plan(seg.slot)
        if not plan.terms:  # the slot skips this layer
            continue
        t0, t1 = seg.token_start, seg.token_end
        x_run = x[t0:t1] if in_place else x[t0:t1].float()  # [T, in]
        # bmm over x expanded (stride 0, no copy): measured ~8% faster per run than torch.matmul's broadcast.
        a = plan.a if in_place else plan.a.float()  # [S, in, R]
        ys = torch.bmm(x_run.expand(num_slices, -1, -1), a).unbind(0)  # num_slices × [T, R] fp32
        for term in plan.terms:
            y = ys[term.slice_id] if term.rank == plan.max_rank else ys[term.slice_id][:, : term.rank]  # [T, r]
            if in_place:
                out_slices[term.slice_id][t0:t1].addmm_(y, term.bt, alpha=term.scale)
            else:
                out_slices[term.slice_id][t0:t1].add_(y @ term.bt.float(), alpha=term.scale)
