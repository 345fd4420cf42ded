"""The decode forward as one compiled graph: what `--compile` runs for steps where every sequence feeds one token.

It is one graph (fullgraph: a graph break is an error, not a silent slowdown) because everything data-dependent is
built on the host before the forward (PagedKVCache.set_batch, LoraBatch.build) and the LoRA term and the Triton
paged decode are custom ops the compiler does not trace into. Shapes are dynamic from the first call, so a new batch
size, mix of adapters or context length reuses the graph instead of recompiling. Steps with prefill chunks stay
eager: their per-chunk loop would specialise on each chunk's length.
"""

from collections.abc import Callable

import torch
import torch.fx.experimental._config as fx_config

from lora_server.model.attention import AttentionBackend
from lora_server.model.llama import LlamaModel
from lora_server.model.lora_linear import LoraBatches

DecodeForward = Callable[[torch.Tensor, torch.Tensor, AttentionBackend, LoraBatches], torch.Tensor]


def compile_decode_forward(model: LlamaModel, backend: str | Callable = "inductor") -> DecodeForward:
    """model.forward compiled for decode steps; call it exactly as model.forward."""
    compiled = torch.compile(model.forward, backend=backend, fullgraph=True, dynamic=True)

    def forward(input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend,
                lora: LoraBatches = None) -> torch.Tensor:
        # Duck sizing off: with it, two sizes that happen to be equal in the first step (3 LoRA runs and the table's
        # 3 rows, say) are assumed equal forever, and the next step that breaks the coincidence recompiles.
        with fx_config.patch(use_duck_shape=False):
            return compiled(input_ids, positions, attention, lora)

    return forward
