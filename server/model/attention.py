"""How a layer's attention reaches its KV cache.

The model only knows the `AttentionBackend` protocol: given this layer's q, k, v for every token of the flat batch,
store k and v and return the attention output. Where the cache lives (contiguous per sequence here, for offline
generation and tests; paged in the engine: server.model.paged_cache) is the backend's business, so the model file never
changes when the cache does.
"""

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F


class AttentionBackend(Protocol):
    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [num_tokens, num_heads, head_dim], k/v [num_tokens, num_kv_heads, head_dim] -> [num_tokens, num_heads,
        head_dim]. Each token attends causally to the cached and new keys of its own sequence."""
        ...


@dataclass(frozen=True)
class SequenceChunk:
    """`num_tokens` consecutive tokens of cache row `cache_row`, at positions `start_position` onwards, found at
    `token_start` in the flat batch."""

    cache_row: int
    token_start: int
    num_tokens: int
    start_position: int


def visible_keys(query_positions: torch.Tensor, key_positions: torch.Tensor,
                 sliding_window: int | None) -> torch.Tensor:
    """Bool, broadcast of the two position tensors: True where a query may see a key. A query sees keys at positions
    <= its own, and with a sliding window only keys at positions > its own - window (transformers' definition, the
    query itself included)."""
    mask = key_positions <= query_positions
    if sliding_window is not None:
        mask &= key_positions > query_positions - sliding_window
    return mask


def causal_mask(num_queries: int, start_position: int, sliding_window: int | None,
                device: torch.device) -> torch.Tensor:
    """Bool mask [num_queries, start_position + num_queries]: True where query i (at position start_position + i)
    may see key j."""
    query_positions = torch.arange(start_position, start_position + num_queries, device=device)[:, None]
    return visible_keys(query_positions, torch.arange(start_position + num_queries, device=device), sliding_window)


class ContiguousKVCache:
    """One contiguous KV row per sequence: the simple cache of offline generation (the engine pages its cache).

    k_cache/v_cache: [num_layers, num_rows, max_len, num_kv_heads, head_dim].
    """

    def __init__(self, num_layers: int, num_rows: int, max_len: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, sliding_window: int | None = None) -> None:
        shape = (num_layers, num_rows, max_len, num_kv_heads, head_dim)
        # Zeros, not empty: masked-out keys get weight 0, but 0 × a NaN left in uninitialised memory is still NaN.
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.sliding_window = sliding_window
        self.chunks: tuple[SequenceChunk, ...] = ()

    @property
    def max_len(self) -> int:
        return self.k_cache.shape[2]

    def set_batch(self, chunks: tuple[SequenceChunk, ...]) -> None:
        """Describe the next forward pass: which tokens belong to which sequence."""
        for chunk in chunks:
            assert chunk.start_position + chunk.num_tokens <= self.max_len, "sequence outgrew its cache row"
        self.chunks = chunks

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if all(chunk.num_tokens == 1 for chunk in self.chunks):
            return self._attend_decode(layer, q, k, v)
        out = torch.empty_like(q)
        for chunk in self.chunks:
            new = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
            end = chunk.start_position + chunk.num_tokens
            self.k_cache[layer, chunk.cache_row, chunk.start_position : end] = k[new]
            self.v_cache[layer, chunk.cache_row, chunk.start_position : end] = v[new]
            keys = self.k_cache[layer, chunk.cache_row, :end].transpose(0, 1)  # [num_kv_heads, end, head_dim]
            values = self.v_cache[layer, chunk.cache_row, :end].transpose(0, 1)
            queries = q[new].transpose(0, 1)  # [num_heads, num_tokens, head_dim]
            mask = causal_mask(chunk.num_tokens, chunk.start_position, self.sliding_window, q.device)
            attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, enable_gqa=True)
            out[new] = attended.transpose(0, 1)
        return out

    def _attend_decode(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """One new token per sequence: a single padded SDPA over all rows instead of a loop over sequences."""
        rows = torch.tensor([c.cache_row for c in self.chunks], device=q.device)
        positions = torch.tensor([c.start_position for c in self.chunks], device=q.device)
        self.k_cache[layer, rows, positions] = k
        self.v_cache[layer, rows, positions] = v
        key_len = int(positions.max()) + 1
        keys = self.k_cache[layer, rows, :key_len].transpose(1, 2)  # [num_seqs, num_kv_heads, key_len, head_dim]
        values = self.v_cache[layer, rows, :key_len].transpose(1, 2)
        key_positions = torch.arange(key_len, device=q.device)[None, :]
        mask = visible_keys(positions[:, None], key_positions, self.sliding_window)  # [num_seqs, key_len]
        attended = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=mask[:, None, None, :],
                                                  enable_gqa=True)  # [num_seqs, num_heads, 1, head_dim]
        return attended[:, :, 0, :]
