"""Decode step time, plain against replayed from a CUDA graph (server.model.cuda_graphs), per batch size.

    python -m lora_server.model.bench_graphs --device cuda              # a 7B-like layer shape, bf16
    python -m lora_server.model.bench_graphs --device cpu --quick       # the same code path, uncaptured

A step here is what the model runner does for a batch of decodes: the host tables (PagedKVCache.set_batch and
LoraBatch.build, or the graph's buffer fill) and the forward, timed to the device's completion. Every sequence has
`--context` tokens in the cache and an adapter drawn from `--adapters` loaded ones (rank `--rank`), a quarter of the
rows base-only. On CPU nothing is captured: the "graph" column is the padded static step run eagerly, which shows
what the padding costs, not what a replay saves.
"""

import argparse
import random
import time
from functools import partial
from types import SimpleNamespace

import torch

from lora_server.kernels.lora_batch import NO_SLOT, LoraBatch
from lora_server.kernels.lora_ops import resolve_lora_backend
from lora_server.model.config import PACKED_MODULES, ModelConfig
from lora_server.model.cuda_graphs import DecodeGraphs
from lora_server.model.llama import LlamaModel
from lora_server.model.paged_cache import PagedKVCache, PagedSequenceChunk


def random_model(args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> LlamaModel:
    head_dim = 128 if args.hidden >= 1024 else 16
    config = ModelConfig(architecture="LlamaForCausalLM", vocab_size=args.vocab, hidden_size=args.hidden,
                         intermediate_size=args.hidden * 11 // 4, num_layers=args.layers,
                         num_heads=args.hidden // head_dim, num_kv_heads=max(1, args.hidden // head_dim // 4),
                         head_dim=head_dim, max_position_embeddings=4096, rms_norm_eps=1e-5)
    with torch.device(device):
        model = LlamaModel(config)
    generator = torch.Generator(device).manual_seed(0)
    for param in model.parameters():
        param.data.normal_(0.0, 0.02, generator=generator)
    model.to(dtype)
    model.set_lora_backend(resolve_lora_backend("auto", device))
    model.allocate_lora_pool(total_rows=args.adapters * args.rank, num_slots=args.adapters)
    linears = {name: model.packed_linear(model.layers[0], packed) for name, (packed, _) in PACKED_MODULES.items()}
    for slot in range(args.adapters):
        modules = {}
        for layer in range(config.num_layers):
            for name, linear in linears.items():
                out_features = linear.slice_sizes[PACKED_MODULES[name][1]]
                modules[layer, name] = SimpleNamespace(
                    lora_a=torch.randn(args.rank, linear.in_features, generator=generator, device=device) * 0.01,
                    lora_b=torch.randn(out_features, args.rank, generator=generator, device=device) * 0.01,
                    scale=2.0)
        model.load_lora_slot(slot, slot * args.rank, modules)
    return model


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, device: torch.device, repeats: int) -> float:
    """Median seconds of `step()`, after two warm-up calls."""
    for _ in range(2):
        step()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def plain_step(model: LlamaModel, cache: PagedKVCache, chunks: list[PagedSequenceChunk], ids: list[int],
               slots: list[int]) -> None:
    """What the model runner does for a decode step without graphs: the step's tables, then the forward."""
    cache.set_batch(chunks)
    positions = [chunk.start_position for chunk in chunks]
    inputs = torch.tensor([ids, positions]).to(cache.device, non_blocking=True)
    model(inputs[0], inputs[1], cache, LoraBatch.build(slots, cache.device))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default=None, help="default: bfloat16 on CUDA, float32 on CPU")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--adapters", type=int, default=16)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--context", type=int, default=256)
    parser.add_argument("--batches", default="1,2,4,8,16,32,64")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="a tiny model and two batch sizes (a smoke run)")
    args = parser.parse_args()
    if args.quick:
        args.hidden, args.layers, args.vocab, args.adapters, args.rank = 64, 2, 128, 4, 8
        args.context, args.batches, args.repeats = 24, "1,4", 3
    device = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    batch_sizes = [int(b) for b in args.batches.split(",")]
    model = random_model(args, device, dtype)
    config = model.config
    block_size = 16
    blocks_per_seq = -(-(args.context + args.repeats + 8) // block_size)
    num_blocks = max(batch_sizes) * blocks_per_seq
    cache = PagedKVCache(config.num_layers, num_blocks, block_size, config.num_kv_heads, config.head_dim, dtype,
                         device)
    graphs = DecodeGraphs(model, cache, max(batch_sizes), blocks_per_seq, args.rank, capture=device.type == "cuda",
                          num_lora_batches=(1,))
    rng = random.Random(0)
    print(f"# decode step, {config.num_layers} layers of hidden {config.hidden_size}, {dtype}, on "
          f"{torch.cuda.get_device_name(device) if device.type == 'cuda' else 'CPU'}; context {args.context}, "
          f"{args.adapters} adapters of rank {args.rank}, attention {cache.attention_backend}, "
          f"LoRA {model.lora_linears()[0].lora_backend}; graphs {'captured' if graphs.captured else 'uncaptured'}")
    print("| batch | plain ms | graph ms | plain / graph |\n|---:|---:|---:|---:|")
    for batch in batch_sizes:
        # K/V left as the random cache holds them (the step's cost does not depend on their values).
        chunks = [PagedSequenceChunk(i, 1, args.context, list(range(i * blocks_per_seq, (i + 1) * blocks_per_seq)))
                  for i in range(batch)]
        slots = sorted(NO_SLOT if rng.random() < 0.25 else rng.randrange(args.adapters) for _ in range(batch))
        ids = [rng.randrange(config.vocab_size) for _ in range(batch)]
        plain = time_steps(partial(plain_step, model, cache, chunks, ids, slots), device, args.repeats)
        graph = time_steps(partial(graphs.run, ids, chunks, [slots]), device, args.repeats)
        print(f"| {batch} | {plain * 1e3:.2f} | {graph * 1e3:.2f} | {plain / graph:.2f}× |")


if __name__ == "__main__":
    main()
