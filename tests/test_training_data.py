"""Training data validation: every malformed case names its line, exits 2, registers nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from registry import Registry
from registry.errors import TaskNotFound
from server.testmodel import TOKENIZER_DIR
from training.data import DataError, load_jsonl, tokenize
from training.train import main

GOOD = json.dumps({"prompt": "Capital of France:", "completion": " Paris"})
LONG = json.dumps({"prompt": "word " * 1100, "completion": " x"})

CASES = {
    "bad_json": ('{"prompt": "a", "completion": ', "malformed JSON"),
    "missing": (json.dumps({"prompt": "a"}), 'missing field "completion"'),
    "non_string": (json.dumps({"prompt": 3, "completion": " b"}), 'field "prompt" must be a string, got int'),
    "empty_completion": (json.dumps({"prompt": "a", "completion": ""}), "empty completion"),
    "not_object": (json.dumps(["a", "b"]), "expected a JSON object"),
    "too_long": (LONG, "example too long"),
}


def write(tmp: Path, bad_line: str) -> Path:
    p = tmp / "data.jsonl"
    p.write_text("\n".join([GOOD, "", GOOD, bad_line, GOOD]) + "\n")  # the bad line is line 4
    return p


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_data_names_line_and_registers_nothing(case, tmp_path, tiny_model_dir, capsys):
    bad, expected = CASES[case]
    reg = Registry(f"sqlite:///{tmp_path}/r.db", tmp_path)
    reg.upgrade()
    data = write(tmp_path, bad)
    rc = main(["--task", "t", "--data", str(data), "--create", "--epochs", "1", "--no-progress",
               "--db", f"sqlite:///{tmp_path}/r.db", "--data-dir", str(tmp_path), "--model", str(tiny_model_dir)])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{data}: line 4: " in err and expected in err, err
    with pytest.raises(TaskNotFound):
        reg.get_task("t")


def test_too_long_message_says_by_how_much():
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    ex = load_jsonl_text('{"prompt": "a b c d e f", "completion": " g"}')
    with pytest.raises(DataError) as e:
        tokenize(ex, tok, path="d.jsonl", num_virtual_tokens=4, context=10)
    msg = str(e.value)
    assert "line 1: example too long: 8 tokens (6 prompt + 2 completion) + 4 virtual = 12 > 10 context" in msg
    assert "shorten it by 2 tokens or pass --skip-long" in msg


def load_jsonl_text(text: str):
    import tempfile

    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        f.write(text)
    return load_jsonl(f.name)


def test_all_errors_reported_and_eos_handling():
    with pytest.raises(DataError) as e:
        load_jsonl_text('{"prompt": "a"}\nnot json\n{"prompt": "a", "completion": 1}\n')
    assert [s.split(":")[0] for s in e.value.errors] == ["line 1", "line 2", "line 3"]
    tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
    ex = load_jsonl_text(GOOD + "\n")
    [t], _ = tokenize(ex, tok, path="d", num_virtual_tokens=4, context=1024)
    assert t.input_ids[-1] == tok.eos_token_id and t.num_label_tokens == 2  # " Paris" + EOS
    [t], _ = tokenize(ex, tok, path="d", num_virtual_tokens=4, context=1024, add_eos=False)
    assert t.num_label_tokens == 1 and t.prompt_len == len(tok("Capital of France:")["input_ids"])


def test_empty_file():
    with pytest.raises(DataError, match="no examples"):
        load_jsonl_text("\n\n")


def test_skip_long_counts(tmp_path, tiny_model_dir, capsys):
    reg = Registry(f"sqlite:///{tmp_path}/r.db", tmp_path)
    reg.upgrade()
    data = write(tmp_path, LONG)
    rc = main(["--task", "t", "--data", str(data), "--create", "--epochs", "1", "--skip-long", "--no-progress",
               "--db", f"sqlite:///{tmp_path}/r.db", "--data-dir", str(tmp_path), "--model", str(tiny_model_dir)])
    out = capsys.readouterr().out
    assert rc == 0
    assert "skipped 1 training and 0 eval examples" in out
    meta = reg.get_task("t")["versions"][-1]["meta"]
    assert meta["skipped_long"] == 1 and meta["train_examples"] == 3
