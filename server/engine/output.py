"""What a request sends back: token ids, incremental text, stop strings, loop detection."""

from __future__ import annotations

from dataclasses import dataclass, field

from server.engine.sampler import TokenLogprob


@dataclass
class RequestOutput:
    req_id: str
    new_token_ids: list[int]
    text_delta: str
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "repetition" | "abort" | "error"
    num_prompt_tokens: int
    logprobs: list[TokenLogprob] | None = None
    token_ids: list[int] = field(default_factory=list)  # all output tokens, on the final output
    text: str = ""  # the whole completion, on the final output
    # the prompt's token log-probs (first None), on the request's first output, if asked for
    prompt_logprobs: list[TokenLogprob | None] | None = None


def _decode_stream(tokenizer):
    """`tokenizers`' incremental decoder for this tokenizer, or None where its pieces could
    differ from a whole `decode` (no fast backend, or clean-up of tokenization spaces on)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None, None
    try:
        from tokenizers.decoders import DecodeStream
    except ImportError:  # tokenizers < 0.21
        return None, None
    return DecodeStream(skip_special_tokens=False), backend


class Detokenizer:
    """Incremental detokenization with OpenAI stop-string semantics.

    The completion text never contains a stop string (it is cut there); while streaming,
    text that might be the start of a stop string is held back until it is not. Each new
    token is decoded on its own (`tokenizers.decoders.DecodeStream`, which holds back the
    bytes of a character still incomplete), not the whole output again; the final text is
    one whole `decode`, so it is exactly what the tokenizer gives.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...] = (), *, eos_token_id: int | None = None):
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.eos = eos_token_id
        self.ids: list[int] = []
        self.text = ""
        self.stopped_at: int | None = None
        self.sent = 0
        self._decoded = 0  # len(ids) when `text` was last decoded
        self._stream, self._backend = _decode_stream(tokenizer)
        self._committed = ""  # the stream's pieces so far
        self._pending: list[int] = []  # tokens since its last piece
        self._whole = False  # `text` is the whole decode (final)

    def _refresh(self, *, whole: bool = False) -> None:
        """`text` = the ids decoded (EOS left out), once per new token however often asked:
        a character still incomplete is left out while streaming (`whole`: decoded as the
        tokenizer does, U+FFFD and all)."""
        if self._stream is None or whole:
            if self._decoded != len(self.ids) or (whole and not self._whole):
                ids = self.ids if self.eos is None else [i for i in self.ids if i != self.eos]
                self.text = self.tokenizer.decode(ids)
                self._decoded, self._whole = len(self.ids), True
            return
        if self._whole:  # a whole decode already ran; carry on from it
            return self._refresh(whole=True)
        for tok in self.ids[self._decoded:]:
            if tok == self.eos:
                continue
            piece = self._stream.step(self._backend, tok)
            if piece is None:  # a character is incomplete: the stream holds this token back
                self._pending.append(tok)
            else:
                self._committed += piece
                self._pending.clear()
        self._decoded = len(self.ids)
        # what the held-back tokens already say before their incomplete character (a space
        # that shares a token with half a character is not held back)
        self.text = self._committed + (self.tokenizer.decode(self._pending).rstrip("\ufffd") if self._pending else "")

    def add(self, token_id: int) -> bool:
        """Record a token; True when a stop string has now appeared."""
        self.ids.append(token_id)
        if not self.stop:
            return False
        before = len(self.text)
        self._refresh()
        start = max(0, before - max(len(s) for s in self.stop))
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.stopped_at = min(hits)
            self.text = self.text[: self.stopped_at]
            return True
        return False

    def final_text(self) -> str:
        if self.stopped_at is None:
            self._refresh(whole=True)
        return self.text

    def delta(self, *, final: bool = False) -> str:
        """New text safe to send: no half-decoded character, no possible stop prefix."""
        if self.stopped_at is None:
            self._refresh(whole=final)
        safe = len(self.text)
        if not final and self.text.endswith("\ufffd"):
            safe = len(self.text.rstrip("\ufffd"))
        if self.stop and self.stopped_at is None and not final:
            for s in self.stop:
                for k in range(min(len(s) - 1, safe), 0, -1):
                    if self.text[:safe].endswith(s[:k]):
                        safe -= k
                        break
        if safe <= self.sent:
            return ""
        out = self.text[self.sent:safe]
        self.sent = safe
        return out


def detect_loop(ids: list[int], max_period: int = 16, min_repeats: int = 4, min_span: int = 32) -> bool:
    """True when the output ends in a block of <= max_period tokens repeated back to back.

    The repeated tail must cover at least `min_span` tokens and `min_repeats` periods.
    """
    n = len(ids)
    for p in range(1, max_period + 1):
        span = max(min_span, p * min_repeats)
        if n < span:
            continue
        tail = ids[n - span:]
        if all(tail[i] == tail[i - p] for i in range(p, span)):
            return True
    return False
