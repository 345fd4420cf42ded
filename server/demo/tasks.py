"""The demo's string tasks: what the base model and each demo adapter were trained to do.

A prompt is ``"<text> => "``; the base model continues it with a copy of the text and then EOS, and each demo
adapter continues it with its own transformation of the text. Plain Python, so tests, the training script and the
README all draw from the same definitions.
"""

import codecs
import random
from collections.abc import Callable

PROMPT_SUFFIX = " => "
MIN_TEXT_CHARS = 5
MAX_TEXT_CHARS = 24
MAX_WORD_CHARS = 8
LETTERS = "abcdefghijklmnopqrstuvwxyz"
# The held-out texts of the acceptance test; training never sees them.
EVAL_SEED = 1234
NUM_EVAL_TEXTS = 200


def make_prompt(text: str) -> str:
    return text + PROMPT_SUFFIX


def random_text(rng: random.Random) -> str:
    """Words of lowercase letters joined by single spaces, 5-24 characters in all."""
    target_len = rng.randint(MIN_TEXT_CHARS, MAX_TEXT_CHARS)
    text = ""
    while len(text) < target_len:
        word = "".join(rng.choice(LETTERS) for _ in range(rng.randint(1, MAX_WORD_CHARS)))
        text = word if not text else f"{text} {word}"
    # Cutting may leave a trailing space; strip it and top up with a letter so every length stays reachable.
    text = text[:target_len].rstrip(" ")
    while len(text) < MIN_TEXT_CHARS:
        text += rng.choice(LETTERS)
    return text


def _title(text: str) -> str:
    # str.title() would also capitalize after non-letters; our texts hold only letters and single spaces.
    return " ".join(word[:1].upper() + word[1:] for word in text.split(" "))


# name -> transformation; "copy" is what the base model does with no adapter.
TRANSFORMS: dict[str, Callable[[str], str]] = {
    "copy": lambda text: text,
    "upper": str.upper,
    "reverse": lambda text: text[::-1],
    "rot13": lambda text: codecs.encode(text, "rot13"),
    "title": _title,
}

ADAPTER_NAMES = ("upper", "reverse", "rot13", "title")


def held_out_texts(num: int, seed: int, exclude: set[str] | None = None) -> list[str]:
    """`num` distinct texts drawn with `seed`, none of them in `exclude` (the training texts)."""
    rng = random.Random(seed)
    exclude = exclude or set()
    texts: list[str] = []
    seen: set[str] = set()
    while len(texts) < num:
        text = random_text(rng)
        if text not in seen and text not in exclude:
            seen.add(text)
            texts.append(text)
    return texts
