"""A tiny random model, random adapters, a fake adapter source, and a read-back of what a slot holds on the device."""

import threading
from collections import Counter

import torch

from lora_server.adapters_store import LoraAdapter, LoraModuleWeights
from lora_server.engine.adapters.keys import AdapterKey
from lora_server.engine.build import describe_base_model
from lora_server.model.config import ModelConfig
from lora_server.model.llama import PACKED_MODULES, LlamaModel

TINY = ModelConfig(architecture="LlamaForCausalLM", vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2,
                   num_heads=4, num_kv_heads=2, head_dim=8, max_position_embeddings=64, rms_norm_eps=1e-5)
PAGE = 8


def tiny_model(seed: int = 0) -> LlamaModel:
    model = LlamaModel(TINY)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    return model


def random_adapter(rank: int, seed: int, module_ranks: dict[str, int] | None = None) -> LoraAdapter:
    """Every module of every layer, rank `rank` unless `module_ranks` says otherwise; fresh random A and B."""
    generator = torch.Generator().manual_seed(seed)
    shapes = describe_base_model(TINY).module_shapes
    modules = {}
    for layer in range(TINY.num_layers):
        for name, (in_features, out_features) in shapes.items():
            r = (module_ranks or {}).get(name, rank)
            modules[(layer, name)] = LoraModuleWeights(lora_a=torch.randn(r, in_features, generator=generator),
                                                       lora_b=torch.randn(out_features, r, generator=generator),
                                                       scale=0.5 + seed % 7)
    return LoraAdapter(modules=modules, config={"r": rank})


def rows_for(rank: int) -> int:
    return -(-rank // PAGE) * PAGE


def page_budget(model: LlamaModel, num_pages: int) -> int:
    """The device budget in bytes that holds exactly `num_pages` pages of rows."""
    bytes_per_row = sum((m.num_slices * m.in_features + m.out_features) * 4 for m in model.lora_linears())
    return num_pages * PAGE * bytes_per_row


def slot_rows(model: LlamaModel, slot: int) -> tuple[int, int]:
    """(row_start, max rank) the model's slot tables give `slot` (the same in every layer)."""
    linear = model.lora_linears()[0]
    return linear.slot_row_starts[slot], max(max(m.slot_ranks[slot]) for m in model.lora_linears())


def slot_matches(model: LlamaModel, slot: int, adapter: LoraAdapter) -> bool:
    """Whether every layer's pool, read through the slot tables, holds exactly this adapter (no more, no less)."""
    for layer_index, layer in enumerate(model.layers):
        for name, (packed, k) in PACKED_MODULES.items():
            linear = model.packed_linear(layer, packed)
            weights = adapter.modules.get((layer_index, name))
            row, rank = linear.slot_row_starts[slot], linear.slot_ranks[slot][k]
            if weights is None:
                if rank != 0:
                    return False
                continue
            lo, hi = linear.slice_offsets[k], linear.slice_offsets[k + 1]
            if rank != weights.rank or linear.slot_scales[slot][k] != weights.scale:
                return False
            if not torch.equal(linear.lora_a[k, row : row + rank], weights.lora_a):
                return False
            if not torch.equal(linear.lora_bt[row : row + rank, lo:hi], weights.lora_b.T):
                return False
    return True


class FakeSource:
    """Adapters by key, counting reads; a key may be gated (its read blocks until the gate opens) or made to fail."""

    def __init__(self, adapters: dict[AdapterKey, LoraAdapter] | None = None, delay_s: float = 0.0) -> None:
        self.adapters = dict(adapters or {})
        self.delay_s = delay_s
        self.reads: Counter[AdapterKey] = Counter()
        self.gates: dict[AdapterKey, threading.Event] = {}
        self.reading: dict[AdapterKey, threading.Event] = {}  # set once a read of the key has started
        self.failures: dict[AdapterKey, Exception] = {}
        self._lock = threading.Lock()

    def gate(self, key: AdapterKey) -> threading.Event:
        self.gates[key] = threading.Event()
        self.reading[key] = threading.Event()
        return self.gates[key]

    def read(self, key: AdapterKey) -> LoraAdapter:
        with self._lock:
            self.reads[key] += 1
        if key in self.reading:
            self.reading[key].set()
        if key in self.gates:
            assert self.gates[key].wait(timeout=10), f"gate of {key} never opened"
        if self.delay_s:
            threading.Event().wait(self.delay_s)
        if key in self.failures:
            raise self.failures[key]
        return self.adapters[key]
