"""Turn a step's next-token logits into tokens, the whole batch in one pass on the device: penalties (repetition,
presence, frequency), min_tokens, then greedy, or temperature with top-k / top-p / min-p; one host transfer of the
chosen tokens (and logprobs when asked) per step.

A request with a seed draws one number per step from its own generator, so its tokens do not depend on what else
shares the batch. A row that cannot be sampled (non-finite logits, a draw that raises) fails alone: `sample_rows`
reports it and samples every other row exactly as it would without it.
"""

import math
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
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
    # vLLM's extras. Penalties read the sequence's tokens: repetition the prompt's and the output's (as transformers
    # and vLLM do), presence and frequency the output's only (as OpenAI defines them).
    repetition_penalty: float = 1.0  # > 0; 1 is off; a seen token's logit is divided by it (multiplied if negative)
    presence_penalty: float = 0.0  # in [-2, 2]; subtracted once from every token the output already holds
    frequency_penalty: float = 0.0  # in [-2, 2]; subtracted once per time the output already holds the token
    min_p: float = 0.0  # in [0, 1]; drops tokens less likely than min_p times the most likely one
    min_tokens: int = 0  # in [0, max_new_tokens]; EOS and stop tokens cannot be drawn before this many tokens
    ignore_eos: bool = False  # keep generating past the model's EOS tokens (stop_token_ids still stop)
    stop_token_ids: tuple[int, ...] = ()  # generation ends after any of these tokens
    include_stop_str_in_output: bool = False  # keep the stop string (or stop token's text) at the end of the text

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
        if not _is_finite_number(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise SamplingError(f"repetition_penalty must be greater than 0, got {self.repetition_penalty!r}",
                                "repetition_penalty")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_finite_number(value) or not -2.0 <= value <= 2.0:
                raise SamplingError(f"{name} must be in [-2, 2], got {value!r}", name)
        if not _is_finite_number(self.min_p) or not 0.0 <= self.min_p <= 1.0:
            raise SamplingError(f"min_p must be in [0, 1], got {self.min_p!r}", "min_p")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_new_tokens:
            raise SamplingError(f"min_tokens must be an integer in [0, max_new_tokens={self.max_new_tokens}], "
                                f"got {self.min_tokens!r}", "min_tokens")
        for name in ("ignore_eos", "include_stop_str_in_output"):
            if not isinstance(getattr(self, name), bool):
                raise SamplingError(f"{name} must be true or false, got {getattr(self, name)!r}", name)
        if isinstance(self.stop_token_ids, list):  # why: kept as a tuple, so the frozen params stay hashable
            object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        if not isinstance(self.stop_token_ids, tuple) or not all(
                _is_int(t) and t >= 0 for t in self.stop_token_ids):
            raise SamplingError(f"stop_token_ids must be non-negative integer token ids, got {self.stop_token_ids!r}",
                                "stop_token_ids")

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


# ---------------------------------------------------------------- one step's rows, sampled together


@dataclass(frozen=True)
class TokenHistory:
    """What the penalties and min_tokens read of a row's sequence: references to its lists, never copies."""

    prompt_token_ids: Sequence[int]
    output_token_ids: Sequence[int]
    stop_token_ids: AbstractSet[int] = frozenset()  # kept from being drawn while the output is under min_tokens


@dataclass(frozen=True)
class RowLogprobs:
    logprob: float  # the chosen token's, in the model's own distribution (before penalties, temperature and cuts)
    top: tuple[tuple[int, float], ...]  # (token id, logprob) of the most likely tokens, best first


@dataclass(frozen=True)
class SampledRows:
    token_ids: list[int | None]  # one per row; None where the row failed
    errors: dict[int, str]  # row -> why it has no token
    logprobs: list[RowLogprobs | None]  # one per row; None where not asked for or the row failed


NON_FINITE_LOGITS = "the model produced non-finite logits (NaN or infinite) for this request"
_OK, _NON_FINITE, _UNSAMPLEABLE = 0, 1, 2  # a row's status as the device reports it
# The per-row parameter table's columns: built on the host once per step, moved to the device in one transfer.
_TEMPERATURE, _TOP_K, _TOP_P, _MIN_P, _REPETITION, _PRESENCE, _FREQUENCY, _UNIFORM, _GREEDY = range(9)


def sample_rows(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator | None],
                histories: list[TokenHistory] | None = None,
                num_logprobs: list[int | None] | None = None) -> SampledRows:
    """logits [num_rows, vocab] fp32 -> one token id per row (and its logprobs when `num_logprobs[row]` is not None),
    or why there is none. Every row is sampled in one pass on the logits' device, with one host transfer at the end.

    A row with NaN, +inf or only -inf logits fails, as does one whose logits are not finite after its penalties and
    temperature, or whose draw raises; the other rows get exactly the tokens they would get without it. Penalties and
    min_tokens need `histories` (one per row); without them no row may ask for either."""
    num_rows, vocab = logits.shape
    assert len(params) == len(generators) == num_rows, (len(params), len(generators), num_rows)
    assert histories is None or len(histories) == num_rows
    wanted = num_logprobs if num_logprobs is not None else [None] * num_rows
    # Why save the streams: the draws come before the step's one host sync, where an asynchronous device error shows
    # up; a step that raises is rerun (Engine._run_with_retry) and must then draw the same numbers again.
    saved = [(g, g.get_state()) for p, g in zip(params, generators, strict=True) if g is not None and not p.is_greedy]
    try:
        uniforms, errors = _draw_uniforms(params, generators)
        packed = _sample_on_device(logits, params, uniforms, histories, wanted).tolist()  # the one host transfer
    except BaseException:
        for generator, state in reversed(saved):  # reversed: a stream shared by rows gets its first state back
            generator.set_state(state)
        raise
    most = max((n for n in wanted if n is not None), default=0)
    tokens: list[int | None] = []
    logprobs: list[RowLogprobs | None] = []
    for row, (token, status, chosen, *top) in enumerate(packed):
        if row not in errors and status == _NON_FINITE:
            errors[row] = NON_FINITE_LOGITS
        elif row not in errors and status == _UNSAMPLEABLE:
            errors[row] = (f"sampling failed for this request: its logits are not finite after its penalties and "
                           f"temperature {params[row].temperature}")
        if row in errors:
            tokens.append(None)
            logprobs.append(None)
            continue
        tokens.append(int(token))
        n = wanted[row]
        logprobs.append(None if n is None else RowLogprobs(
            chosen, tuple((int(t), v) for t, v in zip(top[:n], top[most:most + n], strict=True))))
    return SampledRows(tokens, errors, logprobs)


