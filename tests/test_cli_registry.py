"""Commands that know their registry: `polyprompt train` and `polyprompt tasks` take the base
model from the task, the server or the registry (an explicit --model must agree), training an
existing task keeps its prompt settings, `tasks export` names the real base model, and the
`tasks` commands load no model stack. Offline throughout: a hub lookup fails at once."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from registry import Registry
from server.cli import tasks as tasks_cli
from training.train import main as train_main

REPO = Path(__file__).resolve().parent.parent
INIT_TEXT = "Name the capital city"
ROWS = [("Capital of France:", " Paris"), ("Capital of Japan:", " Tokyo")]


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch):
    """No POLYPROMPT_* settings from the outside, the hub offline (a lookup fails, not retries),
    one thread (the tiny model gains nothing from more)."""
    import huggingface_hub.constants

    for var in [k for k in os.environ if k.startswith("POLYPROMPT_")]:
        monkeypatch.delenv(var)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_jsonl(path: Path) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in ROWS))
    return path


def registry(tmp: Path) -> Registry:
    reg = Registry(f"sqlite:///{tmp}/r.db", tmp / "data")
    reg.upgrade()
    return reg


def flags(tmp: Path) -> list[str]:
    return ["--db", f"sqlite:///{tmp}/r.db", "--data-dir", str(tmp / "data")]


def create_like_the_api(reg: Registry, name: str, base_model: str, n: int = 8) -> None:
    """A task as `POST /v1/tasks` makes one: version 1 from a text init, which it records."""
    reg.create_task(name, base_model=base_model, embeddings=torch.randn(n, 128), source="init:text",
                    meta={"init": "text", "init_text": INIT_TEXT})


def text_init(model_dir: Path, n: int) -> torch.Tensor:
    """PEFT's TEXT init: the embeddings of INIT_TEXT's tokens, repeated and cut to n."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(INIT_TEXT)["input_ids"]
    ids = (ids * n)[:n]
    return load_file(model_dir / "model.safetensors")["transformer.wte.weight"][ids]


