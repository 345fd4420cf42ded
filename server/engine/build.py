"""Build a ready Engine from a checkpoint directory, an adapter store and a handful of options (`open_engine`), and
describe a checkpoint's base model for the store (`base_description`).

Sizing, in order: the model loads (and is quantized if asked); the LoRA pool takes its device budget; the KV cache
takes `kv_cache_bytes` (default: enough for every admitted sequence at the model's full length, capped at a quarter
of free device memory on CUDA and at 1 GiB on CPU), and the maximum sequence length shrinks to what that cache holds.
"""

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from lora_server.adapters_store import AdapterStore, BaseModelDescription
from lora_server.engine.adapters.catalog import AdapterCatalog
from lora_server.engine.adapters.residency import Residency, ResidencyConfig
from lora_server.engine.adapters.slot_writer import SlotWriter
from lora_server.engine.engine import Engine
from lora_server.engine.merging.control import MERGE_MODES, MergeControl
from lora_server.engine.merging.policy import MergePolicyConfig
from lora_server.engine.model_runner import ModelRunner
from lora_server.engine.scheduling.scheduler import SchedulerConfig
from lora_server.kernels.lora_ops import resolve_lora_backend
from lora_server.model.config import ModelConfig, lora_target_shapes
from lora_server.model.cuda_graphs import CUDA_GRAPH_SETTINGS, DecodeGraphs, resolve_cuda_graphs
from lora_server.model.llama import LlamaModel
from lora_server.model.loader import load_model, read_config, resolve_device, resolve_dtype
from lora_server.model.paged_cache import PagedKVCache
from lora_server.model.tokenizer import Tokenizer, load_tokenizer

logger = logging.getLogger(__name__)

CPU_KV_CACHE_CAP_BYTES = 1 << 30


@dataclass(frozen=True)
class EngineOptions:
    device: str = "auto"  # auto, cpu, cuda, cuda:N
    dtype: str = "auto"
    quantize: str = "none"  # none | nf4
    lora_backend: str = "auto"  # auto | triton | torch
    attention_backend: str = "auto"  # auto | triton | torch: see server.model.paged_cache.PagedKVCache
    compile: bool = False  # decode steps through torch.compile (server.model.compiled); a first step takes minutes
    cuda_graphs: str = "auto"  # auto (on exactly on CUDA) | on | off: decode steps replayed (server.model.cuda_graphs)
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    prefill_chunk_size: int | None = None
    block_size: int = 16
    kv_cache_bytes: int | None = None  # None: see the module docstring
    max_model_len: int | None = None  # None: the model's own maximum (or what the KV cache holds, if less)
    max_overtakes: int = 8
    max_adapters_on_device: int = 32  # LoRA slots: distinct adapters one batch can mix
    adapter_device_bytes: int | None = None  # None: room for every slot at rank max_lora_rank
    max_lora_rank: int = 64
    adapter_host_bytes: int = 2 << 30
    merge_policy: str = "off"  # off | manual | auto
    merge_window_steps: int = 64
    merge_share: float = 0.9
    unmerge_share: float = 0.6
    merge_min_steps_between_switches: int = 128
    merge_budget_bytes: int | None = None  # device bytes for an NF4 base's merged dense copies; None: no cap

    def __post_init__(self) -> None:
        if self.quantize not in ("none", "nf4"):
            raise ValueError(f"quantize must be none or nf4, got {self.quantize!r}")
        if self.cuda_graphs not in CUDA_GRAPH_SETTINGS:
            raise ValueError(f"cuda_graphs must be one of {', '.join(CUDA_GRAPH_SETTINGS)}, got {self.cuda_graphs!r}")
        if self.merge_policy not in MERGE_MODES:
            raise ValueError(f"merge_policy must be one of {', '.join(MERGE_MODES)}, got {self.merge_policy!r}")

    @property
    def merge_policy_config(self) -> MergePolicyConfig:
        return MergePolicyConfig(window_steps=self.merge_window_steps, merge_share=self.merge_share,
                                 unmerge_share=self.unmerge_share,
                                 min_steps_between_switches=self.merge_min_steps_between_switches)


class LoadedEngine(Engine):
    """An Engine with what its callers need to know about the model it serves."""

    def __init__(self, runner: ModelRunner, config: SchedulerConfig, tokenizer: Tokenizer, model: LlamaModel,
                 catalog: AdapterCatalog | None, residency: Residency | None, merge: MergeControl | None,
                 store: AdapterStore | None, model_name: str) -> None:
        super().__init__(runner, config, tokenizer, model.config.vocab_size, catalog, residency, merge)
        self.model = model
        self.store = store  # owned by the caller, who opened it
        self.model_name = model_name
        self.max_model_len = config.max_model_len
        self.base = describe_base_model(model.config, name=model_name)

    def close(self) -> None:
        """Unmerge, stop the adapter loader thread (the store stays open)."""
        if self.merge is not None:
            self.merge.close()
        if self.residency is not None:
            self.residency.close()


