"""`polyprompt tasks …` through server.cli.tasks.main, on a tiny random GPT-2 folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from server.cli.tasks import main


@pytest.fixture()
def env(tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    for var in ("POLYPROMPT_DB", "POLYPROMPT_DATA_DIR", "POLYPROMPT_MODEL"):
        monkeypatch.delenv(var, raising=False)
    return {"data": str(tmp_path / "data"), "model": str(tiny_model_dir), "tmp": str(tmp_path)}


def run(env: dict[str, str], capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    rc = main([*argv, "--data-dir", env["data"], "--model", env["model"]])
    out, err = capsys.readouterr()
    return rc, out, err


def run_json(env: dict[str, str], capsys: pytest.CaptureFixture[str], *argv: str):
    rc, out, err = run(env, capsys, *argv, "--json")
    assert rc == 0, err
    return json.loads(out)


@pytest.fixture()
def peft_folder(tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, torch.Tensor]:
    from peft import PromptTuningConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    torch.manual_seed(1)
    pm = get_peft_model(
        GPT2LMHeadModel.from_pretrained(tiny_model_dir),
        PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=6),
    )
    pm.save_pretrained(tmp_path / "peft")
    return tmp_path / "peft", pm.prompt_encoder["default"].embedding.weight.detach().clone()


def test_full_cycle(env, capsys, peft_folder, tiny_model_dir: Path) -> None:
    from peft import PeftModel
    from transformers import GPT2LMHeadModel

    folder, emb = peft_folder
    rc, out, _ = run(env, capsys, "list")
    assert rc == 0 and "no tasks" in out
    assert run_json(env, capsys, "list") == []

    rc, out, _ = run(env, capsys, "import", "sent", str(folder))
    assert rc == 0 and "created task" in out and "v1" in out
    res = run_json(env, capsys, "import", "sent", str(folder), "--no-activate")
    assert res["created"] is False and res["version"]["version"] == 2 and not res["version"]["is_active"]
    task = res["task"]
    assert task["hidden_size"] == 128 and task["num_virtual_tokens"] == 6
    assert task["base_model"] == tiny_model_dir.name and task["active_version"] == 1
    assert task["versions"][0]["source"] == "import"

    rc, out, _ = run(env, capsys, "list")
    assert rc == 0 and "sent" in out
    rc, out, _ = run(env, capsys, "show", "sent")
    assert rc == 0 and "active version:     1" in out and "v2" in out
    assert run_json(env, capsys, "activate", "sent", "2")["is_active"] is True
    assert run_json(env, capsys, "show", "sent")["active_version"] == 2

    res = run_json(env, capsys, "export", "sent", str(Path(env["tmp"]) / "exported"))
    assert res["num_layers"] == 2 and res["num_attention_heads"] == 4 and res["shape_from"] == "model config"
    cfg = json.loads((Path(env["tmp"]) / "exported" / "adapter_config.json").read_text())
    assert cfg["num_layers"] == 2 and cfg["num_attention_heads"] == 4 and cfg["token_dim"] == 128
    pm = PeftModel.from_pretrained(GPT2LMHeadModel.from_pretrained(tiny_model_dir), Path(env["tmp"]) / "exported")
    assert torch.equal(pm.prompt_encoder["default"].embedding.weight.detach(), emb)

    rc, out, _ = run(env, capsys, "delete", "sent")
    assert rc == 0 and "deleted" in out
    rc, _, err = run(env, capsys, "show", "sent")
    assert rc == 1 and "not found" in err


def test_errors(env, capsys, peft_folder, tmp_path: Path) -> None:
    folder, _ = peft_folder
    rc, _, err = run(env, capsys, "import", "Bad Name", str(folder))
    assert rc == 1 and "invalid task name" in err
    rc, _, err = run(env, capsys, "import", "x", str(tmp_path / "nowhere"))
    assert rc == 1 and "not a folder" in err
    bin_only = tmp_path / "bin"
    bin_only.mkdir()
    (bin_only / "adapter_model.bin").write_bytes(b"\x80\x04junk")
    rc, _, err = run(env, capsys, "import", "x", str(bin_only))
    assert rc == 1 and "pickled .bin files are refused" in err
    rc, _, err = run(env, capsys, "delete", "missing")
    assert rc == 1 and "not found" in err
    assert run(env, capsys, "import", "ok", str(folder))[0] == 0
    rc, _, err = run(env, capsys, "activate", "ok", "7")
    assert rc == 1 and "no version 7" in err
    rc, _, err = run(env, capsys, "export", "ok", str(tmp_path / "e"), "--version", "9")
    assert rc == 1 and "no version 9" in err
    assert run(env, capsys, "bogus")[0] == 2  # argparse usage error


def test_hidden_mismatch(env, capsys, tmp_path: Path) -> None:
    from adapters.peft_format import write_adapter_folder

    write_adapter_folder(tmp_path / "narrow", torch.randn(3, 32), base_model="x", num_layers=2, num_attention_heads=4)
    rc, _, err = run(env, capsys, "import", "narrow", str(tmp_path / "narrow"))
    assert rc == 1 and "hidden size 32 != model's 128" in err


def test_env_defaults_and_db_flag(env, capsys, peft_folder, tmp_path: Path, monkeypatch) -> None:
    folder, _ = peft_folder
    monkeypatch.setenv("POLYPROMPT_DATA_DIR", str(tmp_path / "envdata"))
    monkeypatch.setenv("POLYPROMPT_MODEL", env["model"])
    db = f"sqlite:///{tmp_path / 'other.db'}"
    assert main(["import", "e1", str(folder), "--db", db]) == 0
    capsys.readouterr()
    assert main(["list", "--json", "--db", db]) == 0
    assert [t["name"] for t in json.loads(capsys.readouterr().out)] == ["e1"]
    assert (tmp_path / "other.db").is_file() and (tmp_path / "envdata" / "prompts").is_dir()
    assert main(["list", "--json"]) == 0  # default db in the env data dir: empty
    assert json.loads(capsys.readouterr().out) == []


def test_model_shape_known_ids_offline() -> None:
    from server.cli.tasks import gpt2_defaults, model_shape

    assert model_shape("gpt2") == (768, 12, 12)
    assert model_shape("openai-community/gpt2-medium") == (1024, 24, 16)
    assert gpt2_defaults(768) == (12, 12) and gpt2_defaults(1600) == (48, 25)
    assert gpt2_defaults(128) == (12, 2)
