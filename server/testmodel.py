"""Randomly initialised GPT-2 checkpoints for offline tests, demos and benchmarks.

Random weights cost exactly what real ones do. We use a larger init std than GPT-2's
0.02 so that greedy output varies with the input (at 0.02 a random model mostly
repeats one token, and a test comparing outputs could pass with the wrong adapter).
"""

from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_DIR = Path(__file__).parent / "assets" / "gpt2_tokenizer"
TOKENIZER_FILES = ("vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json")

SIZES = {
    # name: (n_layer, n_head, n_embd)
    "tiny": (2, 4, 128),
    "small": (12, 12, 768),  # the real GPT-2 124M shape
}


def make_test_model(out: str | Path, *, size: str = "tiny", seed: int = 0, init_std: float = 0.12) -> Path:
    """Write a random GPT-2 of `size` plus the GPT-2 tokenizer to `out` and return it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {sorted(SIZES)}")
    n_layer, n_head, n_embd = SIZES[size]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config = GPT2Config(
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_positions=1024,
        vocab_size=50257, initializer_range=init_std,
        bos_token_id=50256, eos_token_id=50256,
    )
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(out)
    for name in TOKENIZER_FILES:
        shutil.copyfile(TOKENIZER_DIR / name, out / name)
    return out
