"""Streamed text through the HTTP API: multibyte characters and stop strings split across tokens.

GPT-2's byte-level tokens split most non-Latin characters: " 日本語" is six tokens, each
emoji two, and a token alone may be half a character. A stream must send a character only
once its last byte has arrived (never a U+FFFD for a character still being built), and a
stop string may end, begin or lie wholly inside tokens: the stream has to hold back any text
that could still turn out to start a stop string, and cut exactly where the non-streamed
answer is cut.

The tiny random test model never writes such text by itself, so a soft prompt is fitted
here (gradient descent on the frozen model, a few seconds) until greedy decoding writes
TARGET with a clear margin at every token; the server then serves it as an uploaded
version. Stop strings across ASCII token boundaries are taken from the random model's own
greedy output.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors.torch import save

from server.app import create_app
from tests.apiutil import settings

TARGET = " 日本語 😀👍 テキスト, café!"
PROMPT = "Say:"
N_VIRTUAL = 16


def _fit_prompt(model_dir, prompt_ids: list[int], target_ids: list[int]) -> torch.Tensor:
    """A `[N_VIRTUAL, C]` soft prompt under which the model's greedy continuation of
    `prompt_ids` is `target_ids`, every target logit ahead of the runner-up by > 2."""
    from transformers import GPT2LMHeadModel

    model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
    model.requires_grad_(False)
    wte = model.transformer.wte.weight
    g = torch.Generator().manual_seed(0)
    soft = (torch.randn(N_VIRTUAL, wte.shape[1], generator=g) * wte.std()).requires_grad_(True)
    opt = torch.optim.Adam([soft], lr=0.05)
    ids, want = torch.tensor(prompt_ids + target_ids[:-1]), torch.tensor(target_ids)
    first = N_VIRTUAL + len(prompt_ids) - 1  # the position whose logits give the first target token
    for _ in range(300):
        logits = model(inputs_embeds=torch.cat([soft, wte[ids]])[None]).logits[0, first:]
        right = logits.gather(1, want[:, None])[:, 0]
        margin = (right - logits.scatter(1, want[:, None], float("-inf")).max(-1).values).min().item()
        if margin > 2.0:
            return soft.detach().clone()
        opt.zero_grad()
        torch.nn.functional.cross_entropy(logits, want).backward()
        opt.step()
    raise AssertionError(f"could not fit a prompt that writes {TARGET!r} (margin {margin:.2f})")


@pytest.fixture(scope="module")
def client(tiny_model_dir, tmp_path_factory):
    with TestClient(create_app(settings(tiny_model_dir, tmp_path_factory.mktemp("data-stream-text")))) as c:
        rt = c.app.state.runtime
        soft = _fit_prompt(tiny_model_dir, rt.encode(PROMPT), rt.encode(TARGET))
        assert c.post("/v1/tasks", json={"name": "mb", "num_virtual_tokens": N_VIRTUAL}).status_code == 201
        files = {"adapter_model.safetensors": ("adapter_model.safetensors", save({"prompt_embeddings": soft}))}
        assert c.post("/v1/tasks/mb/prompt", files=files).status_code == 201
        yield c


@pytest.fixture(scope="module")
def base_id(tiny_model_dir) -> str:
    return Path(tiny_model_dir).resolve().name


def _body(model: str, max_tokens: int, **kw) -> dict:
    return {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, **kw}


def _complete(client, **body) -> dict:
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def _stream(client, **body) -> list[dict]:
    """The choice of every text chunk of a streamed completion, in order (the `[DONE]` checked)."""
    r = client.post("/v1/completions", json={**body, "stream": True})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    blocks = [b for b in r.text.split("\n\n") if b.strip()]
    assert all(b.startswith("data: ") for b in blocks) and blocks[-1] == "data: [DONE]", blocks[-2:]
    events = [json.loads(b[len("data: "):]) for b in blocks[:-1]]
    return [e["choices"][0] for e in events if e["choices"]]


def _token_starts(client, ids: list[int]) -> list[int]:
    """Where each token's text starts in the decoded whole (characters); a token that ends
    inside a character starts where that character does."""
    tok = client.app.state.runtime.tokenizer
    return [len(tok.decode(ids[:i]).rstrip("\ufffd")) for i in range(len(ids))]


# ------------------------------------------------------------------ multibyte text

def test_target_has_characters_split_across_tokens(client):
    """The test's premise: TARGET has tokens that are not text by themselves."""
    rt = client.app.state.runtime
    ids = rt.encode(TARGET)
    halves = [i for i in ids if "\ufffd" in rt.tokenizer.decode([i])]
    assert len(halves) >= 8 and len(ids) > len(TARGET.split()), (ids, halves)


def test_stream_of_multibyte_text_is_exact_and_never_half_a_character(client):
    n = len(client.app.state.runtime.encode(TARGET))
    want = _complete(client, **_body("mb", n))
    assert want["text"] == TARGET and want["finish_reason"] == "length"
    chunks = _stream(client, **_body("mb", n))
    assert [t for c in chunks for t in c["token_ids"]] == want["token_ids"]
    assert not [c["text"] for c in chunks if "\ufffd" in c["text"]]
    assert "".join(c["text"] for c in chunks) == TARGET
    # and nothing is held back longer than needed: after each token, everything up to the last
    # complete character has been sent
    tok = client.app.state.runtime.tokenizer
    sent, ids = "", []
    for c in chunks:
        sent += c["text"]
        ids += c["token_ids"]
        assert sent == tok.decode(ids).rstrip("\ufffd"), (ids, sent)
    assert chunks[-1]["finish_reason"] == "length"
    assert all(c["finish_reason"] is None for c in chunks[:-1])


