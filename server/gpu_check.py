"""Everything that needs a GPU, in one run that fits a short lease: `make gpu-check` (or `python -m
lora_server.gpu_check --out FILE`).

1. The tests that compile for real on CUDA: the LoRA kernels (fp32, fp16, bf16) and the paged decode and prefill
   kernels against their fp64 references, the paged cache through both attention backends against transformers,
   captured decode graphs replayed against the plain step, and the CUDA engine (graphs on) against the CPU one
   (tests/kernels, tests/model/test_paged_attention.py, tests/model/test_cuda_graphs.py, tests/e2e/test_cuda.py).
2. `python -m lora_server.kernels.bench --quick`: the LoRA kernels against the copy bandwidth.
3. `python -m lora_server.kernels.bench_attention`: the paged decode and prefill kernels against the bytes they read
   and against a gather-then-SDPA baseline.
4. `python -m lora_server.model.bench_graphs`: decode step time, plain against a replayed CUDA graph, batch 1-64.
5. `python -m lora_server.engine.bench --device cuda` at a 7B-like layer shape (hidden 4096, bf16), with the PEFT
   peer on the same GPU.

Each part has its own time limit, so one that hangs cannot take the others' share; their outputs go, with the device
named, to one Markdown file. Without CUDA it says so and exits 2.
"""

import argparse
import datetime
import importlib.metadata
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

PARTS: list[tuple[str, list[str], int]] = [  # (title, command, seconds allowed): 8 minutes in all
    ("CUDA tests", [sys.executable, "-P", "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/kernels",
                    "tests/model/test_paged_attention.py", "tests/model/test_cuda_graphs.py",
                    "tests/e2e/test_cuda.py"], 150),
    ("kernels bench (--quick)", [sys.executable, "-P", "-m", "lora_server.kernels.bench", "--quick"], 60),
    ("paged attention kernels", [sys.executable, "-P", "-m", "lora_server.kernels.bench_attention"], 45),
    ("decode step, plain vs CUDA graph", [sys.executable, "-P", "-m", "lora_server.model.bench_graphs"], 45),
    # 2 layers: the per-layer work is what is measured, and writing a deeper random checkpoint costs the lease time.
    ("engine bench, hidden 4096, bf16", [sys.executable, "-P", "-m", "lora_server.engine.bench", "--device", "cuda",
                                         "--dtype", "bfloat16", "--hidden", "4096", "--layers", "2",
                                         "--vocab", "8192", "--requests", "128", "--max-num-seqs", "64",
                                         "--rounds", "1", "--peer-requests", "32"], 180),
]


# What the parts import beyond this package: a lent machine has no package index, so a missing one is named up front.
TEST_PACKAGES = ("triton", "transformers", "peft", "safetensors", "pytest", "hypothesis")


def installed(names: tuple[str, ...]) -> str:
    """'name version' for each package, or 'name MISSING'."""
    found = []
    for name in names:
        try:
            found.append(f"{name} {importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            found.append(f"{name} MISSING")
    return ", ".join(found)


# Every part runs as `python -P -m ...`: without -P the working directory (the checkout's root) comes first on sys.path,
# and its folder `kernels/` would shadow the `kernels` package that transformers >= 5.25 imports.


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("gpu-check-results.md"), help="where the tables go")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device here; nothing to check", file=sys.stderr)
        return 2
    device = torch.cuda.get_device_name()
    lines = [f"# gpu-check, {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC", "",
             f"Device: {device}; torch {torch.__version__}, CUDA {torch.version.cuda}, Python "
             f"{platform.python_version()}.", "", f"Packages: {installed(TEST_PACKAGES)}.", ""]
    failed = []
    for title, command, seconds in PARTS:
        print(f"gpu-check: {title} ...", flush=True)
        start = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=seconds)
            output, status = done.stdout + done.stderr, f"exit {done.returncode}"
            if done.returncode:
                failed.append(title)
        except subprocess.TimeoutExpired as timeout:
            output = (timeout.stdout or b"").decode(errors="replace") + (timeout.stderr or b"").decode(errors="replace")
            status = f"stopped after {seconds} s"
            failed.append(title)
        elapsed = time.perf_counter() - start
        lines += [f"## {title} ({status}, {elapsed:.0f} s)", "", "```", output.strip()[-20000:], "```", ""]
        print(f"gpu-check: {title}: {status} in {elapsed:.0f} s", flush=True)
        args.out.write_text("\n".join(lines))  # after each part, so a lease that ends early keeps what ran
    print(f"gpu-check: results in {args.out}" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
