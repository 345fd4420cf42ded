"""The one module that turns a scheduled batch into tensors, runs the model, and samples.

Per step: the chunks ordered by adapter slot, so that each adapter's tokens are one contiguous run of the batch (the
LoRA term then works on views of the activations; see kernels.lora_batch); flat token ids and positions for every
chunk (prefill chunks and decodes together), each chunk's block table (the cache builds the step's attention tables
from all of them at once), each token's LoRA slot (the chunk's, which the scheduler read from the sequence's hold);
the step's LoRA batch built once and read by every layer; one forward pass, logits only at the last position of chunks
that end at their sequence's last token, and one sample for each of those with the sequence's own sampling state.
A step of decodes only replays a CUDA graph when the runner has them (`--cuda-graphs`, server.model.cuda_graphs).

A sequence whose row cannot be sampled (its logits are NaN or infinite, e.g. from a broken adapter; or its draw
raises) is reported in `StepResult.failed` rather than failing the step: the others get their tokens as usual.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lora_server.engine.request import TokenLogprob
from lora_server.engine.sampler import SamplingParams, TokenHistory, sample_rows
from lora_server.engine.scheduling.batch import ScheduledBatch
from lora_server.engine.scheduling.sequence import Sequence
from lora_server.kernels.lora_batch import NO_SLOT, LoraBatch
from lora_server.model.compiled import compile_decode_forward
from lora_server.model.cuda_graphs import DecodeGraphs
from lora_server.model.llama import LlamaModel
from lora_server.model.paged_cache import PagedKVCache, PagedSequenceChunk


@dataclass(frozen=True)
class SampledToken:
    token_id: int
    logprob: TokenLogprob | None  # when the request asked for logprobs


@dataclass(frozen=True)
class StepResult:
    sampled: dict[int, SampledToken]  # seq_id -> its new token, for every sampled chunk that got one
    failed: dict[int, str]  # seq_id -> why its row got no token; that request alone ends with an error


class ModelRunner:
    def __init__(self, model: LlamaModel, kv_cache: PagedKVCache,
                 lora_slot_lists: Callable[[list[int]], tuple[list[int], ...]] | None = None,
                 compile_decode: bool = False, decode_graphs: DecodeGraphs | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.device = model.embed_tokens.weight.device
        # Per-token slots -> the slots of each LoRA batch of a forward pass (MergeControl's: a second, compensating
        # batch while an adapter is merged); without adapters, the tokens' own slots.
        self.lora_slot_lists = lora_slot_lists or (lambda token_slots: (token_slots,))
        # Pure-decode steps through one compiled graph (`--compile`); steps with prefill chunks stay eager.
        self.decode_forward = compile_decode_forward(model) if compile_decode else None
        # Pure-decode steps that fit a bucket replay a CUDA graph (`--cuda-graphs`); others run as usual.
        self.decode_graphs = decode_graphs

    @torch.no_grad()  # not inference_mode: the compiled forward cannot take inference tensors (see LlamaModel)
    def run(self, batch: ScheduledBatch) -> StepResult:
        """One forward pass over `batch`; a token (or why none) for every chunk with is_sampled, by seq_id.

        Safe to rerun after it raised: the KV cache writes land only in the batch's own cache entries and a rerun
        rewrites them, and the generators advance only in the draws, which sample_rows rewinds if anything up to its
        host sync (where an asynchronous device error surfaces) raises."""
        # Why a stable sort by slot: each adapter's chunks become one run (base-only ones first); a sequence's chunk
        # stays whole, and the cache, the sampling and the results (by seq_id) do not depend on the order.
        ordered = sorted(batch.chunks, key=lambda c: NO_SLOT if c.lora_slot is None else c.lora_slot)
        ids, positions, token_slots, chunks = [], [], [], []
        for chunk in ordered:
            seq, start, n = chunk.seq, chunk.start_position, chunk.num_tokens
            chunks.append(PagedSequenceChunk(token_start=len(ids), num_tokens=n, start_position=start,
                                             block_table=seq.block_table))
            ids += chunk.token_ids
            positions += range(start, start + n)
            token_slots += [NO_SLOT if chunk.lora_slot is None else chunk.lora_slot] * n
        hidden = self._forward(ids, positions, chunks, token_slots)  # [num_tokens, hidden]

        sampled = [(c, pc) for c, pc in zip(ordered, chunks, strict=True) if c.is_sampled]
        if not sampled:
            return StepResult({}, {})
        last_rows = torch.tensor([pc.token_start + pc.num_tokens - 1 for _, pc in sampled], device=self.device)
        logits = self.model.compute_logits(hidden[last_rows])  # [num_sampled, vocab] fp32
        seqs = [c.seq for c, _ in sampled]
        params: list[SamplingParams] = [seq.sampling or SamplingParams() for seq in seqs]
        # The sequence's eos_token_ids are its stop tokens (the engine set them from ignore_eos and stop_token_ids).
        histories = [TokenHistory(seq.prompt_token_ids, seq.output_token_ids, seq.eos_token_ids) for seq in seqs]
        rows = sample_rows(logits, params, [seq.generator for seq in seqs], histories,
                           [seq.num_logprobs for seq in seqs])
        return StepResult(
            sampled={seq.seq_id: SampledToken(token, None if lp is None else TokenLogprob(token, lp.logprob, lp.top))
                     for seq, token, lp in zip(seqs, rows.token_ids, rows.logprobs, strict=True) if token is not None},
            failed={seqs[row].seq_id: f"{why} ({_served_by(seqs[row])})" for row, why in rows.errors.items()},
        )


    def _forward(self, ids: list[int], positions: list[int], chunks: list[PagedSequenceChunk],
                 token_slots: list[int]) -> torch.Tensor:
        """The step's forward pass: a CUDA graph's replay when one fits, else the (compiled or eager) model."""
        # Lists of NO_SLOT only add nothing: dropped, so a base-only step runs without LoRA launches.
        slot_lists = [slots for slots in self.lora_slot_lists(token_slots) if any(s != NO_SLOT for s in slots)]
        graphs = self.decode_graphs
        if graphs is not None and graphs.can_run(chunks, len(slot_lists)):
            return graphs.run(ids, chunks, slot_lists)
        self.kv_cache.set_batch(tuple(chunks))
        ids_and_positions = torch.tensor([ids, positions]).to(self.device, non_blocking=True)  # [2, num_tokens]
        all_decode = self.kv_cache.tables.decode_all
        forward = self.decode_forward if self.decode_forward is not None and all_decode else self.model
        batches = tuple(LoraBatch.build(slots, self.device) for slots in slot_lists)
        return forward(ids_and_positions[0], ids_and_positions[1], self.kv_cache,
                       batches[0] if len(batches) == 1 else batches or None)


def _served_by(seq: Sequence) -> str:
    key = seq.adapter_key
    return "the base model" if key is None else f"adapter {key.adapter_id!r} version {key.version}"
