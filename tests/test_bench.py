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


def test_cpu_bench_smoke_engine_and_http_exact(tiny_model_dir, tmp_path):
    """`python -m bench` end to end on the tiny model: the baseline, the engine and a real
    `polyprompt serve` over HTTP, run twice each, and the tasks pairs; fp32 tokens equal
    the naive baseline's."""
    from bench.__main__ import main

    out = tmp_path / "bench.json"
    rc = main(["--model", str(tiny_model_dir), "--requests", "8", "--tasks", "2", "--naive-requests", "4",
               "--clients", "4", "--max-num-seqs", "4", "--new-tokens", "6",
               "--scenarios", "naive,engine,http,tasks,kernels",
               "--repeats", "2", "--tasks-compare", "1,2", "--tasks-repeats", "2", "--out", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0
    rows = {r["scenario"]: r for r in res["rows"]}
    for name in ("polyprompt engine (in-process)", "polyprompt HTTP (4 clients)"):
        assert rows[name]["exact"] == 1.0, name
        assert rows[name]["tokens"] == 8 * 6
    assert len(res["extra"]["runs_engine_float32"]) == len(res["extra"]["runs_http_float32"]) == 2
    assert "http float32: tok/s of each run" in res["table"]
    for state in ("cold", "warm"):
        t = res["extra"][f"tasks_ratio_float32_{state}"]
        assert len(t["pair_ratios"]) == 2 and min(t["pair_ratios"]) <= t["ratio"] <= max(t["pair_ratios"])
    k = res["extra"]["kernels_float32"]
    if k["available"]:  # fp32: the native kernels change no token
        assert k["same_tokens"] == 1.0 and len(k["pair_ratios"]) == 2
        assert rows["engine, native kernels on"]["tokens"] == rows["engine, native kernels off"]["tokens"] == 8 * 6
        assert "with / without the native CPU kernels" in res["table"]


def test_step_profile_smoke_on_cpu(tmp_path):
    """`python -m bench.step_profile` on CPU: both decode paths timed and profiled."""
    from bench import step_profile

    assert step_profile.main(["--device", "cpu", "--size", "tiny", "--rows", "4", "--graphs", "both",
                              "--trace-steps", "1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "step_profile.json").read_text())
    assert set(res["runs"]) == {"rows=4 graphs", "rows=4 eager"}
    for run in res["runs"].values():
        assert run["steps"] > 0 and 0 < run["model_call_ms"] <= run["step_ms"]
        assert run["prefill_cold_prefixes_ms"] > 0 and run["prefill_warm_prefixes_ms"] > 0
    assert (tmp_path / "trace_rows4_graphs.json").exists()


def test_interleaved_engines_match_a_lone_engine(tiny_model_dir):
    """`run_interleaved` (the `tasks` and `kernels` scenarios): engines sharing one model and
    stepped in turn each produce exactly what one engine alone does, and each is timed over
    its own steps only."""
    from bench import baselines as B
    from bench import engine_bench as E

    model, tok = E.load_engine_model(tiny_model_dir, "float32")
    _, wl = B.load_workload(tiny_model_dir, n_tasks=3, n_requests=10, prompt_len=12, new_tokens=7,
                            virtual=(2, 9), seed=3)
    other = wl.retasked(2, 5, seed=11)
    kw = dict(max_num_seqs=4, max_num_batched_tokens=64)
    alone = E.run_engine(model, tok, wl, **kw)
    for warm in (False, True):
        a, b, c = E.run_interleaved(model, tok, [wl, other, wl], warm_prefixes=warm, **kw)
        assert a["outputs"] == c["outputs"] == alone["outputs"]
        assert b["outputs"] == E.run_engine(model, tok, other, **kw)["outputs"]
        for r in (a, b, c):
            assert r["tokens"] == 10 * 7 and r["finish_reasons"] == {"length": 10} and r["seconds"] > 0
        # more requests than slots: the engines run several waves, interleaved
        assert a["steps"] >= 3 * 7


def test_overload_scenario_smoke(tiny_model_dir, tmp_path):
    """`--scenarios overload` end to end on the tiny model, a few seconds of it: capacity
    measured, then open-loop arrivals above it with some clients abandoning; every request
    sent is accounted for exactly once. No timing is asserted (shared 2-core machine)."""
    from bench.__main__ import main

    out = tmp_path / "bench.json"
    rc = main(["--model", str(tiny_model_dir), "--scenarios", "overload", "--requests", "8", "--tasks", "2",
               "--max-num-seqs", "4", "--new-tokens", "6", "--capacity-seconds", "2", "--overload-seconds", "3",
               "--overload-abandon", "0.3", "--max-queue-wait", "0.5", "--out", str(out)])
    res = json.loads(out.read_text())
    assert rc == 0
    r = res["extra"]["overload_float32"]
    cap, ov = r["capacity"], r["overload"]
    assert cap["req_s"] > 0 and cap["ok"] > 0 and cap["service_time_s"] > 0
    assert ov["sent"] > 0 and ov["ok"] > 0
    assert ov["sent"] == (ov["ok"] + ov["503"] + sum(ov["other"].values()) + ov["abandoned"]
                          + sum(ov["client_errors"].values()))
    assert ov["503"] == ov["503_with_retry_after"] + ov["503_without_retry_after"]
    for key in ("latency_ok_p50", "latency_ok_p99", "goodput_req_s", "goodput_tok_s", "achieved_send_req_s"):
        assert ov[key] is not None, key
    assert r["goodput_share"] >= 0 and r["server_alive"]
    for key in ("rss_before", "rss_after_capacity", "rss_after_overload"):
        assert r[key]["rss_mib"] > 0, key
    assert set(r["checks"]) >= {"p99_within_bound", "goodput_at_least_90pct", "no_5xx_but_503"}
    assert "overload float32:" in res["table"] and "abandoned" in res["table"]


def _cpu_seconds(pid: int) -> float:
    import os

    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def test_quiet_stops_the_servers_not_being_timed():
    """`bench.quiet.Quiet` on real processes: a busy child in its own process group and one
    in ours; while another system is timed both get no CPU time, the one being timed does,
    and resume_all leaves them all running (so that they can be shut down)."""
    import subprocess
    import sys
    import time

    from bench.quiet import Quiet

    busy = [sys.executable, "-c", "while True: pass"]
    group = subprocess.Popen(busy, start_new_session=True)
    single = subprocess.Popen(busy)
    try:
        with Quiet() as q:
            q.add("vllm", group.pid, group=True)
            q.add("http", single.pid)
            time.sleep(0.5)
            q.timing(None)  # the in-process engine is timed: both stopped
            time.sleep(0.2)
            before = {p.pid: _cpu_seconds(p.pid) for p in (group, single)}
            time.sleep(1.0)
            assert all(_cpu_seconds(pid) - t < 0.05 for pid, t in before.items())
            q.timing("http")  # polyprompt HTTP timed: it runs, vLLM stays stopped
            t_single, t_group = _cpu_seconds(single.pid), _cpu_seconds(group.pid)
            time.sleep(1.0)
            assert _cpu_seconds(single.pid) - t_single > 0.3
            assert _cpu_seconds(group.pid) - t_group < 0.05
        t_group = _cpu_seconds(group.pid)  # left the with block: everything continued
        time.sleep(1.0)
        assert _cpu_seconds(group.pid) - t_group > 0.3
        assert Quiet(on=False).timing(None) is None  # --keep-idle-running: nothing stopped
    finally:
        for p in (group, single):
            p.kill()
            p.wait()