def open_engine(model_dir: Path, store: AdapterStore | None, options: EngineOptions,
                model_name: str | None = None) -> LoadedEngine:
    """`store`, when given, must have been opened with `base_description(model_dir)`; None serves the base only."""
    device = resolve_device(options.device)
    use_cuda_graphs = resolve_cuda_graphs(options.cuda_graphs, device)  # refused before the model loads
    config = read_config(model_dir)
    model = load_model(model_dir, device, resolve_dtype(options.dtype, device, config.checkpoint_dtype))
    model.set_lora_backend(resolve_lora_backend(options.lora_backend, device))
    if options.quantize == "nf4":
        from lora_server.model.nf4 import quantize_nf4_  # bitsandbytes is imported only when asked for

        dense, nf4 = quantize_nf4_(model)
        logger.info("NF4: decoder linear weights %.2f MB -> %.2f MB", dense / 1e6, nf4 / 1e6)
    tokenizer = load_tokenizer(model_dir, model.config.eos_token_ids)

    catalog = residency = merge = None
    if store is not None:
        catalog = AdapterCatalog(store)
        residency = Residency(model, catalog, _residency_config(model, options))
        merge = MergeControl(model, residency, options.merge_policy, options.merge_policy_config,
                             options.merge_budget_bytes)
    kv_cache, scheduler_config = _kv_cache_and_limits(model, device, options)
    decode_graphs = None
    if use_cuda_graphs:  # captured now, before the adapter loader or the step loop touch the device
        started = time.perf_counter()
        num_lora_batches = [0]  # base-only steps
        if merge is not None:
            num_lora_batches.append(1)  # adapters' own terms
            if options.merge_policy != "off":
                num_lora_batches.append(2)  # and a merged adapter's compensation
        decode_graphs = DecodeGraphs(model, kv_cache, scheduler_config.max_num_seqs,
                                     -(-scheduler_config.max_model_len // scheduler_config.block_size),
                                     options.max_lora_rank, capture=True, num_lora_batches=num_lora_batches)
        logger.info("CUDA graphs: %d decode batch sizes captured in %.1f s", len(decode_graphs.buckets),
                    time.perf_counter() - started)
    runner = ModelRunner(model, kv_cache, lora_slot_lists=merge.slot_lists if merge else None,
                         compile_decode=options.compile, decode_graphs=decode_graphs)

    engine = LoadedEngine(runner, scheduler_config, tokenizer, model, catalog, residency, merge, store,
                          model_name or Path(model_dir).name)
    logger.info("engine ready: %s on %s, %d KV blocks of %d tokens, max length %d, %d sequences at once",
                engine.model_name, device, scheduler_config.num_blocks, scheduler_config.block_size,
                scheduler_config.max_model_len, scheduler_config.max_num_seqs)
    return engine


def base_description(model_dir: Path, model_name: str | None = None) -> BaseModelDescription:
    """What the store validates adapters against, from the checkpoint's config alone (no weights loaded)."""
    return describe_base_model(read_config(model_dir), name=model_name or Path(model_dir).name)


def describe_base_model(config: ModelConfig, name: str = "") -> BaseModelDescription:
    """The base model as plain data, which is all adapters_store may know about it."""
    return BaseModelDescription(num_layers=config.num_layers, module_shapes=lora_target_shapes(config), name=name)


def _residency_config(model: LlamaModel, options: EngineOptions) -> ResidencyConfig:
    device_bytes = options.adapter_device_bytes
    if device_bytes is None:
        device_bytes = SlotWriter(model).bytes_per_row * options.max_lora_rank * options.max_adapters_on_device
    return ResidencyConfig(device_budget_bytes=device_bytes, host_budget_bytes=options.adapter_host_bytes,
                           num_slots=options.max_adapters_on_device)


def _kv_cache_and_limits(model: LlamaModel, device: torch.device,
                         options: EngineOptions) -> tuple[PagedKVCache, SchedulerConfig]:
    config, block = model.config, options.block_size
    dtype = model.embed_tokens.weight.dtype
    bytes_per_token = 2 * config.num_layers * config.num_kv_heads * config.head_dim * dtype.itemsize
    max_len = min(options.max_model_len or config.max_position_embeddings, config.max_position_embeddings)
    budget = options.kv_cache_bytes
    if budget is None:
        # Every admitted sequence at full length, and the cache's scratch block (see PagedKVCache).
        wanted = (options.max_num_seqs * max_len + block) * bytes_per_token
        if device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(device)
            budget = min(wanted, free // 4)
        else:
            budget = min(wanted, CPU_KV_CACHE_CAP_BYTES)
    num_blocks = budget // (block * bytes_per_token) - 1  # the cache adds its scratch block (PagedKVCache)
    if num_blocks < 2:
        raise ValueError(f"a KV cache of {budget} bytes holds fewer than 3 blocks of {block} tokens, two for "
                         f"sequences and one scratch ({bytes_per_token} bytes per token)")
    max_len = min(max_len, num_blocks * block)
    kv_cache = PagedKVCache(config.num_layers, num_blocks, block, config.num_kv_heads, config.head_dim, dtype,
                            device, config.sliding_window, attention_backend=options.attention_backend)
    scheduler_config = SchedulerConfig(num_blocks=num_blocks, max_model_len=max_len, block_size=block,
                                       max_num_batched_tokens=max(options.max_num_batched_tokens, options.max_num_seqs),
                                       max_num_seqs=options.max_num_seqs, max_overtakes=options.max_overtakes,
                                       prefill_chunk_size=options.prefill_chunk_size)
    return kv_cache, scheduler_config
