"""The incremental detokenizer (`tokenizers`' DecodeStream under OpenAI stop semantics):
what it streams is always a prefix of the whole decode, never half a character, and the
deltas joined are exactly `tokenizer.decode` of the output."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from server.engine.output import Detokenizer


@pytest.fixture(scope="module")
def tok(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def _byteish(tok, rng: random.Random, n: int) -> list[int]:
    """Random ids, half of them from tokens that are bytes of multi-byte characters."""
    text = "日本語 😀👍 テキスト café naïve Ωμέγα"
    pool = tok.encode(text)
    return [rng.choice(pool) if rng.random() < 0.5 else rng.randrange(tok.vocab_size) for _ in range(n)]


def test_decode_stream_is_used(tok):
    assert Detokenizer(tok)._stream is not None


@pytest.mark.parametrize("seed", range(20))
def test_streamed_text_is_a_prefix_and_joins_to_the_whole_decode(tok, seed):
    rng = random.Random(seed)
    ids = _byteish(tok, rng, 60)
    d = Detokenizer(tok, eos_token_id=tok.eos_token_id)
    sent = ""
    for i, t in enumerate(ids):
        d.add(t)
        sent += d.delta()
        whole = tok.decode([x for x in ids[:i + 1] if x != tok.eos_token_id])
        assert sent == whole.rstrip("\ufffd"), (sent, whole)  # all but an incomplete last character
    sent += d.delta(final=True)
    assert sent == d.final_text() == tok.decode([x for x in ids if x != tok.eos_token_id])


def test_a_character_split_over_tokens_waits_for_its_last_byte(tok):
    ids = tok.encode(" 😀")
    assert len(ids) >= 2
    d = Detokenizer(tok)
    d.add(ids[0])
    assert d.delta() == " "  # the space goes out, half an emoji does not
    for t in ids[1:]:
        d.add(t)
    assert d.delta() == "😀"


def test_stop_string_inside_streamed_pieces(tok):
    ids = tok.encode(" hello world, and more")
    d = Detokenizer(tok, stop=("o w",))
    assert any(d.add(t) for t in ids)  # stops adding at the first True, as the engine does
    assert d.final_text() == " hell"
