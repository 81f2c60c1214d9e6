"""`python -m bench.sweep --smoke` end to end on the tiny model: a real `polyprompt serve`,
tasks registered over HTTP, streamed closed-loop load at every point of the three
dimensions, the table and the JSON (~20 s)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow  # a real `polyprompt serve` subprocess


def test_sweep_smoke(tiny_model_dir, tmp_path):
    from bench import sweep

    out = tmp_path / "sweep.json"
    assert sweep.main(["--smoke", "--model", str(tiny_model_dir), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    rows = res["results"]
    # the smoke points: in flight 1,4; prompt 8,24; tasks 1,6 (3 at the base point), shared base point once
    points = {(r["concurrency"], r["prompt_len"], r["tasks"]) for r in rows}
    assert points == {(1, 8, 3), (4, 8, 3), (4, 24, 3), (4, 8, 1), (4, 8, 6)}
    assert len(rows) == len(points)
    for r in rows:
        assert "error" not in r, r
        assert r["errors"] == 0 and r["tok_s"] > 0 and r["req_s"] > 0 and r["measured"] > 0, r
        assert 0 < r["ttft_p50"] <= r["latency_p50"], r
        assert r["tokens_per_request"] == 4  # --new-tokens 4, ignore_eos: every request runs to its length
        assert r["prefix_hits"] + r["prefix_misses"] > 0
    one_task = next(r for r in rows if r["tasks"] == 1)
    assert one_task["prefix_hit_rate"] == 1.0  # one task's prefix stays cached
    assert {"model_name", "avx512_bf16", "amx_bf16"} <= set(res["machine"]["cpu"])
    assert res["machine"]["torch"] and res["command"][-2:] == ["--out", str(out)]
    for title in ("in flight", "prompt tokens", "distinct tasks"):
        assert title in res["table"]
