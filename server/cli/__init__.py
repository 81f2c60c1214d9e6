"""`polyprompt` command line: serve, train, tasks, make-test-model.

The only part of `server` that imports `training` (for `polyprompt train`); each subcommand
imports what it needs when it runs, so `polyprompt tasks list` loads no model code.
"""

from __future__ import annotations

import argparse
import sys


def _serve(argv: list[str]) -> int:
    from server.cli.serve import main as serve_main

    return serve_main(argv)


def _make_test_model(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="polyprompt make-test-model",
                                description="Write a randomly initialised GPT-2 + tokenizer (offline).")
    p.add_argument("out")
    p.add_argument("--size", choices=["tiny", "small"], default="tiny",
                   help="tiny (2 layers, 128 wide) or small (the real 124M shape)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--init-std", type=float, default=0.12)
    args = p.parse_args(argv)
    from server.testmodel import make_test_model

    out = make_test_model(args.out, size=args.size, seed=args.seed, init_std=args.init_std)
    print(f"wrote a random {args.size} GPT-2 to {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    commands = {"serve": _serve, "make-test-model": _make_test_model}  # train and tasks: imported on use
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: polyprompt {serve,train,tasks,make-test-model} ...\n\n"
              "  serve            start the HTTP server\n"
              "  train            train a task's soft prompt (PEFT prompt tuning) into the registry\n"
              "  tasks            list/show/import/export/delete/activate tasks\n"
              "  make-test-model  write a random GPT-2 for offline use\n")
        return 0
    cmd, rest = argv[0], argv[1:]
    if cmd == "train":
        from training.train import main as train_main

        return train_main(rest)
    if cmd == "tasks":
        from server.cli.tasks import main as tasks_main

        return tasks_main(rest)
    if cmd not in commands:
        print(f"polyprompt: unknown command {cmd!r}", file=sys.stderr)
        return 2
    return commands[cmd](rest)

