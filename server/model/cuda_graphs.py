"""Decode steps replayed from CUDA graphs: what `--cuda-graphs` runs for steps where every sequence feeds one token.

Why: a decode step is hundreds of small kernel launches from Python (per layer: two norms, four projections with
their LoRA shrink and expand, rotary, the cache write, attention, the MLP's activation). At small batches launching
them costs more than running them; a graph replays the whole forward with one launch.

How: the forward of a decode step reads nothing but device tensors (the step's tables are built on the host, see
PagedKVCache and kernels.lora_batch), so it can be captured once per batch-size *bucket* over static input buffers
sized for the largest bucket: token ids, positions, cache entries to write, context lengths, block tables, and the
LoRA slot of every token (`TokenSlots`: the LoRA launches depend only on the bucket, so one graph serves any mix of
adapters, and adapters loaded later, whose slot tables are rewritten in place). A step of n sequences copies its
integers into the buffers' first n rows, pads the bucket's other rows (token 0 at position 0, no adapter, K/V written
to and read from the cache's scratch block alone), replays, and reads the first n rows of the graph's output.

Graphs are captured when the engine is built, before any other thread touches the device (a capture must not
overlap other work on the device), largest bucket first, all in one memory pool. `capture=False` runs the very same
step function eagerly on any device: it is how the CPU tests check the captured code path against the plain one.
"""

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from lora_server.kernels.lora_batch import NO_SLOT, TokenSlots
from lora_server.model.llama import LlamaModel
from lora_server.model.paged_cache import PagedKVCache, PagedSequenceChunk, padded_block_tables

MAX_LORA_BATCHES = 2  # own terms, and a merged adapter's compensation term (server.model.merge)
CUDA_GRAPH_SETTINGS = ("auto", "on", "off")


def resolve_cuda_graphs(setting: str, device: torch.device) -> bool:
    """"auto": on exactly on CUDA; "on" on another device is refused, by name, rather than quietly ignored."""
    if setting not in CUDA_GRAPH_SETTINGS:
        raise ValueError(f"cuda_graphs must be one of {', '.join(CUDA_GRAPH_SETTINGS)}, got {setting!r}")
    if setting == "on" and device.type != "cuda":
        raise ValueError(f"--cuda-graphs on needs a CUDA device, and this engine runs on {device.type}; "
                         "use --cuda-graphs auto (on exactly where there is CUDA) or off")
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def graph_buckets(max_rows: int) -> tuple[int, ...]:
    """Batch sizes that get a graph: 1, 2, 4, 8, then every multiple of 8, and max_rows (as vLLM sizes them: a step
    pads at most 7 rows past 8, and small batches, where launches dominate, pad to the next power of two)."""
    assert max_rows >= 1
    sizes = {size for size in (1, 2, 4) if size < max_rows} | set(range(8, max_rows, 8)) | {max_rows}
    return tuple(sorted(sizes))


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph | None  # None when not captured (capture=False): the step runs eagerly
    output: torch.Tensor | None  # [bucket, hidden]: the captured forward's output, rewritten by each replay


