"""`python -m training.train` / `polyprompt train`: prompt-tune one task and register it.

What is known is used: the base model is the task's (or, with `--server`, the server's; for
a new task, the one the registry's tasks share), so `--model` is needed only where nothing
is known, and an explicit one that names another model is refused. Training an existing task
keeps its number of virtual tokens (changing it needs `--resize-prompt`) and its recorded
init (`--init` / `--init-text` override that); a line on stderr says which settings were taken.

Exit codes: 0 registered; 2 bad data, bad flags (a `--model` that is not the task's or
server's base model, a `--num-virtual-tokens` that is not the task's), a checkpoint from
another run or a registration target that refuses (nothing trained or registered); 1
another failure; 130 interrupted (nothing registered; resume with --resume). Runs unchanged
under `accelerate launch` (data parallel; only the main process registers).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Literal

from pydantic import Field

from registry.settings import TaskToolSettings, add_flags, from_args

EXIT_OK, EXIT_FAIL, EXIT_BAD, EXIT_INTERRUPTED = 0, 1, 2, 130
INIT_MODES = ("random", "text", "vocab")
PEFT_INITS = {"RANDOM": "random", "TEXT": "text", "SAMPLE_VOCAB": "vocab"}


class SettingsError(ValueError):
    """Flags that contradict the task being trained (exit code 2, nothing trained)."""


class TrainSettings(TaskToolSettings):
    """Every `polyprompt train` setting: a flag and a POLYPROMPT_* variable, generated."""

    task: str = Field(description="task name (a-z 0-9 . _ -)")
    data: str = Field(description='training JSONL: {"prompt": ..., "completion": ...} a line')
    eval_data: str | None = Field(None, description="evaluation JSONL (loss and exact-match accuracy each epoch)")
    num_virtual_tokens: int = Field(20, description="virtual tokens of the soft prompt (an existing task keeps "
                                                    "its own: a different number needs --resize-prompt)")
    resize_prompt: bool = Field(False, description="let --num-virtual-tokens change an existing task's prompt "
                                                   "length (its new version has that many)")
    init: Literal["random", "text", "vocab"] | None = Field(
        None, description="prompt init: random (PEFT RANDOM), text (embeddings of --init-text), vocab (sampled "
                          "vocabulary embeddings); default: an existing task's recorded init, else text with "
                          "--init-text, else random")
    init_text: str | None = Field(None, description="text whose embeddings start the prompt (--init text; "
                                                    "default: an existing task's)")
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


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- an existing task's settings ----------------------------------------------------
def recorded_init(version: dict) -> tuple[str, str | None] | None:
    """(init, init_text) a version records: a training run's hyperparameters, the init of a task
    created by `POST /v1/tasks` (its version 1), an uploaded or imported PEFT config's TEXT or
    SAMPLE_VOCAB `prompt_tuning_init`; None if it records none usable. A PEFT config's RANDOM is
    not taken as a record: it is PEFT's default, and what every adapter folder polyprompt writes
    says (a `train --server` upload included), whatever the prompt started from."""
    meta = version.get("meta") if isinstance(version.get("meta"), dict) else {}
    found: list[tuple[object, object, bool]] = []  # (init, text, from a PEFT config)
    if isinstance(meta.get("hyperparameters"), dict):
        found.append((meta["hyperparameters"].get("init"), meta["hyperparameters"].get("init_text"), False))
    found.append((meta.get("init"), meta.get("init_text"), False))
    source = version.get("source")
    if isinstance(source, str) and source.startswith("init:"):
        found.append((source.removeprefix("init:"), None, False))
    peft_config = meta.get("peft_config")
    if isinstance(peft_config, dict):
        found.append((peft_config.get("prompt_tuning_init"), peft_config.get("prompt_tuning_init_text"), True))
    found.append((meta.get("prompt_tuning_init"), None, True))
    for init, text, peft in found:
        if not isinstance(init, str):
            continue
        init = PEFT_INITS.get(init.upper(), init.lower())
        text = text if isinstance(text, str) and text else None
        if init not in INIT_MODES or (init == "text" and text is None) or (peft and init == "random"):
            continue
        return init, text
    return None


def task_init(task: dict) -> tuple[str, str | None, int] | None:
    """(init, init_text, version) recorded by the task's active version, else by its newest one
    that records any."""
    versions = [v for v in task.get("versions") or [] if isinstance(v, dict)]
    for v in sorted(versions, key=lambda v: (not v.get("is_active"), -int(v.get("version") or 0))):
        found = recorded_init(v)
        if found is not None:
            return (*found, int(v.get("version") or 0))
    return None


def apply_task_settings(args: TrainSettings, task: dict | None) -> str | None:
    """Fill the prompt's settings in place: an existing `task`'s number of virtual tokens and
    recorded init unless flags (or POLYPROMPT_* variables) say otherwise; defaults for a new
    task. Returns the line to show for an existing task. Raises SettingsError when
    --num-virtual-tokens would change an existing task's prompt length without --resize-prompt,
    or when --init text has no text."""
    given = args.model_fields_set
    if task is None:
        if args.init is None:
            args.init = "text" if args.init_text else "random"
        if args.init == "text" and not args.init_text:
            raise SettingsError("--init text needs --init-text")
        return None
    name, n = args.task, int(task["num_virtual_tokens"])
    if "num_virtual_tokens" in given and args.num_virtual_tokens != n:
        if not args.resize_prompt:
            raise SettingsError(
                f"task {name!r} has {n} virtual tokens; --num-virtual-tokens {args.num_virtual_tokens} would "
                f"change its prompt length: leave it out to keep {n}, or add --resize-prompt")
        tokens = f"{args.num_virtual_tokens} virtual tokens (--num-virtual-tokens with --resize-prompt; it had {n})"
    else:
        args.num_virtual_tokens = n
        tokens = f"{n} virtual tokens"
    rec = task_init(task)
    rec_desc = "none recorded" if rec is None else rec[0] + (f" {rec[1]!r}" if rec[1] else "")
    if args.init is None and args.init_text is None and rec is not None:
        args.init, args.init_text = rec[0], rec[1]
        how = f" (from v{rec[2]})"
    elif args.init is None:
        args.init = "text" if args.init_text else "random"
        how = " (--init-text)" if args.init_text else " (the task records none)"
    else:
        if args.init == "text" and not args.init_text and rec is not None and rec[0] == "text":
            args.init_text = rec[1]
        how = f" (--init; the task's: {rec_desc})"
    if args.init == "text" and not args.init_text:
        raise SettingsError("--init text needs --init-text (the task records no init text)")
    init = f"init={args.init}" + (f" {args.init_text!r}" if args.init == "text" else "")
    return f"using task {name}'s settings: {tokens}, {init}{how}"


def main(argv: list[str] | None = None) -> int:
    parser, args = parse_args(argv)
    _check_args(parser, args)
    from registry.cli_common import BaseModelError

    from .checkpoint import CheckpointError
    from .data import DataError
    from .register import RegisterError

    try:
        return _run(args)
    except (DataError, CheckpointError, RegisterError, BaseModelError, SettingsError) as e:
        _err(str(e))
        return EXIT_BAD
    except KeyboardInterrupt:
        _err("interrupted; nothing registered" + (" (continue with --resume)" if args.output_dir else ""))
        return EXIT_INTERRUPTED


def _run(args: TrainSettings) -> int:
    from registry.cli_common import BaseModelError, new_task_base_model, resolve_base_model, unloadable

    from .data import load_jsonl
    from .register import LocalTarget, ServerTarget

    # 1. data (fails fast, before any model is loaded)
    train_ex = load_jsonl(args.data)
    eval_ex = load_jsonl(args.eval_data) if args.eval_data else None

    # 2. the registration target: what it knows (the base model, the task and its settings), and
    #    that it will accept the result, before any time is spent training
    if args.server:
        target = ServerTarget(args.server, args.task, create=args.create, description=args.description)
    else:
        from registry.cli_common import open_registry

        target = LocalTarget(open_registry(args), args.task, create=args.create, description=args.description)
    known, owner, unknown, task = target.describe()
    if task is None and isinstance(target, LocalTarget):  # a new task: --model, else the registry's one model
        load, model_id, model_note = new_task_base_model(args.model, target.registry, name=args.task)
        owner = "every task in the registry"
    else:  # the task's, or the server's: an explicit --model must agree
        load, model_id = resolve_base_model(args.model, known, owner=owner, unknown=unknown)
        loaded = f" (loaded from {load})" if load != model_id else ""
        model_note = "" if "model" in args.model_fields_set else \
            f"using base model {model_id!r}, the one {owner} is on{loaded}"
    if load is None:
        raise unloadable(model_id, owner)
    args.model = load
    settings_line = apply_task_settings(args, task)

    import torch  # only now: a refusal above comes at once
    from accelerate import Accelerator
    from transformers import AutoConfig, AutoTokenizer

    from .data import tokenize
    from .loop import train_loop
    from .model import build_peft_model, context_length

    try:
        config = AutoConfig.from_pretrained(load)
    except Exception as e:  # a folder that is no model, a hub id while offline: one line, not a traceback
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise BaseModelError(f"cannot load base model {load!r}: {first}; pass --model PATH to a local copy") from None
    hidden = int(getattr(config, "n_embd", None) or config.hidden_size)
    if args.device.startswith("cuda:"):
        torch.cuda.set_device(int(args.device.split(":", 1)[1]))
    accelerator = Accelerator(cpu=args.device == "cpu")
    main_proc = accelerator.is_main_process
    log = print if main_proc else (lambda *a, **k: None)
    if main_proc:
        if model_note:
            _note(model_note)
        if settings_line:
            _note(settings_line)
    if isinstance(target, LocalTarget):
        target.model_id, target.hidden_size = model_id, hidden
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
    reg = target.register(res.prompt, meta=meta, base_model=model_id, num_layers=layers,
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
