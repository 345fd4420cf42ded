"""Turn each sequence's next-token logits into a token: greedy, or temperature with top-k / top-p.

A request with a seed draws from its own generator, so its tokens do not depend on what else shares the batch.
"""

from dataclasses import dataclass

import torch


class SamplingError(ValueError):
    """Sampling parameters a user sent are out of range."""


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0.0 <= self.temperature <= 100.0:
            raise SamplingError(f"temperature must be in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SamplingError(f"top_k must be 0 (off) or positive, got {self.top_k}")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def make_generator(params: SamplingParams) -> torch.Generator | None:
    """The request's private random stream (None for greedy, which needs none)."""
    if params.is_greedy:
        return None
    generator = torch.Generator()
    if params.seed is None:
        generator.seed()
    else:
        generator.manual_seed(params.seed)
    return generator


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits [num_seqs, vocab] fp32 -> one token id per sequence."""
    tokens = logits.argmax(dim=-1).tolist()  # greedy for everyone; sampled rows are overwritten below
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if not p.is_greedy:
            tokens[row] = _sample_row(logits[row].float().cpu(), p, generator)
    return tokens


def _sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    # logits: [vocab], on the CPU because the request's generator lives there
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[0]:
        kth_largest = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        # Keep the smallest prefix whose mass reaches top_p: a token goes if the mass before it already does.
        drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= params.top_p
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator).item())
