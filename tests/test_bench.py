"""The GPU check script runs end to end on CPU (bf16 standing in for fp16), so a GPU
session spends its minutes measuring, not debugging the script."""

from __future__ import annotations

import json

from bench import gpu


def test_gpu_script_smoke_on_cpu(tmp_path):
    out = tmp_path / "gpu.json"
    rc = gpu.main(["--device", "cpu", "--size", "tiny", "--requests", "8", "--tasks", "2", "--new-tokens", "8",
                   "--naive-requests", "2", "--max-num-seqs", "4", "--repeats", "1", "--control-std", "",
                   "--out", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0 and res["errors"] == {}
    g = res["agreement"]
    assert g["fp32_engine_vs_hf_fp32_identical"] == 1.0  # the engine's fp32 greedy == HF's, token for token
    assert g["fp32_first_step"]["max_abs_logit_diff"] < 1e-3
    for key in ("engine_fp16", "engine_fp32_tf32", "tasks_fp16", "naive", "grouped"):
        assert res[key], key
    assert any("tok/s" in line for line in res["summary"])
