"""`python -m bench`: polyprompt against what users do without it, measured in the same run.

    python -m bench --size tiny --requests 16 --tasks 4 --naive-requests 4   # smoke run
    python -m bench                                                         # the full 124M run
    python -m bench --dtype float32,bfloat16 --out bench/out/results.json
    python -m bench --scenarios overload                                    # ~5 min, not in the default run

See bench/README.md for what each scenario measures.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from bench import baselines as B
from bench import engine_bench as E
from bench import peers as P
from bench import quiet as Q

SCENARIOS = ("naive", "grouped", "engine", "http", "tasks", "kernels", "latency")
EXTRA_SCENARIOS = ("overload",) + P.NAMES  # only when named in --scenarios (peers: or their --*-python given)


def _csv(kind):
    return lambda s: [kind(x) for x in s.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scenarios", type=_csv(str), default=list(SCENARIOS),
                   help="comma list of " + ",".join(SCENARIOS + EXTRA_SCENARIOS) + " (" + ", ".join(EXTRA_SCENARIOS)
                   + " only when named; the peers also when their --*-python is given)")
    p.add_argument("--size", choices=["small", "tiny"], default="small", help="random GPT-2: 124M shape or tiny")
    p.add_argument("--model", type=Path, default=None, help="use this GPT-2 folder instead of bench/out/model-SIZE")
    p.add_argument("--dtype", type=_csv(str), default=["float32"], help="engine/HTTP dtypes, e.g. float32,bfloat16")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--virtual-tokens", type=_csv(int), default=[8, 32], help="MIN,MAX virtual tokens per task")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (each uniform in 0.75-1.25x)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--naive-requests", type=int, default=16, help="naive runs on this many requests")
    p.add_argument("--clients", type=int, default=64, help="concurrent HTTP clients")
    p.add_argument("--max-num-seqs", type=int, default=64, help="engine running sequences (server --max-batch-size)")
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--warm-prefixes", action="store_true",
                   help="engine: every task's prefix cached before each timed run (a server's steady state, as "
                        "in the http scenario, whose tasks' prefixes are computed at registration); default cold")
    p.add_argument("--grouped-batch", type=int, default=64, help="largest HF batch in the grouped baseline")
    p.add_argument("--tasks-compare", type=_csv(int), default=[1, 64], help="task counts for the 'tasks' scenario")
    p.add_argument("--tasks-repeats", type=int, default=5,
                   help="interleaved runs in 'tasks' and 'kernels'; the ratio is their median")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs of 'engine' and 'http' per dtype, alternating; the table shows the median run")
    p.add_argument("--rate", type=float, default=4.0, help="Poisson request rate (req/s) for 'latency'")
    p.add_argument("--latency-requests", type=int, default=64)
    o = p.add_argument_group("overload", "the 'overload' scenario (bench/overload.py)")
    o.add_argument("--overload-seconds", type=float, default=180.0, help="open-loop overload phase length")
    o.add_argument("--overload-factor", type=float, default=1.5, help="arrival rate as a multiple of capacity")
    o.add_argument("--overload-abandon", type=float, default=0.1,
                   help="share of clients that give up after a short random timeout")
    o.add_argument("--max-queue-wait", type=float, default=5.0,
                   help="polyprompt serve --max-queue-wait for 'overload' (0: no bound)")
    o.add_argument("--overload-max-queue", type=int, default=1024, help="polyprompt serve --max-queue for 'overload'")
    o.add_argument("--capacity-seconds", type=float, default=40.0, help="closed-loop capacity phase length")
    o.add_argument("--capacity-clients", type=int, default=0, help="capacity phase clients (0: 2 x --max-num-seqs)")
    p.add_argument("--keep-idle-running", action="store_true",
                   help="leave the other systems' servers running while one is timed (default: stopped with "
                        "SIGSTOP meanwhile, bench/quiet.py: an idle vLLM server polls)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads here and OMP_NUM_THREADS for the server (0: torch's default)")
    P.add_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="write all results as JSON here")
    a = p.parse_args(argv)
    a.scenarios += [n for n in P.selected(a) if n not in a.scenarios]
    bad = [s for s in a.scenarios if s not in SCENARIOS + EXTRA_SCENARIOS]
    if bad:
        p.error(f"unknown scenario(s) {bad}; choose from {','.join(SCENARIOS + EXTRA_SCENARIOS)}")
    if not 0 <= a.overload_abandon <= 1 or a.overload_factor <= 0 or a.overload_seconds <= 0:
        p.error("--overload-abandon takes 0..1, --overload-factor and --overload-seconds a positive number")
    bad = [d for d in a.dtype if d not in E.DTYPES]
    if bad:
        p.error(f"unknown dtype(s) {bad}; choose from {','.join(E.DTYPES)}")
    if a.repeats < 1 or a.tasks_repeats < 1:
        p.error("--repeats and --tasks-repeats take at least 1")
    if len(a.virtual_tokens) != 2 or not 1 <= a.virtual_tokens[0] <= a.virtual_tokens[1]:
        p.error("--virtual-tokens takes MIN,MAX with 1 <= MIN <= MAX")
    a.naive_requests = min(a.naive_requests, a.requests)
    return a


def _exact(outs, ref) -> float | None:
    if ref is None or outs is None:
        return None
    pairs = [(o, r) for o, r in zip(outs, ref) if r is not None and o is not None]
    return sum(o == r for o, r in pairs) / len(pairs) if pairs else None


def _prefix(outs, ref) -> float | None:
    """Mean number of leading tokens equal to the reference's (where rounding first bites)."""
    if ref is None or outs is None:
        return None
    n = [B.leading_equal(o, r) for o, r in zip(outs, ref) if o is not None and r is not None]
    return sum(n) / len(n) if n else None


