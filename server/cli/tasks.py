"""`polyprompt tasks {list,show,import,export,delete,activate}` — registry admin from the shell.

Imports registry and adapters only (nothing else under server/), and those lightly: no torch,
transformers or peft unless a subcommand needs them (`import` and `export` of a prompt).

The base model is the task's own (`base_model` in the registry; see `registry.cli_common`):
`import` into an existing task records its base model; `import` of a new task takes the one
base model the registry's tasks share; `export` writes the task's base model into
`adapter_config.json` and the README. `--model` (or POLYPROMPT_MODEL) is needed only where
nothing is known, and must name the task's model where one is.

Model shape (hidden size, layers, heads) for `export`'s config comes from the base model's
config: a local folder is read with `AutoConfig.from_pretrained` (offline); the public GPT-2
hub ids (gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2) use their known shapes without
touching the network; an `org/name` hub id tries `AutoConfig`; otherwise (a folder that is not
here, the hub offline) the task's hidden size with the GPT-2 family's layer/head counts for
that width (12/12 for 768, the GPT-2 rule of head_dim 64 otherwise).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from adapters.peft_format import AdapterError, model_card, read_adapter_folder, write_adapter_folder
from registry import RegistryError, TaskExists, TaskNotFound
from registry.cli_common import (
    KNOWN_MODELS,
    BaseModelError,
    add_registry_args,
    canonical_model,
    new_task_base_model,
    open_registry,
    registry_base_models,
    resolve_base_model,
    resolve_registry_args,
)

__all__ = ["KNOWN_MODELS", "CliError", "build_parser", "gpt2_defaults", "main", "model_shape"]

# GPT-2 family defaults by width, for the offline fallback
GPT2_BY_HIDDEN: dict[int, tuple[int, int]] = {h: (n, a) for h, n, a in KNOWN_MODELS.values()
                                                  if h != 768}
GPT2_BY_HIDDEN[768] = (12, 12)


class CliError(Exception):
    """A user-facing error: printed to stderr, exit code 1."""


def model_shape(model: str) -> tuple[int, int, int] | None:
    """(hidden, num_layers, num_heads) of `model`, or None if its config is unavailable."""
    if not Path(model).is_dir():
        key = canonical_model(model)
        if key in KNOWN_MODELS:
            return KNOWN_MODELS[key]
        if "/" not in model:  # a bare name that is no folder here: only a slow, wrong hub lookup is left
            return None
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model)
    except Exception:
        return None
    hidden = getattr(cfg, "n_embd", None) or getattr(cfg, "hidden_size", None)
    layers = getattr(cfg, "n_layer", None) or getattr(cfg, "num_hidden_layers", None)
    heads = getattr(cfg, "n_head", None) or getattr(cfg, "num_attention_heads", None)
    if not (hidden and layers and heads):
        return None
    return int(hidden), int(layers), int(heads)


def gpt2_defaults(hidden: int) -> tuple[int, int]:
    """(num_layers, num_heads) a GPT-2 of this width would have (fallback only)."""
    if hidden in GPT2_BY_HIDDEN:
        return GPT2_BY_HIDDEN[hidden]
    return 12, max(1, hidden // 64)


def _peek_hidden(folder: Path) -> int:
    """The width of the folder's prompt tensor, from the safetensors header (no load);
    0 where it cannot be read (read_adapter_folder then explains what is wrong)."""
    from adapters.peft_format import MAX_HEADER_BYTES, WEIGHTS_NAME, prompt_shape

    path = folder / WEIGHTS_NAME
    if not path.is_file():
        return 0
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            return 0
        n = int.from_bytes(head, "little")
        if n > MAX_HEADER_BYTES:
            return 0
        data = head + f.read(n)
    try:
        return prompt_shape(data)[1]
    except AdapterError:
        return 0


# -- commands -------------------------------------------------------------------
def _fmt_task_line(t: dict[str, Any]) -> str:
    active = t["active_version"] if t["active_version"] is not None else "-"
    return (
        f"{t['name']:<24} v{active!s:<4} {t['num_virtual_tokens']:>5} tok  "
        f"hidden {t['hidden_size']:<5} {len(t['versions'])} version(s)  {t['base_model']}"
    )


def cmd_list(args: argparse.Namespace) -> Any:
    tasks = open_registry(args).list_tasks()
    if args.json:
        return tasks
    if not tasks:
        return "no tasks"
    return "\n".join(_fmt_task_line(t) for t in tasks)


def cmd_show(args: argparse.Namespace) -> Any:
    t = open_registry(args).get_task(args.name)
    if args.json:
        return t
    lines = [
        f"name:               {t['name']}",
        f"description:        {t['description']}",
        f"base model:         {t['base_model']}",
        f"hidden size:        {t['hidden_size']}",
        f"num virtual tokens: {t['num_virtual_tokens']}",
        f"active version:     {t['active_version']}",
        f"created / updated:  {t['created_at']} / {t['updated_at']}",
        "versions:",
    ]
    for v in t["versions"]:
        mark = "*" if v["is_active"] else " "
        lines.append(
            f" {mark} v{v['version']:<4} {v['num_virtual_tokens']:>5} tok  {v['source']:<8} "
            f"{v['sha256'][:12]}  {v['created_at']}"
        )
    if not t["versions"]:
        lines.append("   (none)")
    return "\n".join(lines)


def _note(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _adapter_base(folder: Path) -> str | None:
    """The base model an adapter folder's config names, for messages only."""
    try:
        cfg = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
        name = cfg.get("base_model_name_or_path")
        return name if isinstance(name, str) and name else None
    except (OSError, ValueError, AttributeError):
        return None


