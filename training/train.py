"""`python -m training.train` / `polyprompt train`: prompt-tune one task and register it.

Exit codes: 0 registered; 2 bad data, bad flags, a checkpoint from another run or a
registration target that refuses (nothing trained or registered); 1 another failure;
130 interrupted (nothing registered; resume with --resume). Runs unchanged under
`accelerate launch` (data parallel; only the main process registers).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from registry.settings import RegistrySettings, add_flags, from_args

EXIT_OK, EXIT_FAIL, EXIT_BAD, EXIT_INTERRUPTED = 0, 1, 2, 130


class TrainSettings(RegistrySettings):
    """Every `polyprompt train` setting: a flag and a POLYPROMPT_* variable, generated."""

    task: str = Field(description="task name (a-z 0-9 . _ -)")
    data: str = Field(description='training JSONL: {"prompt": ..., "completion": ...} a line')
    eval_data: str | None = Field(None, description="evaluation JSONL (loss and exact-match accuracy each epoch)")
    num_virtual_tokens: int = Field(20, description="virtual tokens of the soft prompt")
    init: Literal["random", "text", "vocab"] | None = Field(
        None, description="prompt init: random (PEFT RANDOM), text (embeddings of --init-text), vocab (sampled "
                          "vocabulary embeddings); default: text with --init-text, else random")
    init_text: str | None = Field(None, description="text whose embeddings start the prompt (--init text)")
    epochs: int = Field(10, description="passes over the training data")
    lr: float = Field(0.03, description="learning rate")
    batch_size: int = Field(8, description="examples per device per micro-batch")
    grad_accum: int = Field(1, description="micro-batches per optimizer step")
    warmup_ratio: float = Field(0.0, description="fraction of the steps spent warming up")
    warmup_steps: int | None = Field(None, description="warm-up steps (overrides --warmup-ratio)")
    weight_decay: float = Field(0.0, description="AdamW weight decay")
    max_grad_norm: float = Field(1.0, description="gradient clipping (0 = off)")
    max_length: int | None = Field(None, description="max tokens per example (prompt + completion); default: "
                                                     "the context minus the virtual tokens")
    skip_long: bool = Field(False, description="skip (and count) examples that are too long")
    no_eos: bool = Field(False, description="do not append EOS to completions")
    dropout: bool = Field(False, description="keep the frozen model's dropout on while training (default: off, "
                                             "as when serving)")
    seed: int = Field(0, description="random seed")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N")
    output_dir: str | None = Field(None, description="keep checkpoints (and the final adapter folder) here")
    save_steps: int | None = Field(None, description="also checkpoint every N optimizer steps")
    resume: bool = Field(False, description="continue from the checkpoint in --output-dir")
    create: bool = Field(False, description="create the task if it does not exist")
    description: str = Field("", description="description for a task created with --create")
    server: str | None = Field(None, description="upload to this polyprompt server instead of writing the registry")
    no_progress: bool = Field(False, description="no progress bar")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="polyprompt train",
        description="Train a task's soft prompt (PEFT prompt tuning on the frozen base model) and register "
                    "it as the task's new active version. Every flag also reads POLYPROMPT_<FLAG>.")
    add_flags(p, TrainSettings)
    return p


def parse_args(argv: list[str] | None = None) -> tuple[argparse.ArgumentParser, TrainSettings]:
    p = build_parser()
    return p, from_args(TrainSettings, p.parse_args(argv), p)


def _check_args(p: argparse.ArgumentParser, a: TrainSettings) -> None:
    if a.init is None:
        a.init = "text" if a.init_text else "random"
    if a.init == "text" and not a.init_text:
        p.error("--init text needs --init-text")
    for name in ("num_virtual_tokens", "epochs", "batch_size", "grad_accum"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if a.lr <= 0:
        p.error("--lr must be > 0")
    if not 0 <= a.warmup_ratio <= 1:
        p.error("--warmup-ratio must be in [0, 1]")
    if a.save_steps is not None and a.save_steps < 1:
        p.error("--save-steps must be >= 1")
    if (a.resume or a.save_steps) and not a.output_dir:
        p.error("--resume and --save-steps need --output-dir")


def _err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    _check_args(parser, args)
    from .checkpoint import CheckpointError
    from .data import DataError
    from .register import RegisterError

    try:
        return _run(args)
    except (DataError, CheckpointError, RegisterError) as e:
        _err(str(e))
        return EXIT_BAD
    except KeyboardInterrupt:
        _err("interrupted; nothing registered" + (" (continue with --resume)" if args.output_dir else ""))
        return EXIT_INTERRUPTED


def _run(args: TrainSettings) -> int:
    import torch
    from accelerate import Accelerator
    from transformers import AutoConfig, AutoTokenizer

    from registry.paths import model_id_for

    from .data import load_jsonl, tokenize
    from .loop import train_loop
    from .model import build_peft_model, context_length
    from .register import LocalTarget, ServerTarget

    # 1. data (fails fast, before any model is loaded)
    train_ex = load_jsonl(args.data)
    eval_ex = load_jsonl(args.eval_data) if args.eval_data else None

    # 2. the registration target must accept the result before we spend time training
    config = AutoConfig.from_pretrained(args.model)
    hidden = int(getattr(config, "n_embd", None) or config.hidden_size)
    model_id = model_id_for(args.model)
    if args.device.startswith("cuda:"):
        torch.cuda.set_device(int(args.device.split(":", 1)[1]))
    accelerator = Accelerator(cpu=args.device == "cpu")
    main_proc = accelerator.is_main_process
    log = print if main_proc else (lambda *a, **k: None)
    if args.server:
        target = ServerTarget(args.server, args.task, create=args.create, description=args.description)
    else:
        from registry.cli_common import open_registry

        target = LocalTarget(open_registry(args), args.task, create=args.create, model_id=model_id,
                             hidden_size=hidden, description=args.description)
    if main_proc:
        target.check()

    # 3. tokenization and validation against the context
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ctx = context_length(config)
    tok_kw = dict(num_virtual_tokens=args.num_virtual_tokens, context=ctx, max_length=args.max_length,
                  add_eos=not args.no_eos, skip_long=args.skip_long)
    train_data, skipped = tokenize(train_ex, tokenizer, path=args.data, **tok_kw)
    eval_data, eval_skipped = tokenize(eval_ex, tokenizer, path=args.eval_data, **tok_kw) if eval_ex else (None, 0)
    if skipped or eval_skipped:
        log(f"skipped {skipped} training and {eval_skipped} eval examples longer than the context (--skip-long)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)

    # 4. model and training
    model = build_peft_model(args.model, num_virtual_tokens=args.num_virtual_tokens, init=args.init,
                             init_text=args.init_text, seed=args.seed)
    model.to(accelerator.device)
    cfg, hyper, fingerprint = _loop_config(args, accelerator.num_processes, model_id)
    log(f"training task {args.task!r} on {model_id} ({accelerator.device}, {accelerator.num_processes} "
        f"process(es)): {len(train_data)} examples, {args.num_virtual_tokens} virtual tokens, "
        f"init {args.init}, {args.epochs} epochs")
    t0 = time.perf_counter()
    res = train_loop(model, train_data, eval_data, cfg, accelerator=accelerator, pad_id=pad_id,
                     fingerprint=fingerprint, log=log)
    wall = time.perf_counter() - t0
    accelerator.wait_for_everyone()
    if not main_proc:
        return EXIT_OK

    # 5. register (main process only) and summarise
    _register_and_report(args, res, config, target, cfg, hyper, fingerprint, wall=wall,
                         counts=(len(train_data), len(eval_data or []), skipped + eval_skipped))
    return EXIT_OK


def _loop_config(args: TrainSettings, world_size: int, model_id: str):
    """The loop's configuration, the hyperparameters recorded with the version, and the
    fingerprint a checkpoint must match to be resumed (hyperparameters + data hashes)."""
    from common import sha256_file

    from .loop import LoopConfig

    hyper = {k: getattr(args, k) for k in (
        "num_virtual_tokens", "init", "init_text", "epochs", "lr", "batch_size", "grad_accum", "warmup_ratio",
        "warmup_steps", "weight_decay", "max_grad_norm", "max_length", "skip_long", "no_eos", "dropout", "seed")}
    hyper["world_size"] = world_size
    fingerprint = {**hyper, "data_sha256": sha256_file(args.data),
                   "eval_data_sha256": sha256_file(args.eval_data) if args.eval_data else None, "base_model": model_id}
    cfg = LoopConfig(epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, grad_accum=args.grad_accum,
                     warmup_ratio=args.warmup_ratio, warmup_steps=args.warmup_steps,
                     weight_decay=args.weight_decay, max_grad_norm=args.max_grad_norm, seed=args.seed,
                     num_virtual_tokens=args.num_virtual_tokens, save_steps=args.save_steps,
                     output_dir=Path(args.output_dir) if args.output_dir else None, resume=args.resume,
                     progress=not args.no_progress, dropout=args.dropout)
    return cfg, hyper, fingerprint


def _register_and_report(args: TrainSettings, res, config, target, cfg, hyper: dict, fingerprint: dict, *,
                         wall: float, counts: tuple[int, int, int]) -> None:
    """Register the trained prompt (with its metrics in the version's meta), write the
    adapter folder when --output-dir is set, and print the one-line summary."""
    n_train, n_eval, n_skipped = counts
    model_id = fingerprint["base_model"]
    last = res.history[-1]
    best = next(h for h in res.history if h["epoch"] == res.best_epoch)
    meta = {
        "data_sha256": fingerprint["data_sha256"], "eval_data_sha256": fingerprint["eval_data_sha256"],
        "hyperparameters": hyper, "train_examples": n_train, "eval_examples": n_eval, "skipped_long": n_skipped,
        "train_loss_start": res.first_step_loss, "train_loss": last["train_loss"],
        "eval_loss": best.get("eval_loss"), "eval_accuracy": best.get("eval_accuracy"),
        "initial_eval_loss": (res.initial_eval or {}).get("loss"),
        "best_epoch": res.best_epoch, "base_model": model_id, "epochs": args.epochs,
        "num_virtual_tokens": args.num_virtual_tokens, "history": res.history,
    }
    layers = int(getattr(config, "n_layer", None) or config.num_hidden_layers)
    heads = int(getattr(config, "n_head", None) or config.num_attention_heads)
    if cfg.output_dir is not None:
        from adapters.peft_format import write_adapter_folder

        write_adapter_folder(cfg.output_dir / "adapter", res.prompt, base_model=args.model,
                             num_layers=layers, num_attention_heads=heads)
    reg = target.register(res.prompt, meta=meta, base_model=args.model, num_layers=layers,
                          num_attention_heads=heads)
    secs = [h["seconds"] for h in res.history]
    parts = [f"train loss {res.first_step_loss:.4f} → {last['train_loss']:.4f}"
             if res.first_step_loss is not None else f"train loss {last['train_loss']:.4f}"]
    if n_eval:
        parts.append(f"eval loss {best['eval_loss']:.4f} (epoch {res.best_epoch})")
        parts.append(f"accuracy {best['eval_accuracy']:.1%}")
    parts.append(f"{sum(secs) / len(secs):.2f} s/epoch ({wall:.1f} s this run)")
    parts.append(f"registered {reg['task']} v{reg['version']}"
                 + (f" ({reg['sha256'][:12]})" if reg.get("sha256") else "")
                 + (f" on {args.server}" if args.server else ""))
    print("done: " + " | ".join(parts), flush=True)


if __name__ == "__main__":
    sys.exit(main())