def _median_run(runs: list[dict]) -> dict:
    """The run with the median throughput (the lower middle one of an even count)."""
    ranked = sorted(runs, key=lambda r: r["tokens"] / r["seconds"])
    return ranked[(len(ranked) - 1) // 2]


def _log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _loadavg() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def main(argv=None) -> int:
    a = parse_args(argv)
    a.loadavg_start = _loadavg()
    torch.manual_seed(a.seed)
    if a.threads > 0:
        torch.set_num_threads(a.threads)
    model_dir = a.model or B.ensure_model(a.size)
    _, wl = B.load_workload(model_dir, n_tasks=a.tasks, n_requests=a.requests, prompt_len=a.prompt_len,
                            new_tokens=a.new_tokens, virtual=tuple(a.virtual_tokens), seed=a.seed)
    flops = B.FlopModel.from_config(model_dir)
    sc = set(a.scenarios)
    rows: list[dict] = []
    extra: dict = {}
    need_dtypes = sorted(set(a.dtype) | ({"float32"} if sc & {"naive", "grouped"} else set()))
    roof = {}
    for d in need_dtypes:
        roof[d] = B.matmul_roofline(E.DTYPES[d])
        _log(f"matmul roofline {d}: {roof[d] / 1e9:.1f} GFLOP/s")

    def row(name, dtype, reqs, r, note=""):
        f = flops.workload_flops(wl if "wl" not in r else r["wl"], reqs)
        tps = r["tokens"] / r["seconds"]
        rows.append({"scenario": name, "dtype": dtype, "requests": len(reqs), "tokens": r["tokens"],
                     "seconds": r["seconds"], "tok_s": tps, "gflop_s": f / r["seconds"] / 1e9,
                     "roofline_frac": f / r["seconds"] / roof[dtype], "exact": r.get("exact"),
                     "common_prefix": r.get("prefix"), "note": note})
        _log(f"{name} {dtype}: {tps:.1f} tok/s ({r['tokens']} tokens in {r['seconds']:.2f}s)")

    naive_ref = None
    if sc & {"naive", "grouped"}:
        hf = B.load_hf(model_dir)
        if "naive" in sc:
            _log(f"naive: {a.naive_requests} requests, one at a time")
            outs, sec = B.run_naive(hf, wl, a.naive_requests)
            naive_ref = outs
            row("naive (HF generate, 1 at a time)", "float32", wl.requests[:a.naive_requests],
                {"tokens": sum(map(len, outs)), "seconds": sec, "exact": 1.0})
        if "grouped" in sc:
            _log(f"grouped: {a.requests} requests batched per task")
            outs, sec = B.run_grouped(hf, wl, a.grouped_batch)
            row("grouped (HF generate per task)", "float32", wl.requests,
                {"tokens": sum(map(len, outs)), "seconds": sec, "exact": _exact(outs, naive_ref),
                 "prefix": _prefix(outs, naive_ref)})
        del hf
        gc.collect()

    for d in a.dtype:
        model = etok = srv = peers = None
        quiet = Q.Quiet(on=not a.keep_idle_running)
        try:
            if sc & {"engine", "tasks", "kernels"}:
                model, etok = E.load_engine_model(model_dir, d)
            if sc & {"http", "latency"}:
                from bench import http_bench as H

                _log(f"http {d}: starting polyprompt serve")
                srv = H.Server(model_dir, dtype=d, max_batch_size=a.max_num_seqs,  # every answer computed:
                               max_num_batched_tokens=a.max_num_batched_tokens, threads=a.threads,  # the warm-up and
                               extra_args=["--response-cache-mb", "0"]).__enter__()  # repeats resend the prompts
                srv.register(wl.tasks)
                quiet.add("http", srv.proc.pid)
                _log(f"http {d}: serving on {srv.url}, {len(wl.tasks)} tasks registered")
            if sc & set(P.NAMES):
                peers = P.Peers(a, model_dir, wl, d, _log, quiet).__enter__()
            kw = dict(max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                      kv_cache_dtype=E.kv_cache_dtype(d))
            runs: dict[str, list[dict]] = {"engine": [], "http": []}
            # in-process and HTTP runs alternate, so drift of the machine's speed hits both alike
            for rep in range(a.repeats):
                if "engine" in sc:
                    _log(f"engine {d}: {a.requests} requests, {a.tasks} tasks, run {rep + 1}/{a.repeats}")
                    quiet.timing(None)
                    runs["engine"].append(E.run_engine(model, etok, wl, warm_prefixes=a.warm_prefixes, **kw))
                if peers:  # engine, openvino, engine, openvino, ...
                    peers.after_engine(rep, runs["engine"][-1] if "engine" in sc else None)
                if "http" in sc:
                    _log(f"http {d}: {a.clients} clients, run {rep + 1}/{a.repeats}")
                    quiet.timing("http")
                    runs["http"].append(H.run_http_throughput(srv, wl, a.clients))
                if peers:  # polyprompt HTTP, vllm, polyprompt HTTP, vllm, ...
                    peers.after_http(rep, runs["http"][-1] if "http" in sc else None)
            names = (("engine", "polyprompt engine (in-process%s)" % (", warm prefixes" if a.warm_prefixes else "")), ("http", f"polyprompt HTTP ({a.clients} clients)"))
            for key, name in names:
                if not runs[key]:
                    continue
                r = _median_run(runs[key])
                r["exact"] = _exact(r["outputs"], naive_ref)
                r["prefix"] = _prefix(r["outputs"], naive_ref)
                if key == "engine":
                    extra[f"engine_{d}"] = {k: r[k] for k in ("steps", "finish_reasons", "prefix_cache")}
                if len(runs[key]) > 1:
                    extra[f"runs_{key}_{d}"] = [x["tokens"] / x["seconds"] for x in runs[key]]
                row(name, d, wl.requests, r, note=f"median of {len(runs[key])}" if len(runs[key]) > 1 else "")
            if peers:
                extra[f"peers_{d}"] = peers.finish(row)
            quiet.timing(None)  # in-process scenarios next
            if "tasks" in sc:
                nv = (a.virtual_tokens[0] + a.virtual_tokens[1]) // 2
                ns = a.tasks_compare
                works = {n: wl.retasked(n, nv, a.seed + 1000 + n) for n in ns}
                for warm in (False, True):
                    state = "warm" if warm else "cold"
                    tries: dict[int, list[dict]] = {n: [] for n in ns}
                    ratios = []
                    for rep in range(a.tasks_repeats):
                        _log(f"tasks {d}: same {a.requests} requests over {' and '.join(map(str, ns))} tasks, "
                             f"{nv} virtual tokens each, {state} prefix cache, steps interleaved, "
                             f"try {rep + 1}/{a.tasks_repeats}")
                        got = E.run_interleaved(model, etok, [works[n] for n in ns], warm_prefixes=warm, **kw)
                        for n, r in zip(ns, got):
                            tries[n].append({**r, "wl": works[n]})
                        first, last = got[0], got[-1]
                        ratios.append((last["tokens"] / last["seconds"]) / (first["tokens"] / first["seconds"]))
                    for n in ns:
                        r = _median_run(tries[n])
                        row(f"engine, {n} task{'s' if n != 1 else ''} ({nv} virt, {state})", d, r["wl"].requests, r)
                    if len(ns) >= 2:
                        extra[f"tasks_ratio_{d}_{state}"] = {"tasks": [ns[0], ns[-1]],
                                                             "ratio": statistics.median(ratios),
                                                             "pair_ratios": ratios}
            if "kernels" in sc:
                extra[f"kernels_{d}"] = _kernels_ab(a, model, etok, wl, kw, d, row)
            if "latency" in sc:
                quiet.timing("http")
                _log(f"latency {d}: {a.latency_requests} streamed requests at {a.rate} req/s (Poisson)")
                extra[f"latency_{d}"] = H.run_http_latency(srv, wl, a.rate, a.latency_requests, a.seed)
        finally:
            quiet.resume_all()  # before any shutdown: a stopped process does not act on SIGTERM
            if srv is not None:
                srv.__exit__(None, None, None)
            if peers is not None:
                peers.__exit__(None, None, None)
            del model
            gc.collect()
        if "overload" in sc:  # its own server, once the others are gone
            from bench import overload as O

            extra[f"overload_{d}"] = O.run_overload(
                model_dir, wl, dtype=d, max_num_seqs=a.max_num_seqs, max_num_batched_tokens=a.max_num_batched_tokens,
                threads=a.threads, seconds=a.overload_seconds, factor=a.overload_factor, abandon=a.overload_abandon,
                max_queue_wait=a.max_queue_wait, max_queue=a.overload_max_queue, capacity_seconds=a.capacity_seconds,
                capacity_clients=a.capacity_clients, seed=a.seed, log=_log)
    report = _report(a, rows, extra, roof)
    print(report)
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                   "model": str(model_dir), "workload": wl.meta, "roofline_flop_s": roof,
                   "non_embedding_params": flops.non_embedding_params, "rows": rows, "extra": extra,
                   "machine": {"platform": platform.platform(), "torch": torch.__version__,
                               "threads": torch.get_num_threads(),
                               "cpus": os.cpu_count(), "loadavg_start": a.loadavg_start,
                               "loadavg_end": _loadavg()}, "table": report}
        a.out.write_text(json.dumps(payload, indent=2, default=str) + "\n")
        _log(f"wrote {a.out}")
    return 0