@pytest.mark.parametrize("n", [1, 4, 8], ids=["inside-日", "inside-本", "inside-😀"])
def test_max_tokens_inside_a_character_ends_both_answers_alike(client, n):
    """Cut by `max_tokens` in the middle of a character: the answer ends in U+FFFD, and the
    stream sends that U+FFFD only in its last chunk, so both still join to the same text."""
    rt = client.app.state.runtime
    want = _complete(client, **_body("mb", n))
    assert want["text"] == rt.tokenizer.decode(rt.encode(TARGET)[:n]) and want["text"].endswith("\ufffd")
    chunks = _stream(client, **_body("mb", n))
    assert "".join(c["text"] for c in chunks) == want["text"]
    assert not [c["text"] for c in chunks[:-1] if "\ufffd" in c["text"]]


# ------------------------------------------------------------------ stop strings across tokens

@pytest.mark.parametrize("stop", [
    "本",  # one character, two byte tokens
    "語 😀",  # the end of one split character to the middle of the next split one
    "😀👍",  # two emoji, four tokens
    "キス",  # a whole token and the first character of the next: "キ" must be held back
    "ト, ca",  # from inside one token to inside another
    ["zzz", "テキ", "キスト"],  # several, the earliest match wins
], ids=["one-char", "split-to-split", "two-emoji", "token-and-char", "inside-to-inside", "several"])
def test_stop_string_across_tokens_cuts_the_stream_as_the_answer(client, stop):
    rt = client.app.state.runtime
    ids = rt.encode(TARGET)
    stops = [stop] if isinstance(stop, str) else stop
    first = min(TARGET.find(s) for s in stops if s in TARGET)
    match = next(s for s in stops if TARGET.find(s) == first)
    # the premise: the stop string's characters come from two or more tokens
    spans = rt.tokenizer(TARGET, return_offsets_mapping=True)["offset_mapping"]  # characters of each token
    assert sum(a < first + len(match) and b > first for a, b in spans) >= 2, (match, spans)
    want = _complete(client, **_body("mb", len(ids), stop=stop))
    assert want["finish_reason"] == "stop" and want["text"] == TARGET[:first]
    chunks = _stream(client, **_body("mb", len(ids), stop=stop))
    assert "".join(c["text"] for c in chunks) == TARGET[:first]
    assert not [c["text"] for c in chunks if "\ufffd" in c["text"]]
    assert chunks[-1]["finish_reason"] == "stop"


@pytest.mark.parametrize("stop", ["!?", "テキスト, café!!", "é!x"], ids=["last-char", "long", "two-chars"])
def test_a_stop_prefix_at_the_end_is_sent_when_the_answer_ends(client, stop):
    """The answer ends on what could have been the start of a stop string: held back while
    streaming, it must still arrive, in the last chunk."""
    ids = client.app.state.runtime.encode(TARGET)
    want = _complete(client, **_body("mb", len(ids), stop=stop))
    assert want["text"] == TARGET and want["finish_reason"] == "length"
    chunks = _stream(client, **_body("mb", len(ids), stop=stop))
    assert "".join(c["text"] for c in chunks) == TARGET
    held = next(k for k in range(len(stop), 0, -1) if TARGET.endswith(stop[:k]))
    assert chunks[-1]["text"].endswith(TARGET[-held:])
    assert "".join(c["text"] for c in chunks[:-1]) == TARGET[: len(TARGET) - len(chunks[-1]["text"])]


def test_stop_strings_across_the_random_models_token_boundaries(client, base_id):
    """Stop strings cut from the base model's own greedy output: two characters either side
    of a token boundary, and one spanning three tokens."""
    full = _complete(client, **_body(base_id, 24))
    text, ids = full["text"], full["token_ids"]
    starts = _token_starts(client, ids) + [len(text)]
    stops = []
    for i in range(1, len(ids) - 1):
        a, b, c = starts[i - 1], starts[i], starts[i + 1]
        if b - a >= 2 and c - b >= 2 and "\ufffd" not in text[a:c]:
            stops.append(text[b - 2:b + 2])
        if i + 2 < len(starts) and b - a >= 2 and "\ufffd" not in text[a:starts[i + 2]]:
            stops.append(text[b - 1:starts[i + 1] + 1])  # the end of token i-1 .. the start of token i+1
    assert len(stops) >= 4, (text, ids)
    for stop in stops[:8]:
        cut = text[:text.find(stop)]
        want = _complete(client, **_body(base_id, 24, stop=stop))
        assert want["text"] == cut and want["finish_reason"] == "stop", stop
        chunks = _stream(client, **_body(base_id, 24, stop=stop))
        assert "".join(c["text"] for c in chunks) == cut, stop
        assert chunks[-1]["finish_reason"] == "stop"
