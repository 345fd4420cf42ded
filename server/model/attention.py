"""How a layer's attention reaches its KV cache.

The model only knows the `AttentionBackend` protocol: given this layer's q, k, v for every token of the flat batch,
store k and v and return the attention output. Where the cache lives (contiguous per sequence here; paged in the
engine) is the backend's business, so the model file never changes when the cache does.
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


def causal_mask(num_queries: int, start_position: int, sliding_window: int | None,
                device: torch.device) -> torch.Tensor:
    """Bool mask [num_queries, start_position + num_queries]: True where query i may see key j.

    Query i sits at position start_position + i; it sees keys j <= its position, and with a sliding window only
    keys with position > its position - window (transformers' definition, the query itself included)."""
    query_positions = torch.arange(start_position, start_position + num_queries, device=device)[:, None]
    key_positions = torch.arange(start_position + num_queries, device=device)[None, :]
    mask = key_positions <= query_positions
    if sliding_window is not None:
        mask &= key_positions > query_positions - sliding_window
    return mask


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
        mask = key_positions <= positions[:, None]  # [num_seqs, key_len]: each row sees only its own past
        if self.sliding_window is not None:
            mask &= key_positions > positions[:, None] - self.sliding_window
        attended = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=mask[:, None, None, :],
                                                  enable_gqa=True)  # [num_seqs, num_heads, 1, head_dim]
        return attended[:, :, 0, :]


# ---------------------------------------------------------------------------- paged cache


@dataclass(frozen=True)
class PagedSequenceChunk:
    """`num_tokens` new tokens of one sequence at `token_start` in the flat batch, at positions `start_position`..;
    `cache_indices[p]` is where position p's K/V lives in the paged cache, for every position up to the last new one.
    """

    token_start: int
    num_tokens: int
    start_position: int
    cache_indices: torch.Tensor  # [start_position + num_tokens] int64, on the cache's device


class PagedKVCache:
    """K/V in fixed-size blocks shared by all sequences: k_cache/v_cache [num_layers, num_entries, num_kv_heads,
    head_dim] with num_entries = num_blocks * block_size. The engine's block manager decides which cache index holds
    which position; this class only writes and reads through those indices (the CPU path, and the GPU one until a
    Triton attention kernel lands)."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, sliding_window: int | None = None) -> None:
        shape = (num_layers, num_blocks * block_size, num_kv_heads, head_dim)
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.chunks: tuple[PagedSequenceChunk, ...] = ()
        self.new_token_cache_indices = torch.empty(0, dtype=torch.int64)

    def set_batch(self, chunks: tuple[PagedSequenceChunk, ...]) -> None:
        """Describe the next forward pass; chunks must tile the flat batch in order."""
        self.chunks = chunks
        # cache index of every new token, in flat-batch order: [num_tokens]
        self.new_token_cache_indices = torch.cat([c.cache_indices[c.start_position:] for c in chunks]) if chunks \
            else torch.empty(0, dtype=torch.int64, device=self.k_cache.device)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        self.k_cache[layer, self.new_token_cache_indices] = k
        self.v_cache[layer, self.new_token_cache_indices] = v
        if all(chunk.num_tokens == 1 for chunk in self.chunks):
            return self._attend_decode(layer, q)
        out = torch.empty_like(q)
        for chunk in self.chunks:
            new = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
            keys = self.k_cache[layer, chunk.cache_indices].transpose(0, 1)  # [num_kv_heads, context, head_dim]
            values = self.v_cache[layer, chunk.cache_indices].transpose(0, 1)
            mask = causal_mask(chunk.num_tokens, chunk.start_position, self.sliding_window, q.device)
            attended = F.scaled_dot_product_attention(q[new].transpose(0, 1), keys, values, attn_mask=mask,
                                                      enable_gqa=True)
            out[new] = attended.transpose(0, 1)
        return out

    def _attend_decode(self, layer: int, q: torch.Tensor) -> torch.Tensor:
        """One new token per sequence: gather every sequence's keys into one padded tensor, one SDPA call."""
        context_lens = [c.start_position + 1 for c in self.chunks]
        max_len = max(context_lens)
        # Pad each sequence's cache indices with its own last one; the mask hides the padding.
        padded = torch.stack([F.pad(c.cache_indices, (0, max_len - len(c.cache_indices)),
                                    value=int(c.cache_indices[-1])) for c in self.chunks])  # [num_seqs, max_len]
        keys = self.k_cache[layer, padded].transpose(1, 2)  # [num_seqs, num_kv_heads, max_len, head_dim]
        values = self.v_cache[layer, padded].transpose(1, 2)
        positions = torch.tensor([n - 1 for n in context_lens], device=q.device)[:, None]
        key_positions = torch.arange(max_len, device=q.device)[None, :]
        mask = key_positions <= positions
        if self.sliding_window is not None:
            mask &= key_positions > positions - self.sliding_window
        attended = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=mask[:, None, None, :],
                                                  enable_gqa=True)  # [num_seqs, num_heads, 1, head_dim]
        return attended[:, :, 0, :]
