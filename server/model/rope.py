"""Rotary position embeddings, with the `linear` and `llama3` frequency rescalings Hugging Face defines."""

import math

import torch

from lora_server.model.config import RopeConfig


def rope_inverse_frequencies(rope: RopeConfig, head_dim: int) -> torch.Tensor:
    """inv_freq [head_dim // 2] fp32, as transformers computes it for each rope type."""
    inv_freq = 1.0 / (rope.theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    if rope.rope_type == "linear":
        return inv_freq / rope.factor
    if rope.rope_type == "llama3":
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated smoothly.
        low_freq_wavelen = rope.original_max_position_embeddings / rope.low_freq_factor
        high_freq_wavelen = rope.original_max_position_embeddings / rope.high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / rope.factor, inv_freq)
        smooth = (rope.original_max_position_embeddings / wavelen - rope.low_freq_factor) / (
            rope.high_freq_factor - rope.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
        is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
        return torch.where(is_medium, smoothed, scaled)
    return inv_freq


class RotaryEmbedding(torch.nn.Module):
    """Rotates q and k by their token's position (the rotate-half layout of HF checkpoints)."""

    def __init__(self, rope: RopeConfig, head_dim: int) -> None:
        super().__init__()
        self.rope = rope
        self.head_dim = head_dim
        # Not persistent: recomputed by `reset_parameters`, never read from a checkpoint.
        self.register_buffer("inv_freq", rope_inverse_frequencies(rope, head_dim), persistent=False)

    def reset_parameters(self) -> None:
        """Recompute inv_freq after the module was built on the meta device and moved with `to_empty`."""
        self.inv_freq.copy_(rope_inverse_frequencies(self.rope, self.head_dim).to(self.inv_freq.device))

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # positions: [num_tokens]; q: [num_tokens, num_heads, head_dim]; k: [num_tokens, num_kv_heads, head_dim]
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [num_tokens, head_dim // 2], fp32
        angles = torch.cat((freqs, freqs), dim=-1)[:, None, :]  # [num_tokens, 1, head_dim]
        cos, sin = angles.cos(), angles.sin()
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x_fp32 = x.float()  # rotate in fp32, as transformers does, then return to the compute dtype
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x_fp32[..., half:], x_fp32[..., :half]), dim=-1)
    return (x_fp32 * cos + rotated_half * sin).to(x.dtype)
