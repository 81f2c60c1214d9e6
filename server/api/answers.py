"""Pieces of OpenAI's answer shapes: `usage`, and the legacy completions `logprobs` object
(token strings, log-probs, top alternatives, text offsets), echo included."""

from __future__ import annotations

from server.runtime import Runtime


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    """OpenAI's `usage` object (the user's tokens; virtual tokens are not counted)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _logprob_rows(rt: Runtime, rows, pos: int, end: int | None = None) -> dict:
    """OpenAI's legacy `logprobs` columns for `(token id, TokenLogprob or None)` rows whose
    text starts at offset `pos` (offsets capped at `end`, the text's length, where tokens
    split a character); None: no log-prob (the prompt's first token)."""
    dec = rt.tokenizer.decode
    tokens, values, tops, offsets = [], [], [], []
    for tok, lp in rows:
        s = dec([tok])
        tokens.append(s)
        values.append(None if lp is None else lp.logprob)
        tops.append({dec([t]): v for t, v in lp.top} if lp is not None and lp.top else None)
        offsets.append(pos if end is None else min(pos, end))
        pos += len(s)
    return {"tokens": tokens, "token_logprobs": values, "top_logprobs": tops, "text_offset": offsets}


def logprobs_json(rt: Runtime, out_logprobs, text_offset: int = 0) -> dict | None:
    """OpenAI legacy completions `logprobs` object."""
    if out_logprobs is None:
        return None
    return _logprob_rows(rt, ((lp.token_id, lp) for lp in out_logprobs), text_offset)


def echo_logprobs(rt: Runtime, prompt_ids: list[int], prompt_lps, completion: dict | None,
                  prompt_chars: int) -> dict:
    """Legacy completions `logprobs` with echo: the prompt's tokens first (the first one's
    log-prob null: nothing comes before it), then the completion's (`completion`, offsets
    from the completion's start; the prompt's text is `prompt_chars` long)."""
    out = _logprob_rows(rt, zip(prompt_ids, prompt_lps or [None] * len(prompt_ids)), 0, prompt_chars)
    if completion is not None:
        for k in ("tokens", "token_logprobs", "top_logprobs"):
            out[k] += completion[k]
        out["text_offset"] += [prompt_chars + o for o in completion["text_offset"]]
    return out