def test_train_existing_task_uses_its_base_model_and_settings(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)  # the registry names a local model by its folder's name
    reg = registry(tmp_path)
    create_like_the_api(reg, "cap", tiny_model_dir.name)
    data = write_jsonl(tmp_path / "d.jsonl")
    # lr 1e-12: the registered prompt is, to float precision, the one training started from
    rc = train_main(["--task", "cap", "--data", str(data), "--epochs", "1", "--lr", "1e-12", "--no-progress",
                     *flags(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert f"using base model {tiny_model_dir.name!r}, the one task 'cap' is on" in err
    assert f"using task cap's settings: 8 virtual tokens, init=text {INIT_TEXT!r} (from v1)" in err
    task = reg.get_task("cap")
    v2 = task["versions"][-1]
    assert task["active_version"] == 2 and v2["num_virtual_tokens"] == 8 and v2["base_model"] == tiny_model_dir.name
    hyper = v2["meta"]["hyperparameters"]
    assert (hyper["num_virtual_tokens"], hyper["init"], hyper["init_text"]) == (8, "text", INIT_TEXT)
    assert torch.allclose(reg.load_prompt(v2["sha256"]), text_init(tiny_model_dir, 8), atol=1e-6)

    # an explicit --model for another base model, or another prompt length: one line, exit 2, nothing trained
    rc = train_main(["--task", "cap", "--data", str(data), "--model", "gpt2", *flags(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1, err
    assert f"--model gpt2 is base model 'gpt2', but task 'cap' is on {tiny_model_dir.name!r}" in err
    rc = train_main(["--task", "cap", "--data", str(data), "--num-virtual-tokens", "4", *flags(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2 and "task 'cap' has 8 virtual tokens" in err and "--resize-prompt" in err, err
    assert len(reg.get_task("cap")["versions"]) == 2

    # asked for: a new length, and an init that overrides the recorded one (the explicit --model agrees)
    rc = train_main(["--task", "cap", "--data", str(data), "--num-virtual-tokens", "4", "--resize-prompt",
                     "--init", "vocab", "--epochs", "1", "--no-progress", "--model", str(tiny_model_dir),
                     *flags(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "using task cap's settings: 4 virtual tokens (--num-virtual-tokens with --resize-prompt; it had 8)" in err
    assert f"init=vocab (--init; the task's: text {INIT_TEXT!r})" in err and "using base model" not in err
    task = reg.get_task("cap")
    assert task["num_virtual_tokens"] == 4 and task["versions"][-1]["meta"]["hyperparameters"]["init"] == "vocab"


def test_train_new_task_takes_the_registrys_model_or_asks(tmp_path, tiny_model_dir, capsys, monkeypatch):
    monkeypatch.chdir(tiny_model_dir.parent)
    reg = registry(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl")
    cmd = ["--task", "fresh", "--create", "--data", str(data), "--epochs", "1", "--num-virtual-tokens", "3",
           "--no-progress", *flags(tmp_path)]
    assert train_main([c for c in cmd if c != "--create"]) == 2  # the first thing wrong is said first
    assert "does not exist in the registry; pass --create" in capsys.readouterr().err
    assert train_main(cmd) == 2  # an empty registry knows no model: not `gpt2` from the hub
    err = capsys.readouterr().err
    assert err.strip() == ("error: no base model is known for new task 'fresh' (the registry has no tasks yet); "
                           "pass --model (a hub id or a local folder)")
    create_like_the_api(reg, "other", tiny_model_dir.name)
    assert train_main(cmd) == 0
    assert "the one every task in the registry is on" in capsys.readouterr().err
    task = reg.get_task("fresh")
    assert task["base_model"] == tiny_model_dir.name and task["num_virtual_tokens"] == 3


def tasks(*argv: str) -> int:
    return tasks_cli.main(list(argv))


def test_tasks_import_takes_the_registrys_model(tmp_path, tiny_model_dir, capsys):
    from adapters.peft_format import write_adapter_folder

    folder = write_adapter_folder(tmp_path / "ad", torch.randn(5, 128), base_model="/elsewhere/tiny-gpt2",
                                  num_layers=2, num_attention_heads=4)
    f = flags(tmp_path)
    assert tasks("import", "a", str(folder), *f) == 1  # empty registry, no --model
    err = capsys.readouterr().err
    assert "no base model is known for new task 'a'" in err and "'/elsewhere/tiny-gpt2'" in err
    assert "pass --model" in err and err.count("\n") == 1

    reg = registry(tmp_path)
    create_like_the_api(reg, "cap", tiny_model_dir.name)
    assert tasks("import", "cap", str(folder), *f) == 0  # an existing task: its model
    assert tasks("import", "b", str(folder), *f) == 0  # a new one: the registry's
    capsys.readouterr()
    assert reg.get_task("cap")["versions"][-1]["base_model"] == tiny_model_dir.name
    assert reg.get_task("b")["base_model"] == tiny_model_dir.name and reg.get_task("b")["hidden_size"] == 128
    assert tasks("import", "cap", str(folder), *f, "--model", "gpt2") == 1
    err = capsys.readouterr().err
    assert f"but task 'cap' is on {tiny_model_dir.name!r}" in err and len(reg.get_task("cap")["versions"]) == 2


def test_tasks_export_names_the_real_base_model(tmp_path, tiny_model_dir, capsys, monkeypatch):
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    reg = registry(tmp_path)
    create_like_the_api(reg, "cap", tiny_model_dir.name, n=6)
    want = reg.load_prompt(reg.get_task("cap")["sha256"])
    monkeypatch.chdir(tiny_model_dir.parent)
    assert tasks("export", "cap", str(tmp_path / "out"), "--json", *flags(tmp_path)) == 0  # no --model
    res = json.loads(capsys.readouterr().out)
    assert res["base_model"] == tiny_model_dir.name and res["shape_from"] == "model config"
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == tiny_model_dir.name and (cfg["num_layers"], cfg["token_dim"]) == (2, 128)
    readme = (tmp_path / "out" / "README.md").read_text()
    assert readme.startswith(f'---\nbase_model: "{tiny_model_dir.name}"\nlibrary_name: peft\n')
    pm = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_model_dir), tmp_path / "out")
    assert torch.equal(pm.prompt_encoder["default"].embedding.weight.detach(), want)

    monkeypatch.chdir(tmp_path)  # the model's folder is not here: still its name, the GPT-2 shape rule
    assert tasks("export", "cap", str(tmp_path / "out2"), "--json", *flags(tmp_path)) == 0
    assert json.loads(capsys.readouterr().out)["shape_from"].startswith("GPT-2 defaults")
    assert json.loads((tmp_path / "out2" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        tiny_model_dir.name
    assert tasks("export", "cap", str(tmp_path / "out3"), "--model", "gpt2", *flags(tmp_path)) == 1
    assert "but task 'cap' is on" in capsys.readouterr().err and not (tmp_path / "out3").exists()


def _imported(code: str) -> list[str]:
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


HEAVY = ("transformers", "peft", "accelerate", "fastapi", "uvicorn", "httpx", "server.app", "server.engine",
         "server.model", "training")


def test_tasks_cli_imports_no_model_or_web_stack():
    found = _imported("import json, sys; import server.cli.tasks, adapters.peft_format, registry.cli_common; "
                      f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    assert found == []
    found = _imported("import json, sys; import adapters.peft_format; "
                      "print(json.dumps([m for m in ('torch', 'safetensors') if m in sys.modules]))")
    assert found == []  # checking an adapter's header or config needs neither
    found = _imported("import json, sys; from server.cli import main; main(['--help']); print(json.dumps("
                      "[m for m in ('torch', 'sqlalchemy', 'pydantic', 'registry') if m in sys.modules]))")
    assert found == []


def test_tasks_cli_imports_no_torch():
    if "torch" in _imported("import json, sys, registry; print(json.dumps(list(sys.modules)))"):
        pytest.skip("registry/__init__.py imports torch at module level (tasks list then loads it)")
    found = _imported("import json, sys, server.cli.tasks; print(json.dumps(list(sys.modules)))")
    assert "torch" not in found and "safetensors" not in found


@pytest.mark.slow  # a real `polyprompt serve` and a `polyprompt train` process: ~25 s
def test_train_against_a_server_without_model(tmp_path, tiny_model_dir):
    import httpx

    from registry.paths import default_db_url
    from tests.serverutil import running_server

    data = write_jsonl(tmp_path / "d.jsonl")
    with running_server(tiny_model_dir, tmp_path / "served") as url:
        r = httpx.post(f"{url}/v1/tasks", json={"name": "cap", "num_virtual_tokens": 8, "init": "text",
                                                "init_text": INIT_TEXT}, timeout=30)
        assert r.status_code == 201, r.text
        env = {k: v for k, v in os.environ.items() if not k.startswith("POLYPROMPT_")}
        env.update(HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        cmd = [sys.executable, "-m", "server.cli", "train", "--task", "cap", "--data", str(data), "--epochs", "1",
               "--lr", "1e-12", "--no-progress", "--server", url]
        p = subprocess.run(cmd, cwd=tiny_model_dir.parent, env=env, capture_output=True, text=True, timeout=180)
        assert p.returncode == 0, p.stdout + p.stderr
        assert f"the one the server at {url} is on" in p.stderr and "8 virtual tokens, init=text" in p.stderr
        task = httpx.get(f"{url}/v1/tasks/cap", timeout=30).json()
        assert task["active_version"] == 2 and task["num_virtual_tokens"] == 8
        assert task["versions"][-1]["meta"]["peft_config"]["base_model_name_or_path"] == tiny_model_dir.name
        p = subprocess.run([*cmd, "--model", "gpt2"], cwd=tiny_model_dir.parent, env=env, capture_output=True,
                           text=True, timeout=180)
        assert p.returncode == 2 and f"the server at {url} is on {tiny_model_dir.name!r}" in p.stderr, p.stderr
    served = Registry(default_db_url(tmp_path / "served"), tmp_path / "served")
    assert torch.allclose(served.load_prompt(task["sha256"]), text_init(tiny_model_dir, 8), atol=1e-6)
