"""Offline engine throughput (generated tokens/s) by adapter popularity, with the ratio to base-only in the same run.

    python -m lora_server.engine.bench                    # a random 4-layer, hidden-1024 Llama; 256 requests
    python -m lora_server.engine.bench --quick            # smaller, for a smoke run
    python -m lora_server.engine.bench --device cuda --hidden 4096 --layers 8

Workloads (every request: a random prompt, a fixed number of new tokens, no EOS so all run to length):
    base only       no adapter
    one adapter     every request the same adapter
    power-law 100   100 adapters, request i picks adapter k with probability ∝ 1/(k+1)^alpha (S-LoRA's skew)
    distinct        every request its own adapter
    one, merged     the one-adapter workload with that adapter merged into the base (merged mode), timed in rounds of
                    its own: a base-only run, then the merged run, per round
Each workload runs in --rounds interleaved rounds; "vs base" is the median of its ratio to each round's base-only
run, tokens/s the median run. "MB/step" is the weights of the distinct adapters running in a step (what a step reads
beyond the base); "ideal" is the ratio to base-only that the LoRA term's FLOPs (at the base run's FLOP rate) and
bytes (at the measured copy bandwidth) allow; "overhead vs ideal" is the measured extra time over that ideal extra
time. Then the same power-law requests against HF transformers + PEFT (when installed), with equal and with S-LoRA's
varied lengths.
Each workload runs once to warm up (adapter loads into the host cache, allocator, kernels), then is timed. The
checkpoint and adapters are random and written to a temporary directory in HF and PEFT formats, so the run uses
exactly the serving path: store -> residency -> scheduler -> model runner.
"""

import argparse
import json
import random
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from lora_server.adapters_store import LORA_TARGET_MODULES, AdapterStore, full_module_name
from lora_server.adapters_store.bench import make_upload
from lora_server.engine.build import EngineOptions, base_description, open_engine
from lora_server.engine.request import EngineRequest
from lora_server.engine.sampler import SamplingParams
from lora_server.kernels.bench import make_timer, measure_peak_bandwidth
from lora_server.model.config import ModelConfig, lora_target_shapes


