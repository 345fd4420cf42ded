"""The Llama-family decoder (Llama, Mistral, Qwen2), read top to bottom.

Tokens arrive as one flat batch (no padding): token t of the batch has an id, a position in its own sequence, and
an adapter slot in `lora` (or one in each of several LoRA batches, whose terms add up: see server.model.merge).
The attention backend knows which sequence each token belongs to.
"""

from collections.abc import Mapping

import torch
from torch import nn

from lora_server.model.attention import AttentionBackend
from lora_server.model.config import PACKED_MODULES, ModelConfig
from lora_server.model.lora_linear import LoraBatches, LoraLinear, SliceWeights
from lora_server.model.rope import RotaryEmbedding

# PACKED_MODULES (each Hugging Face / PEFT module name -> our packed projection and slice) is defined beside the
# shapes it implies, in server.model.config; importers of this module find it here too.


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(hidden_size), requires_grad=False)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_fp32 = x.float()  # normalise in fp32 whatever the compute dtype, like the reference
        x_fp32 = x_fp32 * torch.rsqrt(x_fp32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x_fp32.to(x.dtype)


class Attention(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.num_heads, self.num_kv_heads, self.head_dim = config.num_heads, config.num_kv_heads, config.head_dim
        self.qkv_proj = LoraLinear(config.hidden_size, (config.q_size, config.kv_size, config.kv_size), config.qkv_bias)
        self.o_proj = LoraLinear(config.q_size, (config.hidden_size,), config.o_bias)
        self.rotary = RotaryEmbedding(config.rope, config.head_dim)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend,
                lora: LoraBatches) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x, lora)  # [num_tokens, q_size + 2 * kv_size]
        q, k, v = qkv.split(self.qkv_proj.slice_sizes, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        q, k = self.rotary(positions, q, k)
        out = attention.attend(self.layer, q, k, v)  # [num_tokens, num_heads, head_dim]
        return self.o_proj(out.reshape(num_tokens, -1), lora)


class MLP(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        inter = config.intermediate_size
        self.gate_up_proj = LoraLinear(config.hidden_size, (inter, inter), config.mlp_bias)
        self.down_proj = LoraLinear(inter, (config.hidden_size,), config.mlp_bias)

    def forward(self, x: torch.Tensor, lora: LoraBatches) -> torch.Tensor:
        gate, up = self.gate_up_proj(x, lora).chunk(2, dim=-1)  # each [num_tokens, intermediate]
        return self.down_proj(nn.functional.silu(gate) * up, lora)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer: int) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend,
                lora: LoraBatches) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), positions, attention, lora)
        return x + self.mlp(self.post_attention_layernorm(x), lora)


class LlamaModel(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.embed_tokens.weight.requires_grad_(False)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.lm_head.weight.requires_grad_(False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    # no_grad, not inference_mode: torch.compile's tracer cannot take a module's buffers into an inference-mode graph
    # ("Cannot set version_counter for inference tensor"), and the weights need no autograd either way.
    @torch.no_grad()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attention: AttentionBackend,
                lora: LoraBatches = None) -> torch.Tensor:
        """input_ids, positions: [num_tokens] -> final hidden states [num_tokens, hidden]."""
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, positions, attention, lora)
        return self.norm(x)

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [num_rows, hidden] -> logits [num_rows, vocab] in fp32 (only the rows that sample, to save work)."""
        return self.lm_head(hidden).float()

    # ---------------------------------------------------------------- LoRA slots

    def lora_linears(self) -> list[LoraLinear]:
        return [m for m in self.modules() if isinstance(m, LoraLinear)]

    def set_lora_backend(self, backend: str) -> None:
        """A resolved backend name ("torch" or "triton", see kernels.lora_ops.resolve_lora_backend)."""
        for linear in self.lora_linears():
            linear.lora_backend = backend

    def allocate_lora_pool(self, total_rows: int, num_slots: int) -> None:
        weight = self.embed_tokens.weight
        for linear in self.lora_linears():
            linear.allocate_lora_pool(total_rows, num_slots, weight.dtype, weight.device)

    def load_lora_slot(self, slot: int, row_start: int, modules: Mapping[tuple[int, str], object]) -> None:
        """Load an adapter into `slot`, at rows row_start.. of every layer's pool.

        `modules` maps (layer, HF module name such as "q_proj") to anything with `lora_a` [r, in], `lora_b` [out, r]
        and `scale` (adapters_store.LoraModuleWeights); modules it leaves out get rank 0.
        """
        for layer_index, layer in enumerate(self.layers):
            for packed, slices in self.packed_slices(layer_index, modules).items():
                self.packed_linear(layer, packed).load_slot(slot, row_start, slices)

    def clear_lora_slot(self, slot: int) -> None:
        for linear in self.lora_linears():
            linear.clear_slot(slot)

    def packed_slices(self, layer_index: int, modules: Mapping[tuple[int, str], object]
                      ) -> dict[str, list[SliceWeights]]:
        """Layer `layer_index`'s share of `modules` (as in load_lora_slot): packed linear -> weights per slice."""
        by_packed: dict[str, list[SliceWeights]] = {}
        for name, (packed, k) in PACKED_MODULES.items():
            linear = self.packed_linear(self.layers[layer_index], packed)
            slices = by_packed.setdefault(packed, [None] * linear.num_slices)
            weights = modules.get((layer_index, name))
            if weights is not None:
                slices[k] = (weights.lora_a, weights.lora_b, weights.scale)
        return by_packed

    @staticmethod
    def packed_linear(layer: DecoderLayer, packed: str) -> LoraLinear:
        return getattr(layer.self_attn, packed) if packed in ("qkv_proj", "o_proj") else getattr(layer.mlp, packed)