def _import_base_model(reg, args: argparse.Namespace, task: dict[str, Any] | None, folder: Path
                       ) -> tuple[str | None, str]:
    """(what to read the shape from, base model id) for importing into `task` (None: a new one)."""
    if task is not None:  # the task's own; an explicit --model must agree
        return resolve_base_model(args.model, task["base_model"], owner=f"task {args.name!r}")
    try:
        load, base, note = new_task_base_model(args.model, reg, name=args.name)
    except BaseModelError as e:
        named = _adapter_base(folder)
        if named:
            raise BaseModelError(f"{e} (the adapter says it was made for {named!r})") from None
        raise
    if note:
        _note(note)
    return load, base


def cmd_import(args: argparse.Namespace) -> Any:
    folder = Path(args.folder)
    reg = open_registry(args)
    try:
        task: dict[str, Any] | None = reg.get_task(args.name)
    except TaskNotFound:
        task = None
    model, base_model = _import_base_model(reg, args, task, folder)
    if task is not None:
        expected = task["hidden_size"]
    else:
        shape = model_shape(model) if model else None
        expected = (shape[0] if shape else None) or registry_base_models(reg).get(base_model) or _peek_hidden(folder)
    tensor, cfg = read_adapter_folder(folder, expected_hidden=expected)
    meta = {k: cfg[k] for k in ("base_model_name_or_path", "peft_version", "prompt_tuning_init") if cfg.get(k)}
    created = False
    if task is None:
        try:  # the task and its version 1 in one transaction: never a task without a prompt
            task = reg.create_task(args.name, description=args.description, base_model=base_model,
                                   embeddings=tensor, source="import", meta=meta)
            version, created = task["versions"][0], True
        except TaskExists:  # created meanwhile by someone else: add a version to it
            task = reg.get_task(args.name)
            resolve_base_model(args.model, task["base_model"], owner=f"task {args.name!r}")
            base_model = task["base_model"]
    if not created:
        version = reg.add_version(
            args.name, tensor, source="import", meta=meta, activate=not args.no_activate, base_model=base_model
        )
    if args.json:
        return {"task": reg.get_task(args.name), "version": version, "created": created}
    what = "created task and imported" if created else "imported"
    state = "active" if version["is_active"] else "inactive"
    return (
        f"{what} {args.name} v{version['version']} ({version['num_virtual_tokens']} virtual tokens, "
        f"hidden {version['hidden_size']}, {state}, sha256 {version['sha256'][:12]})"
    )


