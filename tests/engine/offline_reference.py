"""A second generation loop, the tests' reference for the engine: every request in one batch, mixed adapters, a
contiguous KV cache, no scheduler, no paging, no residency.

Prefill every prompt in one flat forward pass, then decode one token per unfinished request per step. It shares only
the model and the sampler with the engine, so agreeing with it checks the engine's batching, paging and slots.
"""

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from lora_server.engine.sampler import SamplingParams, make_generator, sample_rows
from lora_server.kernels.lora_batch import NO_SLOT, LoraBatch
from lora_server.model.attention import ContiguousKVCache, SequenceChunk
from lora_server.model.llama import LlamaModel

LORA_ROW_PAGE = 8  # an adapter's rows are rounded up to this, so freed ranges can be reused by other ranks


class GenerationError(ValueError):
    """A request cannot be run as asked (empty prompt, unknown adapter, too long for the model)."""


class AdapterWeights(Protocol):
    """What the model needs from a parsed adapter (adapters_store.LoraAdapter provides it)."""

    modules: Mapping[tuple[int, str], object]

    @property
    def max_rank(self) -> int: ...


@dataclass(frozen=True)
class GenerationRequest:
    prompt_token_ids: list[int]
    adapter: str | None = None  # a name in the `adapters` given to `generate`, or None for the base model
    sampling: SamplingParams = field(default_factory=SamplingParams)


@dataclass(frozen=True)
class GenerationResult:
    token_ids: list[int]  # generated tokens, the EOS that ended the request included
    finish_reason: str  # "stop" (an EOS id) or "length" (max_new_tokens or the model's maximum length)


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits [num_seqs, vocab] fp32 -> one token id per sequence; RuntimeError if any row cannot be sampled."""
    rows = sample_rows(logits, params, generators)
    if rows.errors:
        row, why = next(iter(rows.errors.items()))
        raise RuntimeError(f"row {row}: {why}")
    return [token for token in rows.token_ids if token is not None]


def load_adapters_into_slots(model: LlamaModel, adapters: Mapping[str, AdapterWeights]) -> dict[str, int]:
    """Give each adapter a slot and its own rows of every layer's pool; returns adapter name -> slot."""
    row_starts, total_rows = [], 0
    for adapter in adapters.values():
        row_starts.append(total_rows)
        total_rows += math.ceil(adapter.max_rank / LORA_ROW_PAGE) * LORA_ROW_PAGE
    model.allocate_lora_pool(max(total_rows, LORA_ROW_PAGE), max(len(adapters), 1))
    slots = {}
    for slot, (name, adapter) in enumerate(adapters.items()):
        model.load_lora_slot(slot, row_starts[slot], adapter.modules)
        slots[name] = slot
    return slots


def generate(model: LlamaModel, requests: Sequence[GenerationRequest], adapters: Mapping[str, AdapterWeights],
             eos_token_ids: Sequence[int]) -> list[GenerationResult]:
    """Run every request together; results come back in request order."""
    max_len = model.config.max_position_embeddings
    for index, request in enumerate(requests):
        if not request.prompt_token_ids:
            raise GenerationError(f"request {index}: the prompt is empty")
        if len(request.prompt_token_ids) >= max_len:
            raise GenerationError(f"request {index}: prompt of {len(request.prompt_token_ids)} tokens leaves no room "
                                  f"in the model's maximum length of {max_len}")
        if request.adapter is not None and request.adapter not in adapters:
            raise GenerationError(f"request {index}: unknown adapter {request.adapter!r} "
                                  f"(available: {', '.join(sorted(adapters)) or 'none'})")
        vocab = model.config.vocab_size
        if any(not 0 <= t < vocab for t in request.prompt_token_ids):
            raise GenerationError(f"request {index}: prompt token ids must be in [0, {vocab})")
    used = {r.adapter for r in requests if r.adapter is not None}
    slots = load_adapters_into_slots(model, {name: adapters[name] for name in adapters if name in used})
    token_slots = [NO_SLOT if r.adapter is None else slots[r.adapter] for r in requests]
    device, config = model.embed_tokens.weight.device, model.config

    # Each request may grow to min(prompt + max_new_tokens, the model's maximum length).
    limits = [min(len(r.prompt_token_ids) + r.sampling.max_new_tokens, max_len) for r in requests]
    cache = ContiguousKVCache(config.num_layers, len(requests), max(limits), config.num_kv_heads, config.head_dim,
                              model.embed_tokens.weight.dtype, device, config.sliding_window)
    generators = [make_generator(r.sampling) for r in requests]
    outputs: list[list[int]] = [[] for _ in requests]
    finish: list[str | None] = [None] * len(requests)
    eos = set(eos_token_ids)

    # Step inputs: (request index, the tokens it feeds, the position of the first one).
    step = [(i, list(r.prompt_token_ids), 0) for i, r in enumerate(requests)]
    while step:
        chunks, ids, positions, slots_per_token, start = [], [], [], [], 0
        for i, tokens, first_position in step:
            chunks.append(SequenceChunk(cache_row=i, token_start=start, num_tokens=len(tokens),
                                        start_position=first_position))
            ids += tokens
            positions += range(first_position, first_position + len(tokens))
            slots_per_token += [token_slots[i]] * len(tokens)
            start += len(tokens)
        cache.set_batch(tuple(chunks))
        hidden = model(torch.tensor(ids, device=device), torch.tensor(positions, device=device), cache,
                       LoraBatch.build(slots_per_token, device))
        last_rows = torch.tensor([c.token_start + c.num_tokens - 1 for c in chunks], device=device)
        logits = model.compute_logits(hidden[last_rows])  # [num_seqs_in_step, vocab]
        active = [i for i, _, _ in step]
        new_tokens = sample(logits, [requests[i].sampling for i in active], [generators[i] for i in active])

        next_step = []
        for (i, tokens, first_position), token in zip(step, new_tokens, strict=True):
            outputs[i].append(token)
            length = first_position + len(tokens) + 1  # tokens in the sequence, the new one included
            if token in eos:
                finish[i] = "stop"
            elif len(outputs[i]) >= requests[i].sampling.max_new_tokens or length >= limits[i]:
                finish[i] = "length"
            else:
                next_step.append((i, [token], length - 1))
        step = next_step
    return [GenerationResult(token_ids=out, finish_reason=reason) for out, reason in zip(outputs, finish, strict=True)]
