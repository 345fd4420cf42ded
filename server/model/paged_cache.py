"""The engine's KV cache: fixed-size blocks shared by all sequences, read and written through block tables.

Each step's attention metadata is built once on the host from the scheduler's integers and copied in one transfer
(`PagedKVCache.set_batch`); every layer's `attend` then only reads it. Decodes are one batched call per layer; longer
(prefill) chunks are one Triton launch, one padded SDPA, or one SDPA each, whichever the backend and the chunks' shapes
make fastest. A captured decode step (server.model.cuda_graphs) gets its tables from static buffers instead
(`decode_tables`).
"""

import os
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.util import find_spec

import torch
import torch.nn.functional as F

from lora_server.model.attention import causal_mask, visible_keys


@dataclass(frozen=True)
class PagedSequenceChunk:
    """`num_tokens` new tokens of one sequence at `token_start` in the flat batch, at positions `start_position`..;
    position p's K/V lives at entry p % block_size of block `block_table[p // block_size]` (host integers: the cache
    turns a whole step's chunks into device tables at once, in `set_batch`)."""

    token_start: int
    num_tokens: int
    start_position: int
    block_table: Sequence[int]

    @property
    def context_len(self) -> int:
        return self.start_position + self.num_tokens

    def cache_entry(self, position: int, block_size: int) -> int:
        """Where position `position` of this sequence has its K/V in the cache (a row of k_cache[layer])."""
        return self.block_table[position // block_size] * block_size + position % block_size


@dataclass(frozen=True)
class PagedBatchTables:
    """One step's attention metadata on the device, built on the host from the scheduler's integers and copied in
    one transfer (so the forward pass never waits on the device for a length or an index).

    Single-token chunks (decodes, and any one-token prefill) form the *decode group*: one batched attention call per
    layer. Longer chunks are one Triton launch per layer with the Triton backend; the torch backend attends them one
    by one (few per step: the scheduler's token budget bounds them; on CPU that loop is the fastest path measured)."""

    slot_mapping: torch.Tensor  # [num_tokens] int64: the cache entry each new token's K/V is written to
    decode_token_ids: torch.Tensor  # [num_decode] int64: the decode group's rows in the flat batch, ascending
    decode_all: bool  # every token of the batch is in the decode group, in order: no gather of q nor scatter of out
    context_lens: torch.Tensor  # [num_decode] int64: keys each decode token sees (its position + 1)
    block_tables: torch.Tensor  # [num_decode, max_blocks] int64: padded with block 0 (never read: past context_len)
    # The torch decode path's gather (None with the Triton backend, which reads the blocks in place):
    decode_key_indices: torch.Tensor | None  # [num_decode, max_context] int64: cache entry of each key position
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, max_context] bool: keys each decode token may see
    # Chunks of more than one token, in one of three forms (PagedKVCache._prefill_form), the others empty:
    prefill: tuple[tuple[PagedSequenceChunk, torch.Tensor], ...] = ()  # the torch loop's (chunk, its cache entries)
    padded_prefill: "PaddedPrefill | None" = None  # the torch backend's: alike chunks in one SDPA
    prefill_launch: "PrefillLaunch | None" = None  # the Triton backend's: every chunk in one launch


@dataclass(frozen=True)
class PaddedPrefill:
    """Prefill chunks of like sizes as one SDPA (torch backend): C chunks, each padded to P queries (its last row
    repeated) and K keys (its last entry repeated: its own written K/V, masked, since 0 · NaN is NaN)."""

    query_rows: torch.Tensor  # [C, P] int64: rows of q
    key_entries: torch.Tensor  # [C, K] int64: cache entries
    mask: torch.Tensor  # [C, 1, P, K] bool: causal (and windowed) by position
    out_rows: torch.Tensor  # [num_prefill_tokens] int64: the chunks' rows of out
    out_index: torch.Tensor  # [num_prefill_tokens] int64: each one's row in the flat [C * P] output