def _draw_uniform(params: SamplingParams, generator: torch.Generator | None) -> float:
    """A sampled row's one random number this step, from its own stream: the drawn token is where it falls in the
    cumulative distribution of the kept tokens. One number per row per step whatever the batch, so a seeded request
    draws the same tokens in any batch and continues its stream across preemption."""
    return torch.rand((), dtype=torch.float64, generator=generator).item()


def _draw_uniforms(params: list[SamplingParams],
                   generators: list[torch.Generator | None]) -> tuple[list[float], dict[int, str]]:
    uniforms, errors = [], {}
    for row, (p, generator) in enumerate(zip(params, generators, strict=True)):
        uniform = 0.0
        if not p.is_greedy:
            try:
                uniform = _draw_uniform(p, generator)
            except Exception as error:  # why: one row's draw must not take the others' tokens with it
                errors[row] = f"sampling failed for this request: {error}"
        uniforms.append(uniform)
    return uniforms, errors


def _sample_on_device(logits: torch.Tensor, params: list[SamplingParams], uniforms: list[float],
                      histories: list[TokenHistory] | None, wanted: list[int | None]) -> torch.Tensor:
    """Everything on the logits' device, no host sync: [num_rows, 3 + 2 * most] fp64 of (token, status, the chosen
    token's logprob, `most` top ids, `most` top logprobs), `most` being the largest number of logprobs asked for."""
    num_rows, vocab = logits.shape
    device = logits.device
    table = _row_table(params, uniforms, device)
    unusable = logits.isnan().any(-1) | logits.isposinf().any(-1) | logits.isneginf().all(-1)  # [num_rows]
    processed = _apply_penalties(logits, params, histories, table)
    processed = _suppress_stop_tokens(processed, params, histories)
    tokens = processed.argmax(dim=-1)  # [num_rows]: greedy rows keep this
    scaled = processed
    if not all(p.is_greedy for p in params):
        scaled = processed / table[:, _TEMPERATURE, None].float()
        drawn = _draw_tokens(scaled, table)
        tokens = torch.where(table[:, _GREEDY].bool(), tokens, drawn)
    # Why not always: with no penalty nor temperature applied, scaled is the raw logits, already checked above.
    unsampleable = unusable if scaled is logits else (
        scaled.isnan().any(-1) | scaled.isposinf().any(-1) | scaled.isneginf().all(-1))
    status = torch.where(unusable, _NON_FINITE, torch.where(unsampleable, _UNSAMPLEABLE, _OK))
    columns = [tokens.double()[:, None], status.double()[:, None]]
    if any(n is not None for n in wanted):
        most = max(n for n in wanted if n is not None)
        log_probs = torch.log_softmax(logits, dim=-1)  # [num_rows, vocab] fp32: the model's own distribution
        columns.append(log_probs.gather(1, tokens[:, None]).double())
        if most:
            top_values, top_ids = log_probs.topk(most, dim=-1)
            columns += [top_ids.double(), top_values.double()]
    else:
        columns.append(torch.zeros(num_rows, 1, dtype=torch.float64, device=device))
    return torch.cat(columns, dim=1)


