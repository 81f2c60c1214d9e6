"""Training end to end on the tiny random GPT-2: learning, registration, greedy parity,
crash + resume bit-for-bit, and the server upload path."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from registry import Registry
from registry.errors import TaskNotFound
from training.train import main

REPO = Path(__file__).resolve().parent.parent

MEMO = [
    ("Review: a wonderful film\nSentiment:", " positive"),
    ("Review: dull and far too long\nSentiment:", " negative"),
    ("Capital of France:", " Paris"),
    ("Capital of Japan:", " Tokyo"),
]


@pytest.fixture(autouse=True)
def one_thread():
    """The tiny model gains nothing from threads; on a busy CI box they spin-wait."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps({"prompt": p, "completion": c}) + "\n" for p, c in rows))
    return path


def make_registry(tmp: Path) -> Registry:
    reg = Registry(f"sqlite:///{tmp}/r.db", tmp)
    reg.upgrade()
    return reg


def reg_args(tmp: Path, model: Path) -> list[str]:
    return ["--db", f"sqlite:///{tmp}/r.db", "--data-dir", str(tmp), "--model", str(model), "--no-progress"]


@pytest.mark.slow  # ~11 s: a real training run to a low loss
def test_learns_registers_and_greedy_decodes(tmp_path, tiny_model_dir, capsys):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adapters.peft_format import write_adapter_folder

    reg = make_registry(tmp_path)
    data = write_jsonl(tmp_path / "memo.jsonl", MEMO)
    rc = main(["--task", "memo", "--data", str(data), "--eval-data", str(data), "--create",
               "--epochs", "150", "--lr", "0.3", "--num-virtual-tokens", "8", "--batch-size", "4",
               "--seed", "1", *reg_args(tmp_path, tiny_model_dir)])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "done: train loss" in out and "registered memo v1" in out

    task = reg.get_task("memo")
    assert task["active_version"] == 1 and task["num_virtual_tokens"] == 8
    meta = task["versions"][-1]["meta"]
    assert task["versions"][-1]["source"] == "train"
    assert meta["train_loss"] < 0.1 * meta["train_loss_start"], meta
    assert meta["eval_accuracy"] == 1.0
    assert meta["base_model"] == tiny_model_dir.name and meta["epochs"] == 150
    assert meta["num_virtual_tokens"] == 8 and meta["hyperparameters"]["lr"] == 0.3
    assert len(meta["data_sha256"]) == 64 and meta["eval_loss"] is not None

    # greedy decoding with PEFT's forward (no KV cache) from the registered embeddings
    prompt = reg.load_prompt(task["sha256"])
    folder = write_adapter_folder(tmp_path / "export", prompt, base_model=str(tiny_model_dir),
                                  num_layers=2, num_attention_heads=4)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, folder).eval()
    for p, c in MEMO:
        ids = tok(p)["input_ids"]
        target = tok(c)["input_ids"] + [tok.eos_token_id]
        got = []
        with torch.no_grad():
            for _ in range(len(target)):
                x = torch.tensor([ids + got])
                got.append(int(peft_model(input_ids=x, attention_mask=torch.ones_like(x)).logits[0, -1].argmax()))
        assert got == target, (p, tok.decode(got))


def _train_cmd(tmp: Path, model: Path, data: Path, *extra: str) -> list[str]:
    return ["--task", "crash", "--data", str(data), "--epochs", "4", "--lr", "0.1",
            "--num-virtual-tokens", "4", "--batch-size", "1", "--grad-accum", "2", "--warmup-ratio", "0.1",
            "--weight-decay", "0.01", "--dropout", "--init", "vocab", "--seed", "7",
            *reg_args(tmp, model), *extra]


