"""Benchmark: the adapter store at N registered adapters, and cold loads against file size.

    python -m lora_server.adapters_store.bench                      # 10,000 adapters over 100 tenants; ranks 4..256
    python -m lora_server.adapters_store.bench --num 1000 --ranks 8 64 --layers 2

Part 1, the registry. N puts of small adapters (rank 4, q_proj and v_proj of a 2-layer, hidden-64 base), each with
full validation, through `AdapterStore.put`; the N adapters share `--contents` distinct contents, so most puts take
the dedupe path (the blob is already there, and only re-hashed) and the registry commit dominates. Then:
    put/s             puts per second, validation, blob writes and registry commit included
    get µs            `get(tenant, adapter_id)` for random adapters: the lookup per request (p50 / p99)
    get v1 µs         `get(tenant, adapter_id, version=1)`
    list µs           `list_adapters(tenant)` for a tenant with N / tenants adapters
    reopen ms         `AdapterStore.open` of the full store: recovery verifies every blob's checksum

Part 2, cold loads. One all-linear fp16 adapter per rank on a Llama-7B-shaped base (hidden 4096, intermediate 11008)
cut to `--layers` layers, so the files stay small enough for a quick run (the full 32 layers are 8x larger):
    MB                adapter_model.safetensors
    put ms            validation (our header check, safetensors, NaN/Inf scan) + durable blob writes + commit
    load ms           `read(record)`: read both blobs, verify their sha256, parse into tensors; best of 3, page cache
                      warm (a truly cold disk adds its own read time)
    read+verify ms    of that, reading and hashing the files; MB/s for load and for read+verify
"""

import argparse
import json
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors

from lora_server.adapters_store.base_model import LORA_TARGET_MODULES, BaseModelDescription, full_module_name
from lora_server.adapters_store.limits import StoreLimits
from lora_server.adapters_store.peft_adapter import WEIGHTS_FILE
from lora_server.adapters_store.peft_config import CONFIG_FILE
from lora_server.adapters_store.registry import AdapterVersion
from lora_server.adapters_store.store import AdapterStore

SMALL_BASE = BaseModelDescription(num_layers=2, module_shapes={m: (64, 64) for m in LORA_TARGET_MODULES},
                                  name="bench-small")
LLAMA_7B_SHAPES = {"q_proj": (4096, 4096), "k_proj": (4096, 4096), "v_proj": (4096, 4096), "o_proj": (4096, 4096),
                   "gate_proj": (4096, 11008), "up_proj": (4096, 11008), "down_proj": (11008, 4096)}


def make_upload(base: BaseModelDescription, rank: int, modules: tuple[str, ...], seed: int,
                dtype: torch.dtype = torch.float32) -> dict[str, bytes]:
    """A PEFT-layout adapter with random weights, written without PEFT (this package never imports it)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(base.num_layers):
        for module in modules:
            in_features, out_features = base.module_shapes[module]
            prefix = f"base_model.model.{full_module_name(layer, module)}"
            tensors[f"{prefix}.lora_A.weight"] = (torch.randn(rank, in_features, generator=generator) * 0.01).to(dtype)
            tensors[f"{prefix}.lora_B.weight"] = (torch.randn(out_features, rank, generator=generator) * 0.01).to(dtype)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(modules),
              "bias": "none", "task_type": "CAUSAL_LM"}
    return {CONFIG_FILE: json.dumps(config).encode(), WEIGHTS_FILE: save_safetensors(tensors)}


def micros(call: Callable[[], object], repeats: int) -> tuple[float, float]:
    """p50 and p99 of one call, in µs."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        call()
        times.append((time.perf_counter_ns() - start) / 1e3)
    times.sort()
    return statistics.median(times), times[min(len(times) - 1, int(len(times) * 0.99))]