def cmd_export(args: argparse.Namespace) -> Any:
    reg = open_registry(args)
    task = reg.get_task(args.name)
    wanted = args.version if args.version is not None else task["active_version"]
    v = next((v for v in task["versions"] if v["version"] == wanted), None)
    if v is None:
        if wanted is None:
            raise CliError(f"task {args.name!r} has no versions to export")
        raise CliError(f"task {args.name!r} has no version {wanted}")
    base_model = task["base_model"]  # what the task's prompts are for, whatever --model says
    model, _ = resolve_base_model(args.model, base_model, owner=f"task {args.name!r}")
    emb = reg.load_prompt(v["sha256"])
    shape = model_shape(model) if model else None
    if shape is not None and shape[0] == task["hidden_size"]:
        _, layers, heads = shape
        shape_src = "model config"
    else:
        layers, heads = gpt2_defaults(task["hidden_size"])
        shape_src = "GPT-2 defaults for the hidden size (model config unavailable or another width)"
    readme = model_card(base_model=base_model, title=f"{args.name} (polyprompt task, version {v['version']})", lines=[
        f"A PEFT prompt-tuning adapter: {v['num_virtual_tokens']} virtual tokens on `{base_model}`, "
        f"exported by `polyprompt tasks export`.", "",
        f"- task: `{args.name}`" + (f" ({task['description']})" if task["description"] else ""),
        f"- version: {v['version']} (source `{v['source']}`, created {v['created_at']})",
        f"- sha256 of the prompt: `{v['sha256']}`", "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        "",
        f"base = AutoModelForCausalLM.from_pretrained({base_model!r})",
        "model = PeftModel.from_pretrained(base, \"path/to/this/folder\")",
        "```"])
    folder = write_adapter_folder(
        args.folder, emb, base_model=base_model, num_layers=layers, num_attention_heads=heads, readme=readme
    )
    if args.json:
        return {"folder": str(folder), "task": args.name, "version": v, "base_model": base_model,
                "num_layers": layers, "num_attention_heads": heads, "shape_from": shape_src}
    return (f"exported {args.name} v{v['version']} ({v['num_virtual_tokens']} virtual tokens, "
            f"base model {base_model}) to {folder}")


def cmd_delete(args: argparse.Namespace) -> Any:
    open_registry(args).delete_task(args.name)
    return {"deleted": args.name} if args.json else f"deleted {args.name}"


def cmd_activate(args: argparse.Namespace) -> Any:
    v = open_registry(args).activate_version(args.name, args.version)
    if args.json:
        return v
    return f"activated {args.name} v{v['version']} ({v['num_virtual_tokens']} virtual tokens)"


def build_parser() -> argparse.ArgumentParser:
    """The `polyprompt tasks` parser (each subcommand takes --db/--data-dir/--model/--json)."""
    common = argparse.ArgumentParser(add_help=False)
    add_registry_args(common)
    common.add_argument("--json", action="store_true", help="print JSON")
    parser = argparse.ArgumentParser(prog="polyprompt tasks", description="Manage tasks and their soft prompts.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", parents=[common], help="list tasks")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("show", parents=[common], help="show one task and its versions")
    p.add_argument("name")
    p.set_defaults(func=cmd_show)
    p = sub.add_parser("import", parents=[common], help="import a PEFT prompt-tuning adapter folder")
    p.add_argument("name")
    p.add_argument("folder")
    p.add_argument("--description", default="", help="description if the task is created")
    p.add_argument("--no-activate", action="store_true", help="add the version without activating it")
    p.set_defaults(func=cmd_import)
    p = sub.add_parser("export", parents=[common], help="export a version as a PEFT adapter folder")
    p.add_argument("name")
    p.add_argument("folder")
    p.add_argument("--version", type=int, default=None, help="version to export (default: active)")
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("delete", parents=[common], help="delete a task and its versions")
    p.add_argument("name")
    p.set_defaults(func=cmd_delete)
    p = sub.add_parser("activate", parents=[common], help="make a version the active one")
    p.add_argument("name")
    p.add_argument("version", type=int)
    p.set_defaults(func=cmd_activate)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one `tasks` subcommand; 0 on success, 1 on a user error (message on stderr)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help or a usage error (argparse already printed it)
        return e.code if isinstance(e.code, int) else 1
    try:
        out = args.func(resolve_registry_args(args))
    except (CliError, RegistryError, AdapterError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(out, indent=2, sort_keys=True))
    elif out:
        print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
