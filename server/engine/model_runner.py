"""The one module that turns a scheduled batch into tensors, runs the model, and samples.

Per step: the chunks ordered by adapter slot, so that each adapter's tokens are one contiguous run of the batch
(the LoRA term then works on views of the activations; see kernels.lora_batch); flat token ids and positions for every
chunk (prefill chunks and decodes together), each chunk's cache indices in the paged KV cache (from its block table),
each token's LoRA slot (the chunk's, which the scheduler read from the sequence's hold); the step's LoRA batch built
once and read by every layer; one forward pass, logits only at the last position of chunks that end at their sequence's
last token, and one sample for each of those with the sequence's own sampling state.

A sequence whose row cannot be sampled (its logits are NaN or infinite, e.g. from a broken adapter; or its draw
raises) is reported in `StepResult.failed` rather than failing the step: the others get their tokens as usual.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lora_server.engine.request import MAX_LOGPROBS, TokenLogprob
from lora_server.engine.sampler import SamplingParams, sample_rows
from lora_server.engine.scheduling.batch import ScheduledBatch
from lora_server.engine.scheduling.sequence import Sequence
from lora_server.kernels.lora_batch import NO_SLOT, LoraBatch
from lora_server.model.attention import PagedKVCache, PagedSequenceChunk
from lora_server.model.llama import LlamaModel
from lora_server.model.lora_linear import LoraBatches


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
                 lora_batches: Callable[[list[int]], LoraBatches] | None = None) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = model.embed_tokens.weight.device
        # Per-token slots -> the LoRA batches of a forward pass (MergeControl's, which compensate while merged).
        self.lora_batches = lora_batches or (lambda token_slots: LoraBatch.build(token_slots, self.device))
        self._block_offsets = torch.arange(self.block_size, device=self.device)

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch) -> StepResult:
        """One forward pass over `batch`; a token (or why none) for every chunk with is_sampled, by seq_id.

        Safe to rerun after it raised: the KV cache writes land only in the batch's own cache entries and a rerun
        rewrites them, and the generators advance only in the draws, which come after the forward pass, the logits and
        their first host sync (where an asynchronous device error surfaces). Only the logprob bookkeeping follows."""
        # Why a stable sort by slot: each adapter's chunks become one run (base-only ones first); a sequence's chunk
        # stays whole, and the cache, the sampling and the results (by seq_id) do not depend on the order.
        ordered = sorted(batch.chunks, key=lambda c: NO_SLOT if c.lora_slot is None else c.lora_slot)
        ids, positions, token_slots, chunks = [], [], [], []
        for chunk in ordered:
            seq, start, n = chunk.seq, chunk.start_position, chunk.num_tokens
            chunks.append(PagedSequenceChunk(token_start=len(ids), num_tokens=n, start_position=start,
                                             cache_indices=self._cache_indices(seq.block_table, start + n)))
            ids += chunk.token_ids
            positions += range(start, start + n)
            token_slots += [NO_SLOT if chunk.lora_slot is None else chunk.lora_slot] * n
        self.kv_cache.set_batch(tuple(chunks))
        hidden = self.model(torch.tensor(ids, device=self.device), torch.tensor(positions, device=self.device),
                            self.kv_cache, self.lora_batches(token_slots))  # [num_tokens, hidden]

        sampled = [(c, pc) for c, pc in zip(ordered, chunks, strict=True) if c.is_sampled]
        if not sampled:
            return StepResult({}, {})
        last_rows = torch.tensor([pc.token_start + pc.num_tokens - 1 for _, pc in sampled], device=self.device)
        logits = self.model.compute_logits(hidden[last_rows]).float()  # [num_sampled, vocab]
        seqs = [c.seq for c, _ in sampled]
        params: list[SamplingParams] = [seq.sampling or SamplingParams() for seq in seqs]
        rows = sample_rows(logits, params, [seq.generator for seq in seqs])
        good = [row for row, token in enumerate(rows.token_ids) if token is not None]
        tokens = [rows.token_ids[row] for row in good]
        wanted = [seqs[row].num_logprobs for row in good]
        good_logits = logits if len(good) == len(seqs) else logits[good]  # [num_good, vocab]
        logprobs = self._logprobs(good_logits, tokens, wanted) if good else []
        return StepResult(
            sampled={seqs[row].seq_id: SampledToken(token, lp)
                     for row, token, lp in zip(good, tokens, logprobs, strict=True)},
            failed={seqs[row].seq_id: f"{why} ({_served_by(seqs[row])})" for row, why in rows.errors.items()},
        )

    def _cache_indices(self, block_table: list[int], num_positions: int) -> torch.Tensor:
        """Cache indices of positions [0, num_positions) (BlockManager.cache_indices, on the device): block b holds
        positions b*size .. b*size + size - 1."""
        blocks = torch.tensor(block_table, device=self.device)
        return (blocks[:, None] * self.block_size + self._block_offsets).flatten()[:num_positions]

    @staticmethod
    def _logprobs(logits: torch.Tensor, tokens: list[int], wanted: list[int | None]) -> list[TokenLogprob | None]:
        """The model's own distribution (before temperature and cuts), as OpenAI and vLLM report it."""
        if all(n is None for n in wanted):
            return [None] * len(tokens)
        log_probs = torch.log_softmax(logits, dim=-1)  # [num_sampled, vocab] fp32
        most = min(max(n or 0 for n in wanted), MAX_LOGPROBS)
        top_values, top_ids = log_probs.topk(most, dim=-1) if most else (None, None)
        chosen = log_probs[torch.arange(len(tokens)), torch.tensor(tokens)].tolist()
        result: list[TokenLogprob | None] = []
        for row, (token, n) in enumerate(zip(tokens, wanted, strict=True)):
            if n is None:
                result.append(None)
                continue
            top = tuple(zip(top_ids[row, :n].tolist(), top_values[row, :n].tolist(), strict=True)) if n else ()
            result.append(TokenLogprob(token, chosen[row], top))
        return result


def _served_by(seq: Sequence) -> str:
    key = seq.adapter_key
    return "the base model" if key is None else f"adapter {key.adapter_id!r} version {key.version}"