def write_checkpoint(out: Path, hidden: int, layers: int, vocab: int, max_len: int) -> None:
    heads, kv_heads = max(hidden // 128, 1), max(hidden // 512, 1)
    inter = int(hidden * 2.6875) // 64 * 64  # Llama's ratio, rounded
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": max_len,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": "float32"}
    g = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    tensors = {"model.embed_tokens.weight": randn(vocab, hidden), "model.norm.weight": torch.ones(hidden),
               "lm_head.weight": randn(vocab, hidden)}
    shapes = {module: (out_features, in_features)  # HF weights are [out, in]
              for module, (in_features, out_features) in lora_target_shapes(ModelConfig.from_hf(config)).items()}
    for layer in range(layers):
        tensors[f"model.layers.{layer}.input_layernorm.weight"] = torch.ones(hidden)
        tensors[f"model.layers.{layer}.post_attention_layernorm.weight"] = torch.ones(hidden)
        for module, shape in shapes.items():
            tensors[f"{full_module_name(layer, module)}.weight"] = randn(*shape)
    out.mkdir(parents=True)
    save_file(tensors, out / "model.safetensors")
    (out / "config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.save(str(out / "tokenizer.json"))


def workloads(num_requests: int, num_adapters: int, alpha: float, rng: random.Random) -> dict[str, list]:
    return {
        "base only": [None] * num_requests,
        "one adapter": ["a0"] * num_requests,
        f"power-law {num_adapters}": power_law(num_requests, num_adapters, alpha, rng),
        "distinct": [f"a{i}" for i in range(num_requests)],
    }


def power_law(num_requests: int, num_adapters: int, alpha: float, rng: random.Random) -> list[str]:
    """S-LoRA's skew: request i picks adapter k with probability ∝ 1/(k+1)^alpha."""
    weights = [1 / (k + 1) ** alpha for k in range(num_adapters)]
    return [f"a{k}" for k in rng.choices(range(num_adapters), weights, k=num_requests)]


@dataclass
class Run:
    """One timed workload: what it produced, and what it had to read and compute beyond the base model."""

    num_adapters: int
    tokens: int  # generated
    seconds: float
    steps: int
    loads: int
    lora_tokens: int  # tokens fed through the model (prompt + generated) by requests with an adapter
    distinct_bytes_per_step: float  # the weights of the distinct adapters running, averaged over steps

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds


def timed(engine, requests: list[EngineRequest], adapter_bytes: dict[str, int], warm_up: bool = True) -> Run:
    if warm_up:
        engine.generate(requests)  # adapter loads into the host cache, allocator, kernels
    else:  # a later round: bring back the device residents that other workloads evicted, as a steady server has them
        engine.generate([EngineRequest([0], SamplingParams(max_new_tokens=1), adapter_id=adapter, request_id=f"w{i}")
                         for i, adapter in enumerate(sorted({r.adapter_id for r in requests} - {None}))])
    loads_before, steps_before = engine.stats().residency.loads, engine.num_steps
    distinct_bytes: list[int] = []

    def note_running(engine) -> None:  # the adapters of the sequences running now: what the next step reads
        keys = {seq.adapter_key for seq in engine.scheduler.running if seq.adapter_key is not None}
        distinct_bytes.append(sum(adapter_bytes[key.adapter_id] for key in keys))

    if engine.model.embed_tokens.weight.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    results = engine.generate(requests, on_step=note_running)
    if engine.model.embed_tokens.weight.is_cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    lora_tokens = sum(len(r.prompt_token_ids) + len(c.token_ids)
                      for r, c in zip(requests, results, strict=True) if r.adapter_id is not None)
    return Run(len({r.adapter_id for r in requests} - {None}), sum(len(c.token_ids) for c in results), seconds,
               engine.num_steps - steps_before, engine.stats().residency.loads - loads_before, lora_tokens,
               sum(distinct_bytes) / max(len(distinct_bytes), 1))


def median_run(runs: list[Run]) -> Run:
    return sorted(runs, key=lambda run: run.seconds)[len(runs) // 2]


def ideal_extra_seconds(run: Run, base: Run, base_tokens_fed: int, base_flops_per_token: float,
                        adapter_flops_per_token: float, copy_bytes_per_second: float) -> float:
    """What the LoRA term needs at measured rates: its FLOPs at the base run's own FLOP rate, or its distinct
    adapters' bytes (read once per step) at the device's measured copy bandwidth, whichever is more (a roofline)."""
    if run.lora_tokens == 0:
        return 0.0
    flop_rate = base_flops_per_token * base_tokens_fed / base.seconds
    compute = adapter_flops_per_token * run.lora_tokens / flop_rate
    reading = run.distinct_bytes_per_step * run.steps / copy_bytes_per_second
    return max(compute, reading)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lora-backend", default="auto")
    parser.add_argument("--dtype", default="auto", help="the engine's compute dtype (auto: the checkpoint's, fp32)")
    parser.add_argument("--compile", action="store_true", help="decode steps through torch.compile")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--max-num-seqs", type=int, default=64)
    parser.add_argument("--adapters", type=int, default=100, help="adapters in the power-law workload")
    parser.add_argument("--alpha", type=float, default=1.0, help="power-law exponent")
    parser.add_argument("--peer-requests", type=int, default=64,
                        help="requests of the transformers + PEFT comparison (0: skip it)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="timed runs of each workload, interleaved; ratios are the median of each round's")
    parser.add_argument("--quick", action="store_true", help="hidden 256, 2 layers, 64 requests")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.requests, args.max_num_seqs, args.peer_requests = 256, 2, 64, 32, 16
    torch.manual_seed(0)
    rng = random.Random(0)

    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        model_dir = Path(tmp) / "model"
        max_len = max(args.prompt_len + args.new_tokens, VARIED_PROMPT[1] + VARIED_OUTPUT[1]) + 16
        write_checkpoint(model_dir, args.hidden, args.layers, args.vocab, max_len)
        base = base_description(model_dir)
        store = AdapterStore.open(Path(tmp) / "store", base)
        num_adapters = max(args.adapters, args.requests)
        adapter_dirs: dict[str, Path] = {}
        for k in range(num_adapters):
            upload = make_upload(base, args.rank, LORA_TARGET_MODULES, seed=k)
            store.put("default", f"a{k}", upload)
            if k < args.adapters:  # the peer row loads the power-law workload's adapters from PEFT directories
                adapter_dirs[f"a{k}"] = Path(tmp) / "peft" / f"a{k}"
                adapter_dirs[f"a{k}"].mkdir(parents=True)
                for file_name, data in upload.items():
                    (adapter_dirs[f"a{k}"] / file_name).write_bytes(data)
        adapter_bytes = {f"a{k}": store.get("default", f"a{k}").num_bytes for k in range(num_adapters)}
        options = EngineOptions(device=args.device, dtype=args.dtype, lora_backend=args.lora_backend,
                                compile=args.compile, max_num_seqs=args.max_num_seqs,
                                max_num_batched_tokens=max(2048, args.max_num_seqs),
                                max_adapters_on_device=args.max_num_seqs, max_lora_rank=args.rank,
                                adapter_host_bytes=8 << 30, merge_policy="manual")
        engine = open_engine(model_dir, store, options)
        prompts = [[rng.randrange(args.vocab) for _ in range(args.prompt_len)] for _ in range(args.requests)]
        sampling = SamplingParams(max_new_tokens=args.new_tokens)

        def requests_for(adapters: list[str | None]) -> list[EngineRequest]:
            return [EngineRequest(p, sampling, adapter_id=a, request_id=str(i))
                    for i, (p, a) in enumerate(zip(prompts, adapters, strict=True))]

        # FLOPs per token: 2 per weight of the decoder's linears and the LM head; an adapter's: 2 per A and B weight.
        base_weight_bytes = sum(p.numel() * p.element_size() for n, p in engine.model.named_parameters()
                                if p.dim() == 2 and "embed_tokens" not in n)
        base_flops_per_token = 2 * sum(p.numel() for n, p in engine.model.named_parameters()
                                       if p.dim() == 2 and "embed_tokens" not in n)
        adapter_flops_per_token = 2 * adapter_bytes["a0"] / 4  # make_upload writes fp32
        # On the device an adapter's rows are in the model's dtype: what a step reads.
        itemsize = engine.model.embed_tokens.weight.element_size()
        adapter_bytes = {name: size * itemsize // 4 for name, size in adapter_bytes.items()}
        device = engine.model.embed_tokens.weight.device
        copy_bytes_per_second = measure_peak_bandwidth(device, make_timer(device, cpu_runs=5), 256 << 20)

        print(f"engine throughput: {args.device}, hidden {args.hidden}, {args.layers} layers, rank {args.rank}, "
              f"{args.requests} requests x ({args.prompt_len} prompt + {args.new_tokens} new) tokens, "
              f"{args.max_num_seqs} sequences at once, LoRA backend {engine.model.lora_linears()[0].lora_backend}, "
              f"{torch.get_num_threads()} threads; one adapter = {adapter_bytes['a0'] / 1e6:.2f} MB, base weights "
              f"{base_weight_bytes / 1e6:.1f} MB, copy bandwidth {copy_bytes_per_second / 1e9:.1f} GB/s")
        print(f"{'workload':<16} {'adapters':>9} {'tokens/s':>10} {'vs base':>8} {'steps':>6} {'loads':>6} "
              f"{'MB/step':>8} {'ideal':>7} {'overhead vs ideal':>18}")
        runs = list(workloads(args.requests, args.adapters, args.alpha, rng).items())
        # Why rounds, and the median of each round's ratio to that round's base-only run: on a shared machine the
        # speed drifts by 20% or more over minutes (one base-only run read 698 tokens/s, another 866), so a workload
        # is compared with a base run minutes apart only by luck; adjacent runs in one round share the conditions.
        rounds: dict[str, list[Run]] = {name: [] for name, _ in runs}
        for round_number in range(args.rounds):
            for name, adapters in runs:
                rounds[name].append(timed(engine, requests_for(adapters), adapter_bytes,
                                          warm_up=round_number == 0))
        # Merged mode (a0 folded into the base weights) in rounds of its own, each a base-only run then a merged one:
        # inside the rounds above it ran right after the distinct workload's adapter loads and read 0.87-0.90 of
        # base-only, while measured this way it reads 1.0 (server/engine/BENCHMARKS.md).
        merged_name, merged_bases = "one, merged", []
        rounds[merged_name] = []
        for round_number in range(args.rounds):
            merged_bases.append(timed(engine, requests_for([None] * args.requests), adapter_bytes, warm_up=False))
            engine.merge_and_wait("a0")
            rounds[merged_name].append(timed(engine, requests_for(["a0"] * args.requests), adapter_bytes,
                                             warm_up=round_number == 0))
            engine.merge.request_unmerge("default", "a0")
            engine.step()
        runs.append((merged_name, ["a0"] * args.requests))
        bases = {name: merged_bases if name == merged_name else rounds["base only"] for name in rounds}
        ratios = {name: statistics.median(run.rate / base.rate for run, base in zip(done, bases[name], strict=True))
                  for name, done in rounds.items()}
        base_run = median_run(rounds["base only"])
        for name, _ in runs:
            run = median_run(rounds[name])
            if name == merged_name:  # merged requests run no LoRA term
                run.lora_tokens, run.distinct_bytes_per_step = 0, 0.0
            base_tokens_fed = sum(len(p) for p in prompts) + base_run.tokens
            extra = ideal_extra_seconds(run, base_run, base_tokens_fed, base_flops_per_token,
                                        adapter_flops_per_token, copy_bytes_per_second)
            ideal_ratio = base_run.seconds / (base_run.seconds + extra)
            overhead = f"{(run.seconds - base_run.seconds) / extra:>17.1f}x" if extra else f"{'':>18}"
            print(f"{name:<16} {run.num_adapters:>9} {run.rate:>10.1f} {ratios[name]:>8.3f} "
                  f"{run.steps:>6} {run.loads:>6} {run.distinct_bytes_per_step / 1e6:>8.1f} {ideal_ratio:>7.3f} "
                  f"{overhead}")
        if args.peer_requests:
            peer_rows(engine, model_dir, adapter_dirs, adapter_bytes, args, rng)
        engine.close()
        store.close()


VARIED_PROMPT, VARIED_OUTPUT = (8, 128), (16, 128)  # S-LoRA's synthetic workload's ranges


def peer_rows(engine, model_dir: Path, adapter_dirs: dict[str, Path], adapter_bytes: dict[str, int], args,
              rng: random.Random) -> None:
    """Ours against HF transformers + PEFT (mixed-batch `adapter_names`, static batches of 16) on the same requests:
    the power-law workload with equal lengths, and with S-LoRA's varied lengths."""
    try:
        from lora_server.engine.bench_peer import PeerRequest, peft_tokens_per_second
    except ImportError:
        print("(transformers + PEFT comparison skipped: install the test extra)")
        return
    n = args.peer_requests
    adapters = power_law(n, args.adapters, args.alpha, rng)
    shapes = {"equal lengths": [(args.prompt_len, args.new_tokens)] * n,
              "varied lengths": [(rng.randint(*VARIED_PROMPT), rng.randint(*VARIED_OUTPUT)) for _ in range(n)]}
    print(f"\nvs HF transformers + PEFT, power-law {args.adapters} (alpha {args.alpha}), {n} requests, greedy; "
          f"PEFT: mixed-batch adapter_names, static batches of 16")
    print(f"{'lengths':<16} {'ours tok/s':>11} {'PEFT tok/s':>11} {'ours / PEFT':>12}")
    for label, lengths in shapes.items():
        prompts = [[rng.randrange(args.vocab) for _ in range(p)] for p, _ in lengths]
        ours = [EngineRequest(prompt, SamplingParams(max_new_tokens=new), adapter_id=a, request_id=f"peer{i}")
                for i, (prompt, (_, new), a) in enumerate(zip(prompts, lengths, adapters, strict=True))]
        run = timed(engine, ours, adapter_bytes)
        peft_rate = peft_tokens_per_second(model_dir, adapter_dirs, [
            PeerRequest(prompt, a, new) for prompt, (_, new), a in zip(prompts, lengths, adapters, strict=True)],
            device=engine.model.embed_tokens.weight.device, dtype=engine.model.embed_tokens.weight.dtype)
        print(f"{label:<16} {run.rate:>11.1f} {peft_rate:>11.1f} {run.rate / peft_rate:>11.2f}x")


if __name__ == "__main__":
    main()
