"""What to send and when: S-LoRA's synthetic workload, a fixed list for a closed loop, or a replayed JSONL trace.

A `Job` is one request: when it arrives (seconds from the start; 0 for a closed loop, which sends as soon as a slot
frees), which adapter (None: the base model), the prompt, and how many tokens to generate. Everything is drawn from one
seeded numpy Generator, so a seed names the workload.
"""

import json
import string
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from lora_server.loadtest.errors import LoadtestError


@dataclass(frozen=True)
class Job:
    arrival_s: float
    adapter: str | None
    prompt: str
    max_new_tokens: int
    adapter_rank: int = 0  # popularity rank, 1 = the most requested; 0 for the base model


@dataclass(frozen=True)
class SLoraWorkload:
    """S-LoRA's synthetic workload (Sheng et al. 2023, section 7): adapter k of n with probability ∝ k^-alpha,
    Gamma inter-arrivals of mean 1/rate and coefficient of variation cv, lengths uniform over the ranges."""
    rate: float  # requests per second
    cv: float
    alpha: float
    num_requests: int
    input_words: tuple[int, int]
    output_tokens: tuple[int, int]

    def __post_init__(self) -> None:
        if self.rate <= 0 or self.cv <= 0:
            raise LoadtestError(f"--rate and --cv must be positive, got {self.rate} and {self.cv}")
        if self.alpha < 0:
            raise LoadtestError(f"--alpha must be 0 or more, got {self.alpha}")
        for name, (low, high) in (("--input-words", self.input_words), ("--output-tokens", self.output_tokens)):
            if not 1 <= low <= high:
                raise LoadtestError(f"{name} must be a range LOW:HIGH with 1 <= LOW <= HIGH, got {low}:{high}")


def adapter_probabilities(num_adapters: int, alpha: float) -> np.ndarray:
    """p[k-1] ∝ k^-alpha for k = 1..n: rank 1 the most popular; alpha = 0 is uniform."""
    assert num_adapters >= 1, num_adapters
    weights = np.arange(1, num_adapters + 1, dtype=np.float64) ** -alpha
    return weights / weights.sum()


def gamma_arrivals(rng: np.random.Generator, rate: float, cv: float, num: int) -> np.ndarray:
    """Arrival times of `num` requests: Gamma gaps with shape 1/cv² and scale cv²/rate (mean 1/rate; cv = 1 is
    Poisson), the first request at time 0."""
    shape = 1.0 / cv**2
    gaps = rng.gamma(shape, 1.0 / (rate * shape), size=num)
    gaps[0] = 0.0
    return np.cumsum(gaps)


def slora_jobs(workload: SLoraWorkload, adapters: list[str], seed: int) -> list[Job]:
    """`adapters` in popularity order (the first is rank 1); an empty list sends everything to the base model."""
    rng = np.random.default_rng(seed)
    arrivals = gamma_arrivals(rng, workload.rate, workload.cv, workload.num_requests)
    picks = (rng.choice(len(adapters), size=workload.num_requests, p=adapter_probabilities(len(adapters),
                                                                                            workload.alpha))
             if adapters else np.full(workload.num_requests, -1))
    jobs = []
    for arrival, pick in zip(arrivals, picks, strict=True):
        words = int(rng.integers(workload.input_words[0], workload.input_words[1] + 1))
        new_tokens = int(rng.integers(workload.output_tokens[0], workload.output_tokens[1] + 1))
        adapter = adapters[pick] if pick >= 0 else None
        jobs.append(Job(float(arrival), adapter, random_prompt(rng, words), new_tokens, int(pick) + 1))
    return jobs


def random_prompt(rng: np.random.Generator, num_words: int) -> str:
    """Lowercase words and the demo's ` => ` cue: a prompt any tokenizer takes."""
    letters = np.array(list(string.ascii_lowercase))
    words = ["".join(rng.choice(letters, size=int(rng.integers(2, 7)))) for _ in range(num_words)]
    return " ".join(words) + " => "


def with_adapter(jobs: list[Job], adapter: str | None) -> list[Job]:
    """The same arrivals, prompts and lengths, every request on one adapter (or the base): the baselines."""
    return [Job(job.arrival_s, adapter, job.prompt, job.max_new_tokens, 0 if adapter is None else 1) for job in jobs]


def load_trace(path: Path) -> list[Job]:
    """One JSON object a line: {"timestamp": s, "adapter": id or null, "prompt": str, "max_new_tokens": n}; timestamps
    are made relative to the first, a missing one means "at once"; `adapter` may also be spelled `model`. Popularity
    ranks come from the trace's own counts."""
    rows = []
    try:
        lines = path.read_text().splitlines()
    except OSError as error:
        raise LoadtestError(f"cannot read the trace {path}: {error.strerror}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            rows.append((float(row.get("timestamp", 0.0)), row.get("adapter", row.get("model")), str(row["prompt"]),
                         int(row.get("max_new_tokens", 32))))
        except (ValueError, KeyError, TypeError, AttributeError) as error:
            raise LoadtestError(f"{path}:{number}: not a trace row ({type(error).__name__}: {error})") from None
    if not rows:
        raise LoadtestError(f"the trace {path} holds no requests")
    counts = Counter(adapter for _, adapter, _, _ in rows if adapter is not None)
    rank_of = {adapter: rank for rank, (adapter, _) in enumerate(counts.most_common(), 1)}
    start = min(row[0] for row in rows)
    return sorted((Job(arrival - start, adapter, prompt, new_tokens, rank_of.get(adapter, 0))
                   for arrival, adapter, prompt, new_tokens in rows), key=lambda job: job.arrival_s)
