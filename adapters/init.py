"""Initial soft prompts after PEFT's PromptTuningInit modes (TEXT, and sampled vocabulary rows);
`random` here draws N(0, std(wte)), where PEFT's RANDOM draws N(0, 1) (the trainer's random init)."""

from __future__ import annotations

import math
from typing import Any

import torch

from .peft_format import MAX_VIRTUAL_TOKENS, AdapterError

INIT_MODES = ("random", "text", "vocab")
_ALIASES = {"sample_vocab": "vocab"}


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator(device="cpu")
    if seed is None:
        g.seed()
    else:
        g.manual_seed(int(seed))
    return g


def initial_prompt(
    *,
    init: str,
    num_virtual_tokens: int,
    wte: Any,
    tokenizer: Any = None,
    init_text: str | None = None,
    seed: int | None = None,
) -> torch.Tensor:
    """A `[num_virtual_tokens, C]` float32 CPU prompt.

    - "text": PEFT's TEXT init: tokenize `init_text`, repeat to fill, truncate, take wte rows.
    - "vocab": PEFT's SAMPLE_VOCAB: random token ids (seeded) -> wte rows.
    - "random": normal(0, std of wte), seeded.
    `wte` is the `[V, C]` token-embedding matrix (an nn.Embedding is accepted too).
    """
    mode = _ALIASES.get(str(init).lower(), str(init).lower())
    if mode not in INIT_MODES:
        raise AdapterError(f"unknown init {init!r}; choose one of {', '.join(INIT_MODES)}")
    n = int(num_virtual_tokens)
    if not 1 <= n <= MAX_VIRTUAL_TOKENS:
        raise AdapterError(f"num_virtual_tokens must be 1..{MAX_VIRTUAL_TOKENS}, got {n}")
    weight = wte.weight if isinstance(wte, torch.nn.Module) else wte
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise AdapterError("wte must be a [vocab, hidden] tensor")
    vocab = weight.shape[0]
    with torch.no_grad():
        if mode == "text":
            if not init_text:
                raise AdapterError('init "text" needs init_text (the text whose token embeddings start the prompt)')
            if tokenizer is None:
                raise AdapterError('init "text" needs a tokenizer')
            ids = list(tokenizer(init_text)["input_ids"])
            if not ids:
                raise AdapterError(f"init_text {init_text!r} has no tokens")
            if len(ids) < n:
                ids = ids * math.ceil(n / len(ids))
            ids = ids[:n]
            if max(ids) >= vocab:
                raise AdapterError(f"init_text token id {max(ids)} is outside the model's vocab ({vocab})")
            out = weight[torch.tensor(ids, dtype=torch.long, device=weight.device)]
        elif mode == "vocab":
            ids_t = torch.randint(0, vocab, (n,), generator=_generator(seed), dtype=torch.long)
            out = weight[ids_t.to(weight.device)]
        else:
            std = float(weight.detach().float().std())
            out = torch.randn(n, weight.shape[1], generator=_generator(seed)) * std
    return out.detach().to(device="cpu", dtype=torch.float32).clone().contiguous()