def bench_registry(root: Path, num: int, tenants: int, contents: int) -> None:
    uploads = [make_upload(SMALL_BASE, 4, ("q_proj", "v_proj"), seed) for seed in range(contents)]
    keys = [(f"tenant-{i % tenants}", f"adapter-{i}") for i in range(num)]
    with AdapterStore.open(root, SMALL_BASE) as store:
        start = time.perf_counter()
        for i, (tenant, adapter_id) in enumerate(keys):
            store.put(tenant, adapter_id, uploads[i % contents])
        put_seconds = time.perf_counter() - start
        rng = random.Random(0)
        get = micros(lambda: store.get(*rng.choice(keys)), repeats=min(10_000, 10 * num))
        get_v1 = micros(lambda: store.get(*rng.choice(keys), version=1), repeats=min(10_000, 10 * num))
        listed = micros(lambda: store.list_adapters(f"tenant-{rng.randrange(tenants)}"), repeats=200)
        num_blobs = len(list((root / "blobs").glob("*/*")))
    start = time.perf_counter()
    AdapterStore.open(root, SMALL_BASE).close()
    reopen_ms = (time.perf_counter() - start) * 1e3

    print(f"Registry: {num} adapters over {tenants} tenants, {contents} distinct contents ({num_blobs} blobs)")
    print(f"{'put/s':>8} {'ms/put':>7} | {'get µs p50':>10} {'p99':>7} | {'get v1 µs p50':>13} {'p99':>7} | "
          f"{'list µs p50':>11} {'p99':>7} {'(ids)':>6} | {'reopen ms':>9}")
    print(f"{num / put_seconds:8.0f} {put_seconds / num * 1e3:7.2f} | {get[0]:10.1f} {get[1]:7.1f} | "
          f"{get_v1[0]:13.1f} {get_v1[1]:7.1f} | {listed[0]:11.0f} {listed[1]:7.0f} {num // tenants:6d} | "
          f"{reopen_ms:9.0f}")


def bench_cold_load(root: Path, ranks: list[int], layers: int) -> None:
    base = BaseModelDescription(num_layers=layers, module_shapes=LLAMA_7B_SHAPES, name="llama-7b-shaped")
    print(f"\nCold load: all-linear fp16 adapters on a Llama-7B-shaped base cut to {layers} layers")
    print(f"{'rank':>5} {'MB':>8} | {'put ms':>8} | {'load ms':>8} {'MB/s':>7} | {'read+verify ms':>14} {'MB/s':>7}")
    with AdapterStore.open(root, base) as store:
        for rank in ranks:
            files = make_upload(base, rank, LORA_TARGET_MODULES, seed=rank, dtype=torch.float16)
            megabytes = len(files[WEIGHTS_FILE]) / 1e6
            start = time.perf_counter()
            record = store.put("bench", f"rank-{rank}", files)
            put_ms = (time.perf_counter() - start) * 1e3
            del files
            record = store.get("bench", f"rank-{rank}")
            load_ms = min(timed_ms(store.read, record) for _ in range(3))
            verify_ms = min(timed_ms(store.read_files, record) for _ in range(3))
            print(f"{rank:5d} {megabytes:8.1f} | {put_ms:8.0f} | {load_ms:8.0f} {megabytes / load_ms * 1e3:7.0f} | "
                  f"{verify_ms:14.0f} {megabytes / verify_ms * 1e3:7.0f}", flush=True)
            store.delete("bench", f"rank-{rank}")


def timed_ms(call: Callable[[AdapterVersion], object], record: AdapterVersion) -> float:
    start = time.perf_counter()
    call(record)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num", type=int, default=10_000, help="adapters to register (default: 10000)")
    parser.add_argument("--tenants", type=int, default=100, help="tenants they belong to (default: 100)")
    parser.add_argument("--contents", type=int, default=16, help="distinct adapter contents (default: 16)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[4, 16, 64, 256], help="cold-load ranks")
    parser.add_argument("--layers", type=int, default=4, help="layers of the Llama-7B-shaped base (default: 4)")
    parser.add_argument("--root", type=Path, help="store directory (default: a temporary one, removed after)")
    args = parser.parse_args()
    assert StoreLimits().max_rank >= max(args.ranks), "ranks over the default limit would be refused"
    with tempfile.TemporaryDirectory(prefix="adapters-bench-") as scratch:
        root = args.root or Path(scratch)
        torch.set_num_threads(1)  # what a loader thread gets while the engine uses the rest
        bench_registry(root / "registry", args.num, args.tenants, args.contents)
        bench_cold_load(root / "cold", args.ranks, args.layers)


if __name__ == "__main__":
    main()
