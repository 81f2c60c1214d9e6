"""Helpers shared by the HTTP API tests (test_api.py, test_api_tasks.py)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from server.settings import Settings
from tests import peft_ref

EOS = 50256


def settings(model_dir: Path, data_dir: Path, **kw) -> Settings:
    """Test settings: CPU float32 (exact PEFT parity), no keys unless given (env is ignored), no
    response cache unless given (a repeated request must be computed again to test the engine)."""
    base = dict(model=str(model_dir), data_dir=str(data_dir), max_batch_size=16, device="cpu",
                dtype="float32", api_key=None, admin_key=None, db=None, kv_cache_gb=0.25,
                prefix_cache_mb=64.0, cuda_graphs=False, response_cache_mb=0.0)  # every repeat computed
    base.update(kw)
    return Settings(**base)


def make_peft_adapter(model_dir: Path, out: Path, *, num_virtual_tokens: int = 7, seed: int = 1):
    """A PEFT prompt-tuning adapter with random (std 0.3) prompt rows, saved with save_pretrained.

    Returns the PeftModel (eval mode), the reference for greedy parity.
    """
    from peft import PromptTuningConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    base = GPT2LMHeadModel.from_pretrained(model_dir)
    pm = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens))
    g = torch.Generator().manual_seed(seed)
    w = pm.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        w.copy_(torch.randn(w.shape, generator=g) * 0.3)
    pm.save_pretrained(out)
    pm.eval()
    return pm


def peft_greedy(pm, ids: list[int], max_new_tokens: int = 8) -> list[int]:
    """PEFT's greedy continuation, WITHOUT the KV cache (the cached path is wrong in peft 0.21)."""
    return peft_ref.peft_greedy(pm, ids, max_new_tokens)


def adapter_files(folder: Path) -> dict:
    """Multipart `files=` for an adapter folder, field names equal to the file names."""
    files = {}
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        p = folder / name
        if p.exists():
            files[name] = (name, p.read_bytes(), "application/octet-stream")
    return files


def config_bytes(folder: Path, **changes) -> bytes:
    cfg = json.loads((folder / "adapter_config.json").read_text())
    cfg.update(changes)
    return json.dumps(cfg).encode()


def assert_error(r, status: int, *needles: str) -> dict:
    """An OpenAI-shaped error with `status`, whose message contains every needle (case-insensitive)."""
    assert r.status_code == status, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert {"message", "type", "code"} <= set(err), err
    assert isinstance(err["message"], str) and err["message"]
    for n in needles:
        assert n.lower() in err["message"].lower(), (n, err["message"])
    return err


def greedy(client, model: str, prompt, max_tokens: int = 8, **kw) -> dict:
    r = client.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                             "temperature": 0, "return_token_ids": True, **kw})
    assert r.status_code == 200, r.text
    return r.json()


def complete(client, **body) -> dict:
    """A /v1/completions answer that must be a 200."""
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def sse(r) -> list:
    """Parse a text/event-stream body: list of JSON chunks, with the final '[DONE]' as a str."""
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/event-stream")
    events = []
    for block in r.text.split("\n\n"):
        if not block.strip():
            continue
        assert block.startswith("data: "), block
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    return events