@dataclass(frozen=True)
class PrefillLaunch:
    """The longer chunks of a step as `kernels.paged_prefill` reads them (device views of the step's one transfer)."""

    query_starts: torch.Tensor  # [num_prefill] int64: each chunk's first row in the flat batch
    query_lens: torch.Tensor  # [num_prefill] int64
    start_positions: torch.Tensor  # [num_prefill] int64
    block_tables: torch.Tensor  # [num_prefill, max_blocks] int64
    tile_chunks: torch.Tensor  # [num_tiles] int64: the grid's query tiles (kernels.paged_prefill.prefill_tiles)
    tile_offsets: torch.Tensor  # [num_tiles] int64


class PagedKVCache:
    """K/V in fixed-size blocks shared by all sequences: k_cache/v_cache [num_layers, num_entries, num_kv_heads,
    head_dim] with num_entries = (num_blocks + 1) * block_size. The engine's block manager decides which of the
    num_blocks blocks holds which positions; this class writes and reads through the block tables. The one block more,
    `scratch_block`, is never handed out: the padding rows of a captured decode step write and read it (see
    server.model.cuda_graphs), so they touch no sequence's K/V.

    Attention has two backends. "torch": decodes gather each sequence's keys into a padded tensor per layer (indices
    built once per step) for one SDPA, and prefill chunks get one SDPA each. "triton" (CUDA): `kernels.paged_decode`
    for the decode group and `kernels.paged_prefill` for every longer chunk at once, both reading the blocks in place.
    "auto" picks Triton on CUDA when it is installed."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device | str, sliding_window: int | None = None,
                 attention_backend: str = "auto") -> None:
        shape = (num_layers, (num_blocks + 1) * block_size, num_kv_heads, head_dim)
        # Zeros, not empty: masked-out keys get weight 0, but 0 × a NaN left in uninitialised memory is still NaN.
        self.k_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.v_cache = torch.zeros(shape, dtype=dtype, device=device)
        self.num_blocks = num_blocks
        self.scratch_block = num_blocks
        self.block_size = block_size
        self.sliding_window = sliding_window
        self.attention_backend = resolve_attention_backend(attention_backend, self.k_cache.device, block_size)
        self.tables: PagedBatchTables | None = None
        if self.attention_backend == "triton":
            # Imported here, not per call: a CPU-only server never imports triton, and a compiled forward traces
            # the calls to the custom ops without an import inside the graph.
            from lora_server.kernels.paged_decode import paged_decode_op
            from lora_server.kernels.paged_prefill import BLOCK_Q, paged_prefill_op, prefill_tiles

            self._paged_decode = paged_decode_op
            self._paged_prefill = paged_prefill_op
            self._prefill_tiles = prefill_tiles
            self._prefill_block_q = BLOCK_Q

    @property
    def device(self) -> torch.device:
        return self.k_cache.device

    def set_batch(self, chunks: Sequence[PagedSequenceChunk]) -> None:
        """Describe the next forward pass (chunks tile the flat batch in order): every table it needs, built here."""
        size = self.block_size
        slot_mapping = [chunk.cache_entry(p, size) for chunk in chunks for p in range(chunk.start_position,
                                                                                      chunk.context_len)]
        decode = [chunk for chunk in chunks if chunk.num_tokens == 1]
        prefill = [chunk for chunk in chunks if chunk.num_tokens > 1]
        prefill_form = self._prefill_form(prefill)
        # Host integers of every table, in the order they are cut apart below: one host-to-device transfer.
        decode_tables = padded_block_tables(decode, size)
        decode_parts = [slot_mapping, [c.token_start for c in decode], [c.context_len for c in decode],
                        [b for table in decode_tables for b in table]]
        prefill_parts = self._prefill_host_parts(prefill_form, prefill)
        parts = decode_parts + prefill_parts
        flat = torch.tensor([i for part in parts for i in part], dtype=torch.int64).to(self.device, non_blocking=True)
        slot_tensor, decode_ids, context_lens, tables, *prefill_tensors = flat.split([len(part) for part in parts])
        num_decode = len(decode)
        block_tables = tables.view(num_decode, len(decode_tables[0]) if decode_tables else 0)
        key_indices = mask = None
        if self.attention_backend == "torch":  # the Triton kernel walks the block tables itself
            key_indices, mask = self._decode_keys(block_tables, context_lens,
                                                  max((chunk.context_len for chunk in decode), default=0))
        self.tables = PagedBatchTables(
            slot_mapping=slot_tensor, decode_token_ids=decode_ids, decode_all=num_decode == len(slot_mapping),
            context_lens=context_lens, block_tables=block_tables, decode_key_indices=key_indices,
            decode_mask=mask, **self._prefill_tables(prefill_form, prefill, prefill_tensors))

    # ---------------------------------------------------------------- prefill chunks: one of three forms

    def _prefill_form(self, prefill: Sequence[PagedSequenceChunk]) -> str | None:
        """"triton": one kernel launch (the Triton backend). "padded": one SDPA over the chunks padded to the longest
        chunk and context, when that adds little work (see PADDED_PREFILL_MAX_WORK). "loop": one SDPA per chunk."""
        if not prefill:
            return None
        if self.attention_backend == "triton":
            return "triton"
        padded_work = len(prefill) * max(c.num_tokens for c in prefill) * max(c.context_len for c in prefill)
        own_work = sum(c.num_tokens * c.context_len for c in prefill)
        return "padded" if len(prefill) > 1 and padded_work <= PADDED_PREFILL_MAX_WORK * own_work else "loop"

    def _prefill_host_parts(self, form: str | None, prefill: Sequence[PagedSequenceChunk]) -> list[list[int]]:
        """The form's integer tables, host side, each a flat list (cut apart again by `_prefill_tables`)."""
        size = self.block_size
        if form == "triton":  # the kernel's per-chunk tables and its grid of query tiles
            tile_chunks, tile_offsets = self._prefill_tiles([c.num_tokens for c in prefill], self._prefill_block_q)
            return [[c.token_start for c in prefill], [c.num_tokens for c in prefill],
                    [c.start_position for c in prefill],
                    [b for table in padded_block_tables(prefill, size) for b in table], tile_chunks, tile_offsets]
        if form == "padded":  # rows and positions padded with each chunk's last one, keys with its last entry
            num_queries = max(c.num_tokens for c in prefill)
            num_keys = max(c.context_len for c in prefill)
            query_rows = [c.token_start + min(i, c.num_tokens - 1) for c in prefill for i in range(num_queries)]
            query_positions = [c.start_position + min(i, c.num_tokens - 1) for c in prefill for i in range(num_queries)]
            key_entries = [c.cache_entry(min(p, c.context_len - 1), size) for c in prefill for p in range(num_keys)]
            out_rows = [c.token_start + i for c in prefill for i in range(c.num_tokens)]
            out_index = [n * num_queries + i for n, c in enumerate(prefill) for i in range(c.num_tokens)]
            return [query_rows, query_positions, key_entries, out_rows, out_index]
        if form == "loop":  # each chunk's cache entries, chunk after chunk
            return [[c.cache_entry(p, size) for c in prefill for p in range(c.context_len)]]
        return []

    def _prefill_tables(self, form: str | None, prefill: Sequence[PagedSequenceChunk],
                        tensors: Sequence[torch.Tensor]) -> dict:
        """The form's PagedBatchTables fields from its tables on the device."""
        if form == "triton":
            starts, lens, positions, block_tables, tile_chunks, tile_offsets = tensors
            return {"prefill_launch": PrefillLaunch(starts, lens, positions, block_tables.view(len(prefill), -1),
                                                    tile_chunks, tile_offsets)}
        if form == "padded":
            query_rows, query_positions, key_entries, out_rows, out_index = tensors
            num_chunks = len(prefill)
            query_positions = query_positions.view(num_chunks, -1, 1)  # [C, P, 1]
            key_positions = torch.arange(key_entries.shape[0] // num_chunks, device=self.device)  # [K]
            mask = visible_keys(query_positions, key_positions, self.sliding_window)  # [C, P, K]
            return {"padded_prefill": PaddedPrefill(query_rows.view(num_chunks, -1),
                                                    key_entries.view(num_chunks, -1), mask[:, None], out_rows,
                                                    out_index)}
        if form == "loop":
            entries, offset, chunk_entries = tensors[0], 0, []
            for chunk in prefill:
                chunk_entries.append((chunk, entries[offset : offset + chunk.context_len]))
                offset += chunk.context_len
            return {"prefill": tuple(chunk_entries)}
        return {}

    # ---------------------------------------------------------------- tables for a captured step

    def decode_tables(self, slot_mapping: torch.Tensor, context_lens: torch.Tensor, block_tables: torch.Tensor,
                      max_context: int) -> PagedBatchTables:
        """The tables of a step where every token is a decode, from tables already on the device (a captured step's
        static buffers): slot_mapping and context_lens [num_rows] int64, block_tables [num_rows, max_blocks] int64.
        Device work only, no host read, so it can run inside a CUDA graph; `max_context` bounds every context_len
        (the torch backend pads its gather to it)."""
        key_indices = mask = None
        if self.attention_backend == "torch":
            key_indices, mask = self._decode_keys(block_tables, context_lens, max_context)
        return PagedBatchTables(
            slot_mapping=slot_mapping, decode_token_ids=torch.arange(slot_mapping.shape[0], device=self.device),
            decode_all=True, context_lens=context_lens, block_tables=block_tables, decode_key_indices=key_indices,
            decode_mask=mask)

    def _decode_keys(self, block_tables: torch.Tensor, context_lens: torch.Tensor,
                     max_context: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The torch decode path's gather indices [num_decode, max_context] and mask [num_decode, 1, 1, max_context].

        Positions past a row's own are read at its last one: masked, but read, and 0 · NaN is NaN, so they must be the
        row's own written entries (a block's unwritten tail, or block 0, may hold anything a previous owner left)."""
        size = self.block_size
        key_positions = torch.arange(max_context, device=self.device)[None, :]  # [1, max_context]
        last = (context_lens - 1)[:, None]  # [num_decode, 1]: each decode token's own position
        clamped = torch.minimum(key_positions, last)
        key_indices = block_tables.gather(1, clamped // size) * size + clamped % size
        mask = visible_keys(last, key_positions, self.sliding_window)
        return key_indices, mask[:, None, None, :]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        tables = self.tables
        assert tables is not None, "set_batch first"
        self.k_cache[layer, tables.slot_mapping] = k
        self.v_cache[layer, tables.slot_mapping] = v
        if tables.decode_all:
            return self._attend_decode(layer, q, tables)
        out = torch.empty_like(q)
        if tables.decode_token_ids.numel():
            out.index_copy_(0, tables.decode_token_ids,
                            self._attend_decode(layer, q.index_select(0, tables.decode_token_ids), tables))
        launch = tables.prefill_launch
        if launch is not None:
            self._paged_prefill(q, self.k_cache[layer], self.v_cache[layer], out, launch.block_tables,
                                launch.query_starts, launch.query_lens, launch.start_positions, launch.tile_chunks,
                                launch.tile_offsets, self.block_size, self.sliding_window or 0, self._prefill_block_q)
        padded = tables.padded_prefill
        if padded is not None:
            queries = q[padded.query_rows].transpose(1, 2)  # [C, num_heads, P, head_dim]
            keys = self.k_cache[layer, padded.key_entries].transpose(1, 2)  # [C, num_kv_heads, K, head_dim]
            values = self.v_cache[layer, padded.key_entries].transpose(1, 2)
            attended = F.scaled_dot_product_attention(queries, keys, values, attn_mask=padded.mask, enable_gqa=True)
            attended = attended.transpose(1, 2).flatten(0, 1)  # [C * P, num_heads, head_dim]
            out.index_copy_(0, padded.out_rows, attended.index_select(0, padded.out_index))
        for chunk, entries in tables.prefill:
            new = slice(chunk.token_start, chunk.token_start + chunk.num_tokens)
            keys = self.k_cache[layer, entries].transpose(0, 1)  # [num_kv_heads, context_len, head_dim]
            values = self.v_cache[layer, entries].transpose(0, 1)
            mask = causal_mask(chunk.num_tokens, chunk.start_position, self.sliding_window, q.device)
            attended = F.scaled_dot_product_attention(q[new].transpose(0, 1), keys, values, attn_mask=mask,
                                                      enable_gqa=True)
            out[new] = attended.transpose(0, 1)
        return out

    def _attend_decode(self, layer: int, q: torch.Tensor, tables: PagedBatchTables) -> torch.Tensor:
        """q [num_decode, num_heads, head_dim]: one new token per row -> [num_decode, num_heads, head_dim]."""
        if self.attention_backend == "triton":
            return self._paged_decode(q, self.k_cache[layer], self.v_cache[layer], tables.block_tables,
                                      tables.context_lens, self.block_size, self.sliding_window or 0)
        keys = self.k_cache[layer, tables.decode_key_indices].transpose(1, 2)  # [num_decode, kv_heads, ctx, dim]
        values = self.v_cache[layer, tables.decode_key_indices].transpose(1, 2)
        attended = F.scaled_dot_product_attention(q[:, :, None, :], keys, values, attn_mask=tables.decode_mask,
                                                  enable_gqa=True)  # [num_decode, num_heads, 1, head_dim]
        return attended[:, :, 0, :]


ATTENTION_BACKENDS = ("auto", "triton", "torch")
# The torch backend attends prefill chunks in one padded SDPA when the padding adds at most this share of work
# (padded C·P·K against the chunks' own Σ n·context). Measured on the 2-core CPU (8 heads of 128, one layer): equal
# chunks took 0.45-0.69x the loop's time; work ratio 1.33-1.49: 0.88-0.97x; 1.78-2.29: 1.19-1.22x; one long chunk
# beside short ones (8.9): 6.6x.
PADDED_PREFILL_MAX_WORK = 1.25


def resolve_attention_backend(name: str, device: torch.device, block_size: int) -> str:
    """"auto" -> "triton" on CUDA with triton installed (and a power-of-two block size, which the kernel's tiles
    need), else "torch"; "triton" only on CUDA or under Triton's interpreter (TRITON_INTERPRET=1, tests)."""
    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {', '.join(ATTENTION_BACKENDS)}")
    has_triton = find_spec("triton") is not None
    power_of_two = block_size & (block_size - 1) == 0
    if name == "auto":
        return "triton" if device.type == "cuda" and has_triton and power_of_two else "torch"
    if name == "triton" and not (has_triton and (device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1")):
        raise ValueError("attention backend 'triton' needs the triton package and a CUDA device "
                         "(or TRITON_INTERPRET=1 on CPU, for tests)")
    if name == "triton" and not power_of_two:
        raise ValueError(f"attention backend 'triton' needs a power-of-two block size, not {block_size}")
    return name


def padded_block_tables(chunks: Sequence[PagedSequenceChunk], block_size: int) -> list[list[int]]:
    """Each chunk's blocks up to its context, padded with block 0 (never read: past the context) to one width."""
    tables = [list(chunk.block_table[: -(-chunk.context_len // block_size)]) for chunk in chunks]
    width = max(map(len, tables), default=0)
    return [table + [0] * (width - len(table)) for table in tables]
