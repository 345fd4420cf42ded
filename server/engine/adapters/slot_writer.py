"""The one residency module that touches tensors: checks an adapter against the model, copies it into a slot's rows.

Runs on the loader thread while the step loop runs forward passes. That is safe because the rows and slot written
belong to an adapter no batch uses yet (or, for `clear`, any more), and because the copies go on the loader thread's
current stream, which is the device's default stream, the same one the step loop issues its kernels on: the device
orders a copy after any earlier kernel that might still read the rows' previous owner. `write` waits for its copies
before returning, so an adapter is only marked ready once its weights are really there.
"""

from collections.abc import Mapping

import torch

from lora_server.adapters_store import LoraAdapter, LoraModuleWeights
from lora_server.model.config import lora_target_shapes
from lora_server.model.llama import LlamaModel


class SlotWriter:
    def __init__(self, model: LlamaModel) -> None:
        self.model = model
        self.device = model.embed_tokens.weight.device
        self._module_shapes = lora_target_shapes(model.config)  # HF module name -> (in_features, out_features)

    @property
    def bytes_per_row(self) -> int:
        """Device bytes of one pool row in every LoRA layer: lora_a [num_slices, row, in] + lora_bt [row, out]."""
        element_size = self.model.embed_tokens.weight.element_size()  # the pool's dtype (see allocate_lora_pool)
        return sum((linear.num_slices * linear.in_features + linear.out_features) * element_size
                   for linear in self.model.lora_linears())

    def allocate_pool(self, total_rows: int, num_slots: int) -> None:
        self.model.allocate_lora_pool(total_rows, num_slots)

    def validate(self, adapter: LoraAdapter) -> None:
        """Raise ValueError, naming the module, if the adapter does not fit this model."""
        check_modules(adapter.modules, self.model.config.num_layers, self._module_shapes)

    def write(self, slot: int, row_start: int, adapter: LoraAdapter) -> None:
        self.model.load_lora_slot(slot, row_start, adapter.modules)
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).synchronize()

    def clear(self, slot: int) -> None:
        self.model.clear_lora_slot(slot)


def check_modules(modules: Mapping[tuple[int, str], LoraModuleWeights], num_layers: int,
                  shapes: Mapping[str, tuple[int, int]]) -> None:
    for (layer, name), weights in modules.items():
        where = f"layer {layer} {name}"
        if not 0 <= layer < num_layers:
            raise ValueError(f"{where}: the model has {num_layers} layers")
        if name not in shapes:
            raise ValueError(f"{where}: not a LoRA target of this model (targets: {', '.join(shapes)})")
        in_features, out_features = shapes[name]
        a, b = weights.lora_a, weights.lora_b
        rank = a.shape[0]
        if tuple(a.shape) != (rank, in_features) or tuple(b.shape) != (out_features, rank):
            raise ValueError(f"{where}: lora_a {tuple(a.shape)} and lora_b {tuple(b.shape)} do not fit the model's "
                             f"[rank, {in_features}] and [{out_features}, rank]")
