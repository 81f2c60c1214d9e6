"""`python -m bench.step_profile`: where one engine step's time goes, host and device.

    python -m bench.step_profile --device cuda --out prof/      # on a GPU machine
    python -m bench.step_profile --device cpu --size tiny       # smoke run

Runs the bench workload's first `--rows` requests through one `Engine` (graphs captured
by an untimed pass), then times each decode step of a second pass three ways:
- wall time of `Engine.step` on the host;
- time spent inside the model call (host side: building inputs, launching, and waiting
  for the result), and on CUDA the device time of the step's kernels (CUDA events around
  the model call);
- the rest: scheduling, bookkeeping, detokenizing, on the host.
Also the prefill step of those rows: wall time with every task's prefix computed in it
(cold) and with the prefix cache warm, and a profile of the warm one.
Then a `torch.profiler` trace of a few decode steps (`--out`: chrome trace + tables).
Needs torch and transformers only.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import baselines as B
from bench import engine_bench as E


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.step_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", choices=["small", "tiny"], default="small")
    p.add_argument("--dtype", default=None, help="default: float16 on CUDA, bfloat16 on CPU")
    p.add_argument("--rows", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128])
    p.add_argument("--graphs", choices=["on", "off", "both"], default="both")
    p.add_argument("--trace-steps", type=int, default=4)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    dev = torch.device(a.device)
    dtype = a.dtype or ("float16" if dev.type == "cuda" else "bfloat16")
    model_dir = B.ensure_model(a.size)
    model, tok = E.load_engine_model(model_dir, dtype, str(dev))
    _, wl = B.load_workload(model_dir, n_tasks=32, n_requests=max(a.rows), prompt_len=32, new_tokens=32,
                            virtual=(8, 32), seed=0)
    from server.engine.engine import Engine, EngineConfig

    cuda = dev.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    report = {"device": torch.cuda.get_device_name(dev) if cuda else "cpu", "dtype": dtype, "runs": {}}
    graph_modes = {"on": [True], "off": [False], "both": [True, False]}[a.graphs]
    for rows in a.rows:
        for graphs in graph_modes:
            eng = Engine(model, tok, EngineConfig(max_num_seqs=rows, static_decode=graphs,
                                                  kv_cache_dtype=E.kv_cache_dtype(dtype)))
            eng.warm_kernels()
            sub = B.Workload(wl.tasks, wl.requests[:rows], wl.new_tokens, wl.meta)
            E.run_engine(model, tok, sub, max_num_seqs=rows, max_num_batched_tokens=2048, engine=eng, tag="warm")
            # instrument the model call of each step
            inner, dev_ms = [], []
            static_call = "decode" if hasattr(eng.static, "decode") else "logits"  # older trees: logits
            target = (eng.static, static_call) if eng.static is not None else (model, "forward_step")
            orig = getattr(*target)

            def timed(*args, _orig=orig, **kw):
                t0 = time.perf_counter()
                if cuda:
                    e0, e1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    e0.record()
                out = _orig(*args, **kw)
                if cuda:
                    e1.record()
                    e1.synchronize()
                    dev_ms.append(e0.elapsed_time(e1))
                inner.append(1e3 * (time.perf_counter() - t0))
                return out

            setattr(*target, timed)
            reqs = E._requests(sub, "prof", key_prefix="prof:")
            for r in reqs:
                eng.add_request(r)
            walls = []
            sync()
            t0 = time.perf_counter()
            eng.step()  # the prefill, every task's prefix computed in it (new prefix keys)
            sync()
            prefill_cold = 1e3 * (time.perf_counter() - t0)
            inner.clear()
            dev_ms.clear()
            while eng.num_running:
                sync()
                t0 = time.perf_counter()
                eng.step()
                sync()
                walls.append(1e3 * (time.perf_counter() - t0))
            delattr(*target)  # the class's method again
            med = statistics.median
            key = f"rows={rows} {'graphs' if graphs else 'eager'}"
            run = {"prefill_cold_prefixes_ms": prefill_cold, "rows_prefilled": len(reqs),
                   "steps": len(walls), "step_ms": med(walls), "model_call_ms": med(inner),
                   "host_rest_ms": med(w - i for w, i in zip(walls, inner)),
                   "device_ms": med(dev_ms) if dev_ms else None}
            # a profiler trace of a few decode steps
            from torch.profiler import ProfilerActivity, profile

            reqs = E._requests(sub, "trace", key_prefix="prof:")
            for r in reqs:
                eng.add_request(r)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
            sync()
            with profile(activities=acts) as pprof:  # the prefill again, prefixes warm now
                t0 = time.perf_counter()
                eng.step()
                sync()
                run["prefill_warm_prefixes_ms"] = 1e3 * (time.perf_counter() - t0)
            pev = pprof.key_averages()
            run["prefill_host_ops"] = sum(e.count for e in pev if e.key.startswith("aten::"))
            if cuda:
                run["prefill_kernel_ms"] = sum(e.self_device_time_total for e in pev) / 1e3
                run["prefill_kernels"] = sum(e.count for e in pev if e.device_type.name == "CUDA")
            print(pev.table(sort_by="cpu_time_total", row_limit=20), flush=True)
            for _ in range(3):
                eng.step()
            sync()
            with profile(activities=acts) as prof:
                for _ in range(a.trace_steps):
                    eng.step()
                sync()
            while eng.num_running:
                eng.step()
            sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
            table = prof.key_averages().table(sort_by=sort, row_limit=25)
            evs = prof.key_averages()
            run["profiled_steps"] = a.trace_steps
            if cuda:
                run["kernel_ms_per_step"] = sum(e.self_device_time_total for e in evs) / 1e3 / a.trace_steps
                run["kernels_per_step"] = sum(e.count for e in evs if e.device_type.name == "CUDA") / a.trace_steps
            report["runs"][key] = run
            print(f"== {key}: {json.dumps(run)}", flush=True)
            print(table, flush=True)
            if a.out:
                a.out.mkdir(parents=True, exist_ok=True)
                tag = key.replace(" ", "_").replace("=", "")
                prof.export_chrome_trace(str(a.out / f"trace_{tag}.json"))
                (a.out / f"table_{tag}.txt").write_text(table)
            del eng
    if a.out:
        (a.out / "step_profile.json").write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
