"""adapters: PEFT prompt-tuning folders both ways, validation errors, initial prompts."""

from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as st_save

from adapters.init import initial_prompt
from adapters.peft_format import (
    AdapterError,
    parse_adapter_config,
    parse_prompt_safetensors,
    read_adapter_folder,
    write_adapter_folder,
)

HIDDEN = 64


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=HIDDEN, n_head=4, vocab_size=50257, n_positions=1024)
    out = tmp_path_factory.mktemp("base")
    GPT2LMHeadModel(cfg).save_pretrained(out)
    return out


def _base(base_dir: Path):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(base_dir)


def _st(**tensors: torch.Tensor) -> bytes:
    return st_save(tensors)


def test_peft_save_pretrained_folder_reads(base_dir: Path, tmp_path: Path) -> None:
    from peft import PromptTuningConfig, get_peft_model

    pm = get_peft_model(_base(base_dir), PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=5))
    pm.save_pretrained(tmp_path / "ad")
    emb, cfg = read_adapter_folder(tmp_path / "ad", expected_hidden=HIDDEN)
    want = pm.prompt_encoder["default"].embedding.weight.detach()
    assert emb.shape == (5, HIDDEN) and emb.dtype == torch.float32 and emb.is_contiguous()
    assert torch.equal(emb, want)
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["num_virtual_tokens"] == 5


def test_write_folder_loads_in_peft(base_dir: Path, tmp_path: Path) -> None:
    from peft import PeftModel

    emb = torch.randn(7, HIDDEN)
    write_adapter_folder(tmp_path / "out", emb, base_model=str(base_dir), num_layers=2, num_attention_heads=4)
    cfg = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "PROMPT_TUNING" and cfg["task_type"] == "CAUSAL_LM"
    assert cfg["num_virtual_tokens"] == 7 and cfg["token_dim"] == HIDDEN
    pm = PeftModel.from_pretrained(_base(base_dir), tmp_path / "out")
    assert pm.peft_config["default"].num_virtual_tokens == 7
    assert torch.equal(pm.prompt_encoder["default"].embedding.weight.detach(), emb)
    back, _ = read_adapter_folder(tmp_path / "out", expected_hidden=HIDDEN)
    assert torch.equal(back, emb)


def test_half_precision_is_upcast() -> None:
    emb = torch.randn(3, HIDDEN).half()
    out = parse_prompt_safetensors(_st(prompt_embeddings=emb), expected_hidden=HIDDEN)
    assert out.dtype == torch.float32 and torch.equal(out, emb.float())


@pytest.mark.parametrize(
    ("data", "match"),
    [
        (pickle.dumps({"prompt_embeddings": [1.0]}), "pickled .bin files are refused"),
        (b"PK\x03\x04" + b"\0" * 100, "pickled .bin files are refused"),
        (b"hello world, not a tensor file", "not a safetensors"),
        (b"abc", "not a safetensors"),
        (_st(weight=torch.zeros(2, HIDDEN), other=torch.zeros(1)), "keys found: other, weight"),
        (_st(prompt_embeddings=torch.zeros(2, 3, HIDDEN)), "2-D"),
        (_st(prompt_embeddings=torch.zeros(HIDDEN)), "2-D"),
        (_st(prompt_embeddings=torch.zeros(3, 32)), "hidden size 32 != model's 64"),
        (_st(prompt_embeddings=torch.zeros(0, HIDDEN)), "0 rows"),
        (_st(prompt_embeddings=torch.zeros(1025, HIDDEN)), "1025 rows"),
        (_st(prompt_embeddings=torch.zeros(3, HIDDEN, dtype=torch.int32)), "float dtype"),
        (_st(prompt_embeddings=torch.tensor([[float("nan")] * HIDDEN])), "non-finite"),
        (_st(prompt_embeddings=torch.tensor([[float("inf")] * HIDDEN])), "non-finite"),
    ],
)
def test_bad_prompt_files(data: bytes, match: str) -> None:
    with pytest.raises(AdapterError, match=match):
        parse_prompt_safetensors(data, expected_hidden=HIDDEN)


def test_torch_save_file_refused() -> None:
    buf = io.BytesIO()
    torch.save({"prompt_embeddings": torch.zeros(2, HIDDEN)}, buf)
    with pytest.raises(AdapterError, match="pickled .bin files are refused"):
        parse_prompt_safetensors(buf.getvalue(), expected_hidden=HIDDEN)
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())):
        pass  # (it really is a zip)


def test_size_cap(monkeypatch: pytest.MonkeyPatch) -> None:
    import adapters.peft_format as pf

    with pytest.raises(AdapterError, match="over the 64.0 MiB limit"):
        parse_prompt_safetensors(b"\0" * (64 * 1024 * 1024 + 1), expected_hidden=HIDDEN)
    monkeypatch.setattr(pf, "MAX_PROMPT_BYTES", 1000)
    with pytest.raises(AdapterError, match="over the 1000 bytes limit"):
        parse_prompt_safetensors(_st(prompt_embeddings=torch.zeros(8, HIDDEN)), expected_hidden=HIDDEN)


