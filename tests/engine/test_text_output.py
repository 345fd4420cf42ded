"""Incremental detokenization: after every token the text is exactly a full decode of the output so far (demo
tokenizer, a byte-level BPE whose tokens split multi-byte characters, a word-level one), while each update decodes
only a short window; stop strings across token boundaries, include_stop and min_tokens."""

from functools import cache

from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lora_server.demo.paths import DEMO_MODEL_DIR
from lora_server.engine.text_output import IncrementalDecoder, IncrementalText
from lora_server.model.tokenizer import load_tokenizer

CORPUS = ["héllo wörld, ünïcödé façade naïve", "日本語のテキスト、漢字とかな", "emoji 😀🎉👍🏽 and ✓ marks",
          "Ελληνικά και русский текст", "plain ascii text with spaces"] * 20


@cache
def demo_tokenizer():
    return load_tokenizer(DEMO_MODEL_DIR)


@cache
def byte_level_tokenizer() -> Tokenizer:
    """A tiny trained byte-level BPE: every byte is a token, and merges make tokens that end mid-character."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  special_tokens=["<eos>"])
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


@cache
def metaspace_tokenizer() -> Tokenizer:
    """SentencePiece-like (Llama's): "▁" for spaces, whose decoder drops the first token's leading space."""
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace()
    tokenizer.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<eos>"])
    tokenizer.train_from_iterator(CORPUS, trainer)
    return tokenizer


@cache
def word_level_tokenizer() -> Tokenizer:
    tokenizer = Tokenizer(models.WordLevel({f"t{i}": i for i in range(50)}, unk_token="t0"))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tokenizer


def decoders_under_test():
    byte_level, words, metaspace = byte_level_tokenizer(), word_level_tokenizer(), metaspace_tokenizer()
    return {
        "metaspace": (lambda ids: metaspace.decode(ids, skip_special_tokens=True), metaspace.get_vocab_size()),
        "demo": (demo_tokenizer().decode, demo_tokenizer().backend.get_vocab_size()),
        "byte-level": (lambda ids: byte_level.decode(ids, skip_special_tokens=True), byte_level.get_vocab_size()),
        "word-level": (lambda ids: words.decode(ids, skip_special_tokens=True), words.get_vocab_size()),
    }


def check_matches_full_decode(decode, ids: list[int], chunk_sizes: list[int]) -> None:
    decoder, fed = IncrementalDecoder(decode), 0
    for size in chunk_sizes:
        if fed >= len(ids):
            break
        decoder.feed(ids[fed:fed + size])
        fed = min(fed + size, len(ids))
        assert decoder.text == decode(ids[:fed]), (ids[:fed], decoder.text, decode(ids[:fed]))
    decoder.feed(ids[fed:])
    assert decoder.text == decode(ids)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), name=st.sampled_from(["demo", "byte-level", "word-level", "metaspace"]))
def test_the_text_is_a_full_decode_after_every_token(data, name):
    decode, vocab = decoders_under_test()[name]
    ids = data.draw(st.lists(st.integers(0, vocab - 1), max_size=40), label="ids")
    sizes = data.draw(st.lists(st.integers(1, 3), min_size=40, max_size=40), label="chunk sizes")
    check_matches_full_decode(decode, ids, sizes)


@settings(max_examples=100, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(sorted(set("".join(CORPUS)))), max_size=60))
def test_real_text_split_anywhere_mid_character_comes_back_whole(text):
    tokenizer = byte_level_tokenizer()
    ids = tokenizer.encode(text).ids
    check_matches_full_decode(lambda i: tokenizer.decode(i), ids, [1] * len(ids))
    assert tokenizer.decode(ids) == text


def test_multi_byte_characters_split_across_tokens_are_held_until_whole():
    tokenizer = byte_level_tokenizer()
    # One token per byte: the emoji's 4 bytes in 4 tokens.
    ids = [tokenizer.token_to_id(byte_char(b)) for b in "a😀".encode()]
    decoder = IncrementalDecoder(tokenizer.decode)
    texts = []
    for token in ids:
        decoder.feed([token])
        texts.append(decoder.text)
    assert texts[-1] == "a😀" and all(t.endswith("\ufffd") for t in texts[1:-1]), texts


def byte_char(byte: int) -> str:
    """The byte-level alphabet's character for `byte` (GPT-2's bytes_to_unicode)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    if byte in printable:
        return chr(byte)
    return chr(256 + [b for b in range(256) if b not in printable].index(byte))


def test_each_update_decodes_a_bounded_window():
    tokenizer = demo_tokenizer()
    lengths = []

    def counting_decode(ids):
        lengths.append(len(ids))
        return tokenizer.decode(ids)

    ids = tokenizer.encode("the quick brown fox jumps over the lazy dog " * 12)[1:] + [2] * 50  # then EOS after EOS
    decoder = IncrementalDecoder(counting_decode)
    for token in ids:
        decoder.feed([token])
    assert decoder.text == tokenizer.decode(ids)
    assert max(lengths) <= 3, max(lengths)  # the previous token for context, the new one


def test_stop_strings_across_tokens_include_stop_and_min_tokens():
    tokenizer = demo_tokenizer()
    ids = tokenizer.encode("one two three two")[1:]
    plain = IncrementalText(tokenizer.decode, ("two",))
    kept = IncrementalText(tokenizer.decode, ("two",), include_stop=True)
    late = IncrementalText(tokenizer.decode, ("two",), min_tokens=len("one tw"))  # the first "two" ends past it
    later = IncrementalText(tokenizer.decode, ("two",), min_tokens=len("one two"))
    for n in range(1, len(ids) + 1):
        for text in (plain, kept, late, later):
            text.update(ids[:n])
    assert (plain.text, kept.text, late.text, later.text) == ("one ", "one two", "one ", "one two three ")
    assert all(t.stopped for t in (plain, kept, late, later))
    without_last = IncrementalText(tokenizer.decode)
    without_last.update(ids, len(ids) - 1)
    assert without_last.text == "one two three tw" and without_last.take_delta(final=True) == without_last.text


def test_a_token_with_no_text_does_not_become_the_next_tokens_context():
    tokenizer = metaspace_tokenizer()
    eos = tokenizer.token_to_id("<eos>")
    ids = tokenizer.encode("façade naïve").ids
    ids = ids[:1] + [eos, eos] + ids[1:]  # skipped in decode: the next word must keep its leading space
    check_matches_full_decode(lambda i: tokenizer.decode(i, skip_special_tokens=True), ids, [1] * len(ids))