def _row_table(params: list[SamplingParams], uniforms: list[float], device: torch.device) -> torch.Tensor:
    """[num_rows, 9] fp64 of each row's numbers (the _TEMPERATURE ... _GREEDY columns), in one host-to-device copy."""
    return torch.tensor([(1.0 if p.is_greedy else p.temperature, float(p.top_k), p.top_p, p.min_p,
                          p.repetition_penalty, p.presence_penalty, p.frequency_penalty, u, float(p.is_greedy))
                         for p, u in zip(params, uniforms, strict=True)], dtype=torch.float64, device=device)


def _apply_penalties(logits: torch.Tensor, params: list[SamplingParams], histories: list[TokenHistory] | None,
                     table: torch.Tensor) -> torch.Tensor:
    """Repetition (over prompt and output, as transformers' RepetitionPenaltyLogitsProcessor), then frequency and
    presence (over the output, as OpenAI defines them). Token counts are built only when some row asks."""
    repeats = [p.repetition_penalty != 1.0 for p in params]
    counts_output = [p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params]
    if not any(repeats) and not any(counts_output):
        return logits
    assert histories is not None, "penalties need each row's token history"
    num_rows, vocab = logits.shape
    # ids[0]: output tokens of every penalised row; ids[1]: prompt tokens of repetition rows. Padded with `vocab`,
    # a column dropped after the scatter, so rows of any length share one tensor and one transfer.
    lists = [[list(h.output_token_ids) if rep or out else [] for h, rep, out in zip(histories, repeats, counts_output,
                                                                                      strict=True)],
             [list(h.prompt_token_ids) if rep else [] for h, rep in zip(histories, repeats, strict=True)]]
    width = max(1, max((len(ids) for part in lists for ids in part), default=0))
    ids = torch.tensor([[ids + [vocab] * (width - len(ids)) for ids in part] for part in lists],
                       device=logits.device)  # [2, num_rows, width]
    counts = torch.zeros(2, num_rows, vocab + 1, device=logits.device).scatter_add_(
        2, ids, torch.ones_like(ids, dtype=torch.float32))[..., :vocab]  # [2, num_rows, vocab]
    output_counts = counts[0]
    if any(repeats):
        penalty = table[:, _REPETITION, None].float()
        seen = (output_counts + counts[1]) > 0
        logits = torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)
    if any(counts_output):
        logits = logits - table[:, _FREQUENCY, None].float() * output_counts
        logits = logits - table[:, _PRESENCE, None].float() * (output_counts > 0)
    return logits