class DecodeGraphs:
    def __init__(self, model: LlamaModel, kv_cache: PagedKVCache, max_rows: int, max_blocks_per_seq: int,
                 max_lora_rank: int, capture: bool, num_lora_batches: Sequence[int] = (0, 1)) -> None:
        """Graphs for decode steps of up to `max_rows` sequences of up to `max_blocks_per_seq` blocks each, whose
        adapters have ranks up to `max_lora_rank`. With `capture`, one graph per bucket and per number of LoRA batches
        in `num_lora_batches` (0: a step of base-only rows; 1: own terms; 2: while an adapter is merged) is captured
        here; without, steps run the same function uncaptured."""
        assert all(0 <= k <= MAX_LORA_BATCHES for k in num_lora_batches), num_lora_batches
        if capture and kv_cache.device.type != "cuda":
            raise ValueError(f"CUDA graphs need a CUDA device; the model is on {kv_cache.device.type}")
        self.model = model
        self.kv_cache = kv_cache
        self.buckets = graph_buckets(max_rows)
        device = kv_cache.device
        # Static inputs, every row of the largest bucket; a bucket's step reads their first rows (views).
        self.inputs = torch.zeros(4, max_rows, dtype=torch.int64, device=device)  # ids, positions, slots, lengths
        self.block_tables = torch.zeros(max_rows, max_blocks_per_seq, dtype=torch.int64, device=device)
        self.lora_slots = torch.full((MAX_LORA_BATCHES, max_rows), NO_SLOT, dtype=torch.int32, device=device)
        # Every row starts as padding (what the capture's warm-up runs): its K/V to and from the scratch block.
        self.inputs[2] = kv_cache.scratch_block * kv_cache.block_size
        self.inputs[3] = 1
        self.block_tables[:, 0] = kv_cache.scratch_block
        self._token_slots = {(bucket, k): TokenSlots.over(self.lora_slots[k, :bucket], max_lora_rank)
                             for bucket in self.buckets for k in range(MAX_LORA_BATCHES)}
        self._graphs: dict[tuple[int, int], _Graph] = {}
        self._pool = torch.cuda.graph_pool_handle() if capture else None
        for bucket in reversed(self.buckets):  # largest first: smaller graphs reuse its memory from the pool
            for k in num_lora_batches:
                self._graphs[bucket, k] = self._capture(bucket, k) if capture else _Graph(None, None)

    @property
    def captured(self) -> bool:
        return self._pool is not None

    @property
    def max_rows(self) -> int:
        return self.buckets[-1]

    def can_run(self, chunks: Sequence[PagedSequenceChunk], num_lora_batches: int) -> bool:
        """A step of these chunks has a graph: one token each, few enough rows, a captured number of LoRA batches."""
        return (0 < len(chunks) <= self.max_rows and (self.buckets[0], num_lora_batches) in self._graphs
                and all(chunk.num_tokens == 1 for chunk in chunks))

    def run(self, token_ids: Sequence[int], chunks: Sequence[PagedSequenceChunk],
            slot_lists: Sequence[Sequence[int]]) -> torch.Tensor:
        """The decode step of `chunks` (one token each, token_ids[i] for chunks[i]) with a LoRA batch per list of
        `slot_lists` (each [num_rows], NO_SLOT for none) -> final hidden states [num_rows, hidden]. The result is a
        view of the graph's output: read it before the next step."""
        num_rows, size = len(chunks), self.kv_cache.block_size
        bucket = next(b for b in self.buckets if b >= num_rows)
        padding = bucket - num_rows
        scratch = self.kv_cache.scratch_block
        # Host integers for every buffer, padded to the bucket; then one copy per buffer.
        inputs = torch.tensor([list(token_ids) + [0] * padding, [c.start_position for c in chunks] + [0] * padding,
                               [c.cache_entry(c.start_position, size) for c in chunks] + [scratch * size] * padding,
                               [c.context_len for c in chunks] + [1] * padding], dtype=torch.int64)
        # Columns past a row's own blocks are never read: they keep what they held.
        tables = padded_block_tables(chunks, size)
        width = len(tables[0])
        tables += [[scratch] * width] * padding
        self.inputs[:, :bucket].copy_(inputs, non_blocking=True)
        self.block_tables[:bucket, :width].copy_(torch.tensor(tables, dtype=torch.int64), non_blocking=True)
        if slot_lists:
            slots = torch.tensor([[*slots, *[NO_SLOT] * padding] for slots in slot_lists], dtype=torch.int32)
            self.lora_slots[: len(slot_lists), :bucket].copy_(slots, non_blocking=True)
        graph = self._graphs[bucket, len(slot_lists)]
        if graph.graph is None:
            return self._step(bucket, len(slot_lists))[:num_rows]
        graph.graph.replay()
        return graph.output[:num_rows]

    def _step(self, bucket: int, num_lora_batches: int) -> torch.Tensor:
        """The forward over the static buffers' first `bucket` rows: the function a graph captures."""
        token_ids, positions, entries, context_lens = self.inputs[:, :bucket]
        max_context = self.block_tables.shape[1] * self.kv_cache.block_size
        self.kv_cache.tables = self.kv_cache.decode_tables(entries, context_lens, self.block_tables[:bucket],
                                                           max_context)
        lora = tuple(self._token_slots[bucket, k] for k in range(num_lora_batches))
        return self.model(token_ids, positions, self.kv_cache, lora or None)

    def _capture(self, bucket: int, num_lora_batches: int) -> _Graph:
        """Warm the step up once (Triton compiles its kernels on a first launch, which a capture cannot hold), on a
        side stream as torch asks, then capture it. The buffers hold padding rows only here: the warm-up writes the
        scratch block alone."""
        device = self.kv_cache.device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self._step(bucket, num_lora_batches)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            output = self._step(bucket, num_lora_batches)
        return _Graph(graph, output)
