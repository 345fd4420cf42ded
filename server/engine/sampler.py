"""Turn each sequence's next-token logits into a token: greedy, or temperature with top-k / top-p.

A request with a seed draws from its own generator, so its tokens do not depend on what else shares the batch.
A row that cannot be sampled (non-finite logits, a draw that raises) fails alone: `sample_rows` reports it and
samples every other row exactly as it would without it.
"""

import math
from dataclasses import dataclass

import torch

MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed takes [-2**63, 2**64 - 1]; negatives wrap modulo 2**64
# Why 1e-2: logits / temperature is computed in fp32, whose largest finite value is ~3.4e38, so a temperature of at
# least 1e-2 keeps any logit up to ~3.4e36 finite (real logits are under ~1e3). Below it sampling is greedy in all
# but name anyway, and 1e-40 (an fp32 subnormal) turned every logit into +-inf and the softmax into NaN.
MIN_TEMPERATURE = 1e-2
MAX_TEMPERATURE = 100.0


class SamplingError(ValueError):
    """Sampling parameters a user sent are out of range. `field` names the parameter (e.g. "seed")."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 means greedy; otherwise in [MIN_TEMPERATURE, MAX_TEMPERATURE]
    top_p: float = 1.0  # in (0, 1]; a tiny top_p keeps just the most likely token
    top_k: int = 0  # 0 means no top-k cut
    seed: int | None = None  # in [0, MAX_SEED]; None: a fresh random stream

    def __post_init__(self) -> None:
        if not _is_int(self.max_new_tokens) or self.max_new_tokens < 1:
            raise SamplingError(f"max_new_tokens must be an integer of at least 1, got {self.max_new_tokens!r}",
                                "max_new_tokens")
        if not _is_finite_number(self.temperature) or not (
                self.temperature == 0.0 or MIN_TEMPERATURE <= self.temperature <= MAX_TEMPERATURE):
            raise SamplingError(f"temperature must be 0 (greedy) or in [{MIN_TEMPERATURE}, {MAX_TEMPERATURE}], "
                                f"got {self.temperature!r}", "temperature")
        if not _is_finite_number(self.top_p) or not 0.0 < self.top_p <= 1.0:
            raise SamplingError(f"top_p must be in (0, 1], got {self.top_p!r}", "top_p")
        if not _is_int(self.top_k) or self.top_k < 0:
            raise SamplingError(f"top_k must be 0 (off) or a positive integer, got {self.top_k!r}", "top_k")
        # Negative seeds are refused although manual_seed takes them: -1 would silently be the same stream as
        # 2**64 - 1, and [0, 2**64 - 1] already spans every stream a generator has.
        if self.seed is not None and (not _is_int(self.seed) or not 0 <= self.seed <= MAX_SEED):
            raise SamplingError(f"seed must be an integer in [0, 2**64 - 1], got {self.seed!r}", "seed")

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0.0


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_finite_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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


@dataclass(frozen=True)
class SampledRows:
    token_ids: list[int | None]  # one per row; None where the row failed
    errors: dict[int, str]  # row -> why it has no token


NON_FINITE_LOGITS = "the model produced non-finite logits (NaN or infinite) for this request"


def sample_rows(logits: torch.Tensor, params: list[SamplingParams],
                generators: list[torch.Generator | None]) -> SampledRows:
    """logits [num_seqs, vocab] fp32 -> one token id per row, or why there is none. A row with NaN, +inf or only
    -inf logits fails without drawing; a draw that raises fails its row alone. Other rows are unaffected."""
    unusable = logits.isnan().any(-1) | logits.isposinf().any(-1) | logits.isneginf().all(-1)  # [num_seqs]
    # One transfer for both: the step already waited for the argmax here, so the check adds no host sync.
    greedy, bad = torch.stack([logits.argmax(dim=-1), unusable.long()]).tolist()
    tokens: list[int | None] = list(greedy)
    errors: dict[int, str] = {}
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        if bad[row]:
            tokens[row], errors[row] = None, NON_FINITE_LOGITS
        elif not p.is_greedy:
            try:
                tokens[row] = _sample_row(logits[row].float().cpu(), p, generator)
            except Exception as error:  # why: one row's draw must not take the others' tokens with it
                tokens[row], errors[row] = None, f"sampling failed for this request: {error}"
    return SampledRows(tokens, errors)


def _sample_row(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    # logits: [vocab], on the CPU because the request's generator lives there
    logits = logits / params.temperature
    if 0 < params.top_k < logits.shape[0]:
        kth_largest = logits.topk(params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth_largest, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        # In fp64: top_p is compared as sent (1e-300 in fp32 is 0, which dropped every token and made NaN).
        probs = sorted_logits.double().softmax(-1)
        # Keep the smallest prefix whose mass reaches top_p: a token goes if the mass before it already does.
        drop_sorted = (probs.cumsum(-1) - probs) >= params.top_p
        drop_sorted[0] = False  # the most likely token always stays, however small top_p is
        logits = logits.masked_fill(drop_sorted.scatter(0, order, drop_sorted), float("-inf"))
    probs = logits.softmax(-1)
    if not torch.isfinite(probs).all():
        raise ValueError(f"logits / temperature {params.temperature} are not finite")
    return int(torch.multinomial(probs, 1, generator=generator).item())