def _kernels_ab(a, model, etok, wl, kw, d, row) -> dict:
    """The engine with the native CPU kernels and without (SDPA, torch ops): two engines on
    the model, their steps interleaved (`run_interleaved`, the kernels switched before each
    step), `--tasks-repeats` times; the median of the throughput ratios, and whether the
    tokens changed."""
    if not model.set_native_kernels(True):
        _log(f"kernels {d}: the native CPU kernels cannot run here; skipped")
        return {"available": False}
    tries: dict[bool, list[dict]] = {True: [], False: []}
    ratios = []
    try:
        for rep in range(a.tasks_repeats):
            _log(f"kernels {d}: engine with native kernels off and on, steps interleaved, "
                 f"try {rep + 1}/{a.tasks_repeats}")
            off, on = E.run_interleaved(model, etok, [wl, wl], before_step=[
                lambda: model.set_native_kernels(False), lambda: model.set_native_kernels(True)], **kw)
            tries[False].append(off)
            tries[True].append(on)
            ratios.append((on["tokens"] / on["seconds"]) / (off["tokens"] / off["seconds"]))
    finally:
        model.set_native_kernels(True)
    for on in (True, False):
        row(f"engine, native kernels {'on' if on else 'off'}", d, wl.requests, _median_run(tries[on]))
    same = statistics.mean(x == y for x, y in zip(tries[True][0]["outputs"], tries[False][0]["outputs"]))
    return {"available": True, "ratio": statistics.median(ratios), "pair_ratios": ratios, "same_tokens": same}


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def _report(a, rows, extra, roof) -> str:
    naive = next((r for r in rows if r["scenario"].startswith("naive")), None)
    lines = [f"polyprompt bench: {a.size} random GPT-2, {a.requests} requests x {a.new_tokens} new tokens, "
             f"{a.tasks} tasks ({a.virtual_tokens[0]}-{a.virtual_tokens[1]} virtual), ~{a.prompt_len}-token "
             f"prompts, greedy, torch threads {torch.get_num_threads()}, load average at start "
             f"{a.loadavg_start:.1f} at end {_loadavg():.1f} ({os.cpu_count()} CPUs)",
             "roofline (best [2048,768]x[768,3072] matmul): "
             + ", ".join(f"{d} {v / 1e9:.1f} GFLOP/s" for d, v in roof.items()), ""]
    head = ["scenario", "dtype", "reqs", "tokens", "sec", "tok/s", "x naive", "GFLOP/s", "% roof", "exact"]
    table = []
    for r in rows:
        ratio = r["tok_s"] / naive["tok_s"] if naive else None
        xn = _fmt(ratio, ".2f") + ("*" if ratio is not None and r["dtype"] != naive["dtype"] else "")
        table.append([r["scenario"], r["dtype"], str(r["requests"]), str(r["tokens"]), f"{r['seconds']:.2f}",
                      f"{r['tok_s']:.1f}", xn, f"{r['gflop_s']:.1f}", f"{100 * r['roofline_frac']:.1f}",
                      "-" if r["exact"] is None else f"{100 * r['exact']:.0f}%"
                      + ("" if r["common_prefix"] is None or r["exact"] == 1 else
                         f" ({r['common_prefix']:.1f}/{a.new_tokens})")])
    w = [max(len(h), *(len(t[i]) for t in table)) if table else len(h) for i, h in enumerate(head)]
    if table:  # none when only 'overload' ran
        lines.append("  ".join(h.ljust(w[i]) if i < 2 else h.rjust(w[i]) for i, h in enumerate(head)))
        lines.append("  ".join("-" * x for x in w))
        for t in table:
            lines.append("  ".join(c.ljust(w[i]) if i < 2 else c.rjust(w[i]) for i, c in enumerate(t)))
        lines.append("")
        lines.append("x naive: tok/s over the naive baseline's (float32, measured on its first "
                     f"{a.naive_requests} requests); * = against the float32 naive.")
        lines.append("% roof: achieved FLOP/s (2 x non-embedding params per virtual+prompt+fed-back token, "
                     "2 x C x V per generated token) / the same-dtype matmul roofline.")
        lines.append("exact: share of the naive subset's requests whose greedy tokens equal the naive baseline's "
                     "(in brackets: mean leading tokens equal).")
    for k, v in extra.items():
        if k.startswith("runs_"):
            lines.append(f"{k[5:].replace('_', ' ')}: tok/s of each run, in order: "
                         + ", ".join(f"{x:.0f}" for x in v))
        if k.startswith("tasks_ratio_"):
            pairs = ", ".join(f"{x:.2f}" for x in v.get("pair_ratios", []))
            lines.append(f"tasks {k[12:]}: {v['tasks'][1]} tasks / {v['tasks'][0]} task throughput = "
                         f"{v['ratio']:.2f} (median of interleaved runs: {pairs})")
        if k.startswith("kernels_") and v.get("available"):
            lines.append(f"kernels {k[8:]}: engine throughput with / without the native CPU kernels = "
                         f"{v['ratio']:.2f} (median of interleaved runs: "
                         + ", ".join(f"{x:.2f}" for x in v["pair_ratios"])
                         + f"); requests with identical tokens: {100 * v['same_tokens']:.0f}%")
        if k.startswith("peers_"):
            lines += P.report_lines(k[6:], v)
        if k.startswith("overload_"):
            from bench import overload as O

            lines += O.report_lines(f"overload {k[9:]}", v)
        if k.startswith("latency_"):
            lines.append(f"latency {k[8:]}: {v['requests']} streamed requests at {v['rate']:g} req/s: "
                         f"TTFT p50 {1e3 * v['ttft_p50']:.0f} ms, p99 {1e3 * v['ttft_p99']:.0f} ms; "
                         f"ITL p50 {1e3 * v['itl_p50']:.0f} ms, p99 {1e3 * v['itl_p99']:.0f} ms; "
                         f"{v['tokens'] / v['seconds']:.1f} tok/s")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