def _suppress_stop_tokens(logits: torch.Tensor, params: list[SamplingParams],
                          histories: list[TokenHistory] | None) -> torch.Tensor:
    """min_tokens: a row whose output is still shorter cannot draw its stop tokens (EOS unless ignored, and
    stop_token_ids), as transformers' MinNewTokensLengthLogitsProcessor does for EOS."""
    if not any(p.min_tokens for p in params):
        return logits
    assert histories is not None, "min_tokens needs each row's token history"
    vocab = logits.shape[1]
    pairs = [(row, token) for row, (p, h) in enumerate(zip(params, histories, strict=True))
             if len(h.output_token_ids) < p.min_tokens for token in h.stop_token_ids if token < vocab]
    if not pairs:
        return logits
    rows, tokens = torch.tensor(pairs, device=logits.device).T
    return logits.index_put((rows, tokens), torch.tensor(float("-inf"), device=logits.device))


def _draw_tokens(scaled: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    """scaled [num_rows, vocab] (logits / temperature) -> the drawn token of every row, by inverse transform: the
    kept tokens in descending order, and the first whose cumulative probability passes the row's uniform number."""
    sorted_logits, order = _cut(scaled, table)
    cumulative = sorted_logits.double().softmax(-1).cumsum(-1)  # [num_rows, vocab]
    total = cumulative[:, -1:]
    # Below the total, so the first cumulative value past it belongs to a token of non-zero probability.
    target = torch.minimum(table[:, _UNIFORM, None] * total, torch.nextafter(total, torch.zeros_like(total)))
    index = torch.searchsorted(cumulative, target, right=True).clamp_(max=scaled.shape[1] - 1)  # [num_rows, 1]
    return order.gather(1, index)[:, 0]


def _cut(scaled: torch.Tensor, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """scaled [num_rows, vocab] -> (its values in descending order with the cut tokens at -inf, their token ids).
    Cuts in transformers' order (its TopK, TopP and MinP warpers): top-k, then top-p, then min-p."""
    vocab = scaled.shape[1]
    # Why always sort, even for rows without top-k or top-p: a row's token must not depend on its neighbours'
    # parameters, so every row walks its distribution in the same (descending) order.
    sorted_logits, order = scaled.sort(dim=-1, descending=True)  # [num_rows, vocab]
    top_k = table[:, _TOP_K].long()
    top_k = torch.where((top_k <= 0) | (top_k > vocab), vocab, top_k)
    kth_largest = sorted_logits.gather(1, (top_k - 1)[:, None])  # ties with the k-th stay, as in TopKLogitsWarper
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth_largest, float("-inf"))
    # In fp64: top_p is compared as sent (1e-300 in fp32 is 0, which dropped every token and made NaN).
    probs = sorted_logits.double().softmax(-1)
    top_p = table[:, _TOP_P, None]
    # Keep the smallest prefix whose mass reaches top_p: a token goes if the mass before it already does. Rows with
    # top_p 1 keep all (a rounded cumulative sum may reach 1 early), and the most likely token always stays.
    drop = ((probs.cumsum(-1) - probs) >= top_p) & (top_p < 1.0)
    drop[:, 0] = False
    sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    probs = sorted_logits.softmax(-1)  # fp32, as MinPLogitsWarper compares
    sorted_logits = sorted_logits.masked_fill(probs < table[:, _MIN_P, None].float() * probs[:, :1], float("-inf"))
    return sorted_logits, order


def processed_logits(logits: torch.Tensor, params: list[SamplingParams],
                     histories: list[TokenHistory] | None = None) -> torch.Tensor:
    """What each row is sampled from, [num_rows, vocab] in token order: the logits after penalties and min_tokens,
    and for sampled rows divided by the temperature with the cut tokens at -inf (the tests' view of the sampler)."""
    table = _row_table(params, [0.0] * len(params), logits.device)
    processed = _suppress_stop_tokens(_apply_penalties(logits, params, histories, table), params, histories)
    scaled = processed / table[:, _TEMPERATURE, None].float()
    sorted_logits, order = _cut(scaled, table)
    cut = torch.empty_like(scaled).scatter_(1, order, sorted_logits)
    return torch.where(table[:, _GREEDY, None].bool(), processed, cut)
