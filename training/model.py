"""The frozen base model wrapped by PEFT prompt tuning, batching, loss and evaluation."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import Tokenized

INIT_MODES = {"random": "RANDOM", "text": "TEXT", "vocab": "SAMPLE_VOCAB"}


def build_peft_model(model_path: str, *, num_virtual_tokens: int, init: str,
                     init_text: str | None, seed: int):
    """`AutoModelForCausalLM` (float32, frozen) + a PEFT `PromptTuningConfig` (CAUSAL_LM).

    The prompt is initialised by PEFT itself: RANDOM (nn.Embedding's N(0, 1)), TEXT (the
    embeddings of `init_text`'s tokens, repeated/cut to length) or SAMPLE_VOCAB
    (embeddings of uniformly sampled vocabulary ids), after `torch.manual_seed(seed)`.
    """
    from peft import PromptTuningConfig, PromptTuningInit, TaskType, get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    base.requires_grad_(False)
    kwargs = {}
    if init == "text":
        kwargs = {"prompt_tuning_init_text": init_text, "tokenizer_name_or_path": model_path}
    config = PromptTuningConfig(
        task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=num_virtual_tokens,
        prompt_tuning_init=PromptTuningInit(INIT_MODES[init]),
        **kwargs,
    )
    torch.manual_seed(seed)
    model = get_peft_model(base, config)
    return model


def prompt_parameter(peft_model) -> torch.nn.Parameter:
    """The trainable soft prompt, [num_virtual_tokens, hidden]."""
    return peft_model.prompt_encoder[peft_model.active_adapter].embedding.weight


def context_length(config) -> int:
    for attr in ("n_positions", "max_position_embeddings", "n_ctx"):
        v = getattr(config, attr, None)
        if isinstance(v, int) and v > 0:
            return v
    raise ValueError("cannot tell the model's context length from its config")


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T]
    labels: torch.Tensor  # [B, T], -100 on prompt tokens and padding
    weight: torch.Tensor  # [B] 1.0, or 0.0 for filler rows (uneven data-parallel shards)
    num_tokens: int  # real (non-pad) input tokens, for tokens/s


def collate(items: list[Tokenized], *, pad_id: int, weights: list[float] | None = None) -> Batch:
    T = max(len(t.input_ids) for t in items)
    B = len(items)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    labels = torch.full((B, T), -100, dtype=torch.long)
    for i, t in enumerate(items):
        n = len(t.input_ids)
        ids[i, :n] = torch.tensor(t.input_ids)
        mask[i, :n] = 1
        labels[i, t.prompt_len:n] = ids[i, t.prompt_len:n]
    w = torch.tensor(weights if weights is not None else [1.0] * B, dtype=torch.float32)
    return Batch(ids, mask, labels, w, sum(len(t.input_ids) for t in items))


def token_losses(model, batch: Batch, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token cross-entropy, the logits' argmax and the labels, all [B, T'] (loss 0 where masked).

    PEFT's forward puts the soft prompt at positions 0..n-1; the logits at position
    n-1+t predict input token t, so the first input token is predicted from the last
    virtual token (exactly what PEFT's own `labels=` loss computes). Only the positions
    from the batch's earliest completion token on are sent through the LM head
    (`logits_to_keep`), so T' = T - (shortest prompt length).
    """
    ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    has_label = batch.labels != -100  # [B, T]
    first = int(has_label.float().argmax(dim=1).min())  # earliest completion token
    labels = batch.labels[:, first:].to(device)  # [B, T']
    keep = labels.shape[1] + 1  # positions n-1+first .. n+T-1 (the last one is dropped)
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits  # [B, T'+1, V]
    logits = logits[:, :-1, :]  # [B, T', V]
    losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                             ignore_index=-100, reduction="none").view(labels.shape)  # [B, T']
    return losses, logits.argmax(dim=-1), labels


@torch.no_grad()
def evaluate(model, data: list[Tokenized], *, batch_size: int, pad_id: int, device) -> dict:
    """Token-weighted eval loss and exact-match accuracy.

    Exact match: greedy decoding reproduces every completion token (and the EOS when
    appended). Greedy decoding with PEFT's forward (`generate(use_cache=False)`) emits
    the target iff at each completion position the argmax given the correct prefix is
    the target token, so one teacher-forced forward pass computes it exactly.
    """
    was_training = model.training
    model.eval()
    loss_sum, tokens, exact = 0.0, 0, 0
    try:
        for i in range(0, len(data), batch_size):
            batch = collate(data[i:i + batch_size], pad_id=pad_id)
            losses, pred, labels = token_losses(model, batch, device)
            keep = labels != -100
            loss_sum += float(losses.sum())
            tokens += int(keep.sum())
            exact += int(((pred == labels) | ~keep).all(dim=1).sum())
    finally:
        model.train(was_training)
    return {"loss": loss_sum / max(tokens, 1), "accuracy": exact / len(data),
            "exact": exact, "n": len(data)}