def test_kill_then_resume_is_bitwise_identical(tmp_path, tiny_model_dir, capsys):
    reg = make_registry(tmp_path)
    reg.create_task("crash", num_virtual_tokens=4, hidden_size=128, base_model=tiny_model_dir.name)
    reg.add_version("crash", torch.zeros(4, 128), source="test")
    data = write_jsonl(tmp_path / "d.jsonl", MEMO * 2)
    out_dir = tmp_path / "ckpt"

    cmd = [sys.executable, "-m", "training.train",
           *_train_cmd(tmp_path, tiny_model_dir, data, "--output-dir", str(out_dir), "--save-steps", "1")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not (out_dir / "checkpoint.json").exists():  # written right after checkpoint.pt
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    summary = json.loads((out_dir / "checkpoint.json").read_text())
    assert 0 < summary["global_step"] < summary["total_steps"]
    assert [v["version"] for v in reg.get_task("crash")["versions"]] == [1]  # nothing registered

    assert main(_train_cmd(tmp_path, tiny_model_dir, data, "--output-dir", str(out_dir), "--resume")) == 0
    assert "resuming from" in capsys.readouterr().out
    resumed = reg.get_task("crash")
    assert resumed["active_version"] == 2

    assert main(_train_cmd(tmp_path, tiny_model_dir, data)) == 0  # uninterrupted, same seed
    straight = reg.get_task("crash")
    assert straight["active_version"] == 3
    a = reg.load_prompt(resumed["versions"][1]["sha256"])
    b = reg.load_prompt(straight["versions"][2]["sha256"])
    assert torch.equal(a, b)
    assert resumed["versions"][1]["sha256"] == straight["versions"][2]["sha256"]
    losses = [[h["train_loss"] for h in t["versions"][-1]["meta"]["history"]] for t in (resumed, straight)]
    assert losses[0] == losses[1]


def test_resume_refuses_other_settings(tmp_path, tiny_model_dir, capsys):
    make_registry(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    common = ["--task", "x", "--data", str(data), "--create", "--epochs", "1", "--output-dir", str(tmp_path / "o"),
              *reg_args(tmp_path, tiny_model_dir)]
    assert main(common) == 0
    capsys.readouterr()
    assert main([*common, "--resume", "--lr", "0.5"]) == 2
    assert "lr: checkpoint 0.03 != now 0.5" in capsys.readouterr().err


def test_missing_task_needs_create(tmp_path, tiny_model_dir, capsys):
    reg = make_registry(tmp_path)
    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    assert main(["--task", "nope", "--data", str(data), *reg_args(tmp_path, tiny_model_dir)]) == 2
    assert "--create" in capsys.readouterr().err
    with pytest.raises(TaskNotFound):
        reg.get_task("nope")


def test_server_upload(tmp_path, tiny_model_dir, capsys, monkeypatch):
    import httpx

    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        assert request.headers["authorization"] == "Bearer admin-secret"
        if request.url.path == "/health":  # the served base model: the one --model names
            return httpx.Response(200, json={"status": "ok", "model": tiny_model_dir.name})
        if request.method == "GET":
            return httpx.Response(404, json={"error": {"message": "no task", "type": "x", "code": 404}})
        if request.url.path == "/v1/tasks":
            assert json.loads(request.content)["num_virtual_tokens"] == 4
            return httpx.Response(201, json={"name": "up"})
        body = request.content
        assert b'name="adapter_model.safetensors"' in body and b'name="adapter_config.json"' in body
        return httpx.Response(201, json={"version": 2, "sha256": "ab" * 32})

    monkeypatch.setenv("POLYPROMPT_ADMIN_KEY", "admin-secret")
    real_client = httpx.Client
    monkeypatch.setattr(httpx, "Client", lambda **kw: real_client(transport=httpx.MockTransport(handler), **kw))
    data = write_jsonl(tmp_path / "d.jsonl", MEMO)
    rc = main(["--task", "up", "--data", str(data), "--epochs", "1", "--num-virtual-tokens", "4",
               "--server", "http://polyprompt.test", "--create", "--model", str(tiny_model_dir), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    assert "registered up v2" in capsys.readouterr().out
    assert [(c.method, c.url.path) for c in calls] == [
        ("GET", "/health"), ("GET", "/v1/tasks/up"), ("POST", "/v1/tasks"), ("POST", "/v1/tasks/up/prompt")]
    config = json.loads(next(part for part in calls[-1].content.split(b"\r\n\r\n") if b"peft_type" in part)
                        .split(b"\r\n--")[0])
    assert config["base_model_name_or_path"] == tiny_model_dir.name  # the server's id, not a local path
