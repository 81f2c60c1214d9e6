"""The reference: what PEFT itself computes for a prompt-tuning adapter (float32).

Always `PeftModel.generate(..., use_cache=False)`: with transformers 5.24 + peft 0.21
PEFT's *cached* generate re-inserts the soft prompt at every step and is wrong.
"""

from __future__ import annotations

import copy

import torch
from peft import PromptTuningConfig, get_peft_model


def peft_model(base, embeddings: torch.Tensor):
    cfg = PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=int(embeddings.shape[0]))
    pm = get_peft_model(copy.deepcopy(base), cfg).eval()
    with torch.no_grad():
        pm.prompt_encoder["default"].embedding.weight.copy_(embeddings)
    return pm


@torch.no_grad()
def peft_greedy(pm, ids: list[int], max_new_tokens: int, *, eos: int = 50256) -> list[int]:
    x = torch.tensor([ids])
    out = pm.generate(input_ids=x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                      do_sample=False, use_cache=False, pad_token_id=eos, eos_token_id=eos)
    return out[0, len(ids):].tolist()


base_greedy = peft_greedy  # the same call on the plain base model (no soft prompt)
