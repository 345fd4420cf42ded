"""Offline engine throughput (generated tokens/s) by adapter popularity, with the ratio to base-only in the same run.

    python -m server.engine.bench                    # a random 4-layer, hidden-1024 Llama; 256 requests
    python -m server.engine.bench --quick            # smaller, for a smoke run
    python -m server.engine.bench --device cuda --hidden 4096 --layers 8

Workloads (every request: a random prompt, a fixed number of new tokens, no EOS so all run to length):
    base only       no adapter
    one adapter     every request the same adapter
    power-law 100   100 adapters, request i picks adapter k with probability ∝ 1/(k+1)^alpha (S-LoRA's skew)
    distinct        every request its own adapter
    one, merged     the one-adapter workload again with that adapter merged into the base (merged mode)
Each workload runs once to warm up (adapter loads into the host cache, allocator, kernels), then is timed. The
checkpoint and adapters are random and written to a temporary directory in HF and PEFT formats, so the run uses
exactly the serving path: store -> residency -> scheduler -> model runner.
"""

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from adapters_store import LORA_TARGET_MODULES, AdapterStore, full_module_name
from adapters_store.bench import make_upload
from server.engine.build import EngineOptions, base_description, open_engine
from server.engine.request import EngineRequest
from server.engine.sampler import SamplingParams
from server.model.config import ModelConfig, lora_target_shapes


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
    weights = [1 / (k + 1) ** alpha for k in range(num_adapters)]
    return {
        "base only": [None] * num_requests,
        "one adapter": ["a0"] * num_requests,
        f"power-law {num_adapters}": [f"a{k}" for k in rng.choices(range(num_adapters), weights, k=num_requests)],
        "distinct": [f"a{i}" for i in range(num_requests)],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lora-backend", default="auto")
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
    parser.add_argument("--quick", action="store_true", help="hidden 256, 2 layers, 64 requests")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.requests, args.max_num_seqs = 256, 2, 64, 32
    torch.manual_seed(0)
    rng = random.Random(0)

    with tempfile.TemporaryDirectory(prefix="engine-bench-") as tmp:
        model_dir = Path(tmp) / "model"
        write_checkpoint(model_dir, args.hidden, args.layers, args.vocab, args.prompt_len + args.new_tokens + 16)
        base = base_description(model_dir)
        store = AdapterStore.open(Path(tmp) / "store", base)
        num_adapters = max(args.adapters, args.requests)
        for k in range(num_adapters):
            store.put("default", f"a{k}", make_upload(base, args.rank, LORA_TARGET_MODULES, seed=k))
        options = EngineOptions(device=args.device, lora_backend=args.lora_backend, max_num_seqs=args.max_num_seqs,
                                max_num_batched_tokens=max(2048, args.max_num_seqs),
                                max_adapters_on_device=args.max_num_seqs, max_lora_rank=args.rank,
                                adapter_host_bytes=8 << 30, merge_policy="manual")
        engine = open_engine(model_dir, store, options)
        prompts = [[rng.randrange(args.vocab) for _ in range(args.prompt_len)] for _ in range(args.requests)]
        sampling = SamplingParams(max_new_tokens=args.new_tokens)

        print(f"engine throughput: {args.device}, hidden {args.hidden}, {args.layers} layers, rank {args.rank}, "
              f"{args.requests} requests x ({args.prompt_len} prompt + {args.new_tokens} new) tokens, "
              f"{args.max_num_seqs} sequences at once, LoRA backend {engine.model.lora_linears()[0].lora_backend}")
        print(f"{'workload':<16} {'adapters':>9} {'tokens/s':>10} {'vs base':>8} {'steps':>6} {'loads':>6}")
        base_rate = None
        runs = list(workloads(args.requests, args.adapters, args.alpha, rng).items())
        runs.append(("one, merged", ["a0"] * args.requests))  # merged mode: a0 folded into the base weights
        for name, adapters in runs:
            if name == "one, merged":
                engine.merge_and_wait("a0")
            requests = [EngineRequest(p, sampling, adapter_id=a, request_id=str(i))
                        for i, (p, a) in enumerate(zip(prompts, adapters, strict=True))]
            engine.generate(requests)  # warm-up
            loads_before, steps_before = engine.stats().residency.loads, engine.num_steps
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            start = time.perf_counter()
            results = engine.generate(requests)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            rate = sum(len(r.token_ids) for r in results) / seconds
            base_rate = base_rate or rate
            stats = engine.stats()
            print(f"{name:<16} {len(set(adapters) - {None}):>9} {rate:>10.1f} {rate / base_rate:>8.3f} "
                  f"{engine.num_steps - steps_before:>6} {stats.residency.loads - loads_before:>6}")
        engine.close()
        store.close()


if __name__ == "__main__":
    main()