def test_config_checks() -> None:
    data = _st(prompt_embeddings=torch.zeros(4, HIDDEN))
    good = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": 4, "token_dim": HIDDEN}
    assert parse_prompt_safetensors(data, expected_hidden=HIDDEN, config=good).shape == (4, HIDDEN)
    with pytest.raises(AdapterError, match="num_virtual_tokens=5 but prompt_embeddings has 4 rows"):
        parse_prompt_safetensors(data, expected_hidden=HIDDEN, config={**good, "num_virtual_tokens": 5})
    with pytest.raises(AdapterError, match="only PROMPT_TUNING"):
        parse_prompt_safetensors(data, expected_hidden=HIDDEN, config={**good, "peft_type": "LORA"})
    assert parse_adapter_config(json.dumps(good).encode())["num_virtual_tokens"] == 4
    with pytest.raises(AdapterError, match="only PROMPT_TUNING"):
        parse_adapter_config(b'{"peft_type": "LORA"}')
    with pytest.raises(AdapterError, match="not valid JSON"):
        parse_adapter_config(b"{nope")
    with pytest.raises(AdapterError, match="JSON object"):
        parse_adapter_config(b"[1, 2]")


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(AdapterError, match="not a folder"):
        read_adapter_folder(tmp_path / "missing", expected_hidden=HIDDEN)
    (tmp_path / "adapter_model.bin").write_bytes(pickle.dumps({}))
    with pytest.raises(AdapterError, match="pickled .bin files are refused"):
        read_adapter_folder(tmp_path, expected_hidden=HIDDEN)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(AdapterError, match="no adapter_model.safetensors"):
        read_adapter_folder(empty, expected_hidden=HIDDEN)
    lora = tmp_path / "lora"
    write_adapter_folder(lora, torch.zeros(2, HIDDEN), base_model="gpt2", num_layers=2, num_attention_heads=4)
    cfg = json.loads((lora / "adapter_config.json").read_text())
    (lora / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "LORA"}))
    with pytest.raises(AdapterError, match="only PROMPT_TUNING"):
        read_adapter_folder(lora, expected_hidden=HIDDEN)


class _Tok:
    def __call__(self, text: str) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}


def test_initial_prompt_modes() -> None:
    wte = torch.randn(300, 16) * 0.5
    t = initial_prompt(init="text", num_virtual_tokens=7, wte=wte, tokenizer=_Tok(), init_text="abc")
    assert torch.equal(t, wte[[97, 98, 99, 97, 98, 99, 97]])
    t = initial_prompt(init="text", num_virtual_tokens=2, wte=wte, tokenizer=_Tok(), init_text="abcdef")
    assert torch.equal(t, wte[[97, 98]])
    with pytest.raises(AdapterError, match="init_text"):
        initial_prompt(init="text", num_virtual_tokens=2, wte=wte, tokenizer=_Tok())
    v1 = initial_prompt(init="vocab", num_virtual_tokens=5, wte=wte, seed=1)
    assert torch.equal(v1, initial_prompt(init="vocab", num_virtual_tokens=5, wte=wte, seed=1))
    assert all(any(torch.equal(row, w) for w in wte) for row in v1)
    r1 = initial_prompt(init="random", num_virtual_tokens=200, wte=wte, seed=3)
    assert torch.equal(r1, initial_prompt(init="random", num_virtual_tokens=200, wte=wte, seed=3))
    assert not torch.equal(r1, initial_prompt(init="random", num_virtual_tokens=200, wte=wte, seed=4))
    assert r1.shape == (200, 16) and abs(float(r1.std()) - float(wte.std())) < 0.05
    for out in (t, v1, r1):
        assert out.dtype == torch.float32 and out.is_contiguous()
    with pytest.raises(AdapterError, match="unknown init"):
        initial_prompt(init="zeros", num_virtual_tokens=2, wte=wte)
    with pytest.raises(AdapterError, match="num_virtual_tokens"):
        initial_prompt(init="random", num_virtual_tokens=0, wte=wte)


def test_text_init_matches_peft(base_dir: Path) -> None:
    from peft import PromptTuningConfig, get_peft_model
    from transformers import AutoTokenizer

    tok_dir = Path(__file__).resolve().parent.parent / "server" / "assets" / "gpt2_tokenizer"
    tok = AutoTokenizer.from_pretrained(tok_dir)
    base = _base(base_dir)
    text = "Classify the sentiment:"
    pcfg = PromptTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=11, prompt_tuning_init="TEXT",
        prompt_tuning_init_text=text, tokenizer_name_or_path=str(tok_dir),
    )
    want = get_peft_model(base, pcfg).prompt_encoder["default"].embedding.weight.detach()
    got = initial_prompt(init="text", num_virtual_tokens=11, wte=base.transformer.wte.weight,
                         tokenizer=tok, init_text=text)
    assert torch.equal(got, want)
