"""The training loop: AdamW + linear warm-up/decay, gradient accumulation, data
parallelism through `accelerate`, per-epoch evaluation, best-prompt tracking,
atomic checkpoints and exact resume.

Determinism: the data order of epoch e is `randperm(N, Generator().manual_seed(f(seed, e)))`;
dropout (off by default: the frozen model runs in eval mode, as it does when serving)
draws from the global torch RNG, whose state is checkpointed at optimizer-step
boundaries. Checkpoints are only ever taken at those boundaries, so a resumed run
replays exactly the steps an uninterrupted run takes.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from .checkpoint import check_fingerprint, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import Tokenized
from .model import collate, evaluate, prompt_parameter, token_losses


@dataclass
class LoopConfig:
    epochs: int = 10
    lr: float = 0.03  # as `polyprompt train --lr`
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.0
    warmup_steps: int | None = None
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    num_virtual_tokens: int = 20
    save_steps: int | None = None
    output_dir: Path | None = None
    resume: bool = False
    progress: bool = True
    dropout: bool = False  # the frozen model's dropout during training (off: eval mode)


@dataclass
class LoopResult:
    prompt: torch.Tensor  # the kept (best) prompt, [n, hidden] float32 on CPU
    history: list[dict[str, Any]] = field(default_factory=list)
    first_step_loss: float | None = None
    initial_eval: dict | None = None
    best_epoch: int = 0
    total_steps: int = 0
    resumed_from: int | None = None  # optimizer step the run resumed at


def _data_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 100003 + epoch)
    return torch.randperm(n, generator=g)


def train_loop(model, train: list[Tokenized], eval_data: list[Tokenized] | None, cfg: LoopConfig, *,
               accelerator, pad_id: int, fingerprint: dict[str, Any],
               log: Callable[[str], None] = print) -> LoopResult:
    from tqdm.auto import tqdm
    from transformers import get_linear_schedule_with_warmup

    W, rank = accelerator.num_processes, accelerator.process_index
    device = accelerator.device
    B, GA, N = cfg.batch_size, cfg.grad_accum, len(train)
    micro_per_epoch = math.ceil(N / (B * W))
    steps_per_epoch = math.ceil(micro_per_epoch / GA)
    total_steps = steps_per_epoch * cfg.epochs
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else round(cfg.warmup_ratio * total_steps)

    param = prompt_parameter(model)
    optimizer = torch.optim.AdamW([param], lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = get_linear_schedule_with_warmup(optimizer, warmup, total_steps)
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train(cfg.dropout)  # frozen base: eval mode (no dropout) unless --dropout

    # -- state (everything a checkpoint holds besides model/optimizer/scheduler)
    st: dict[str, Any] = {
        "epoch": 0, "micro_step": 0, "global_step": 0, "perm": None,
        "epoch_loss_sum": 0.0, "epoch_tokens": 0, "epoch_seconds": 0.0,
        "history": [], "first_step_loss": None, "initial_eval": None,
        "best_prompt": None, "best_eval_loss": None, "best_epoch": 0,
    }
    resumed_from = None
    if cfg.resume and cfg.output_dir is not None:
        ck = load_checkpoint(cfg.output_dir)
        if ck is None:
            log(f"no checkpoint in {cfg.output_dir}; starting from scratch")
        else:
            check_fingerprint(ck["fingerprint"], fingerprint, cfg.output_dir)
            with torch.no_grad():
                param.copy_(ck["prompt"].to(param.device))
            optimizer.load_state_dict(ck["optimizer"])
            scheduler.load_state_dict(ck["scheduler"])
            set_rng_state(ck["rng"][rank] if isinstance(ck["rng"], list) else ck["rng"])
            st.update({k: ck[k] for k in st})
            resumed_from = st["global_step"]
            log(f"resuming from {cfg.output_dir} at epoch {st['epoch'] + 1}, "
                f"step {st['global_step']}/{total_steps}")

    def checkpoint_state(rng) -> dict[str, Any]:
        return {**st, "prompt": param.detach().cpu().clone(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "rng": rng, "fingerprint": fingerprint,
                "total_steps": total_steps}

    def save(rng=None) -> None:
        rng = rng or rng_state()
        if W > 1:
            from accelerate.utils import gather_object
            rng = gather_object([rng])
        if accelerator.is_main_process and cfg.output_dir is not None:
            save_checkpoint(cfg.output_dir, checkpoint_state(rng))

    if st["initial_eval"] is None and eval_data:
        st["initial_eval"] = evaluate(model, eval_data, batch_size=B, pad_id=pad_id, device=device)
        log(f"initial eval loss {st['initial_eval']['loss']:.4f}, "
            f"accuracy {st['initial_eval']['accuracy']:.1%}")

    done_micro = st["epoch"] * micro_per_epoch + st["micro_step"]
    bar = tqdm(total=micro_per_epoch * cfg.epochs, initial=done_micro, unit="batch", dynamic_ncols=True,
               disable=(not cfg.progress or not accelerator.is_main_process) or None, leave=False)
    if W > 1 and resumed_from is None:
        torch.manual_seed(cfg.seed * 1009 + rank)  # independent dropout masks per process
    boundary_rng, snap = rng_state(), _snapshot(st)
    in_update = False
    win_loss = 0.0
    seen_tokens, t_run = 0, time.perf_counter()
    try:
        while st["epoch"] < cfg.epochs:
            epoch = st["epoch"]
            if st["perm"] is None:
                st["perm"] = _data_order(N, cfg.seed, epoch)
            perm = st["perm"].tolist()
            t_epoch = time.perf_counter() - st["epoch_seconds"]
            for m in range(st["micro_step"], micro_per_epoch):
                window = range((m // GA) * GA, min((m // GA + 1) * GA, micro_per_epoch))
                window_tokens = sum(train[i].num_label_tokens
                                    for w in window for i in perm[w * B * W:(w + 1) * B * W])
                global_idx = perm[m * B * W:(m + 1) * B * W]
                local = global_idx[rank::W]
                weights = [1.0] * len(local)
                if not local:  # uneven last batch: a zero-weight filler keeps DDP in step
                    local, weights = global_idx[:1], [0.0]
                batch = collate([train[i] for i in local], pad_id=pad_id, weights=weights)
                boundary = m == window[-1]
                sync = contextlib.nullcontext() if boundary or W == 1 else accelerator.no_sync(model)
                with sync:
                    losses, _, _ = token_losses(model, batch, device)
                    loss_sum = (losses.sum(dim=1) * batch.weight.to(device)).sum()
                    accelerator.backward(loss_sum * W / window_tokens)
                loss_sum = loss_sum.detach()
                win_loss = (0.0 if m == window[0] else win_loss) + float(loss_sum)
                st["epoch_loss_sum"] += float(loss_sum)
                st["epoch_tokens"] += int((batch.labels != -100).sum()) if weights[0] else 0
                seen_tokens += batch.num_tokens
                if boundary:
                    if st["first_step_loss"] is None:
                        st["first_step_loss"] = _reduce_sum(accelerator, win_loss) / window_tokens
                    in_update = True
                    if cfg.max_grad_norm and cfg.max_grad_norm > 0:
                        accelerator.clip_grad_norm_([param], cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
                    in_update = False
                    st["global_step"] += 1
                    st["micro_step"] = m + 1
                    st["epoch_seconds"] = time.perf_counter() - t_epoch
                    boundary_rng, snap = rng_state(), _snapshot(st)
                    if cfg.save_steps and st["global_step"] % cfg.save_steps == 0 and m + 1 < micro_per_epoch:
                        save(boundary_rng)
                bar.update(1)
                el = time.perf_counter() - t_run
                bar.set_postfix(loss=f"{float(losses.detach().sum()) / max(int((batch.labels != -100).sum()), 1):.4f}",
                                tok_s=f"{seen_tokens / el:.0f}" if el > 0 else "-")
            # ---- end of epoch: train loss, eval, keep the best, checkpoint
            seconds = time.perf_counter() - t_epoch
            train_loss = _reduce_sum(accelerator, st["epoch_loss_sum"]) / max(
                _reduce_sum(accelerator, st["epoch_tokens"]), 1)
            rec: dict[str, Any] = {"epoch": epoch + 1, "train_loss": train_loss, "seconds": seconds}
            if eval_data:
                ev = evaluate(model, eval_data, batch_size=B, pad_id=pad_id, device=device)
                rec.update(eval_loss=ev["loss"], eval_accuracy=ev["accuracy"])
                better = st["best_eval_loss"] is None or ev["loss"] < st["best_eval_loss"]
            else:
                better = True
            if better:
                st["best_prompt"] = param.detach().cpu().clone()
                st["best_eval_loss"] = rec.get("eval_loss")
                st["best_epoch"] = epoch + 1
            st["history"].append(rec)
            msg = f"epoch {epoch + 1}/{cfg.epochs}: train loss {train_loss:.4f}"
            if eval_data:
                msg += f", eval loss {rec['eval_loss']:.4f}, accuracy {rec['eval_accuracy']:.1%}" + \
                       (" (best)" if better else "")
            if accelerator.is_main_process:
                bar.write(msg + f", {seconds:.2f} s") if not bar.disable else log(msg + f", {seconds:.2f} s")
            st.update(epoch=epoch + 1, micro_step=0, perm=None, epoch_loss_sum=0.0, epoch_tokens=0,
                      epoch_seconds=0.0)
            boundary_rng, snap = rng_state(), _snapshot(st)
            save(boundary_rng)
    except KeyboardInterrupt:
        # parameters/optimizer/scheduler are still at the last step boundary unless the
        # interrupt landed inside the update itself; then the last saved checkpoint stands
        if cfg.output_dir is not None and not in_update and W == 1:
            st.clear()
            st.update(snap)
            save(boundary_rng)
            log(f"\ninterrupted; checkpoint at step {st['global_step']} saved in {cfg.output_dir} "
                "(continue with --resume)")
        raise
    finally:
        bar.close()
    return LoopResult(prompt=st["best_prompt"], history=st["history"], first_step_loss=st["first_step_loss"],
                      initial_eval=st["initial_eval"], best_epoch=st["best_epoch"], total_steps=total_steps,
                      resumed_from=resumed_from)


def _snapshot(st: dict[str, Any]) -> dict[str, Any]:
    """A copy of the loop state at a step boundary (tensors in it are replaced, never mutated)."""
    return {**st, "history": list(st["history"])}


def _reduce_sum(accelerator, value: float) -> float:
    if accelerator.num_processes == 1:
        return float(value)
    t = torch.tensor([float(value)], device=accelerator.device, dtype=torch.float64)
    return float(accelerator.reduce(t, reduction="sum")[0])
