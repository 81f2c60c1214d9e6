"""`python -m bench.gpu`: the checks only a GPU can show, in one run.

    python -m bench.gpu --out gpu.json                 # on a CUDA machine (124M random GPT-2)
    python -m bench.gpu --device cpu --size tiny       # smoke run of the script itself

Needs torch, transformers and safetensors only (no web stack, no database). Same seeded
workload as `python -m bench` (128 requests x 32 new tokens, 32 tasks of 8-32 virtual
tokens, ~32-token prompts, greedy, EOS ignored). It reports:

1. FP16 agreement with the float32 reference: the share of requests whose 32 greedy
   tokens from the float16 engine (CUDA graphs on) equal the float32 engine's (TF32 off),
   the mean number of leading tokens equal, and the largest first-step logit difference
   between our float16 forward and Hugging Face's float32 forward over
   `[soft prompt; prompt]` (PEFT's computation). Also float32 engine vs HF float32.
2. Engine tokens/s in float16 with CUDA graphs and without (eager dynamic steps), at
   each `--max-num-seqs`; graphs are captured in an untimed first pass, then each
   configuration is timed `--repeats` times on fresh prefix keys (cold prefix cache),
   the median reported (best and all kept in the JSON). Plus float32 with TF32 and the
   1-task vs 64-task ratio (median of back-to-back pairs).
3. The naive baseline (HF `generate` one request at a time, KV cache on) in float16 and
   float32, and the grouped baseline (per task, batched) in float16, on the same GPU.
Every section is fenced: one that fails records its error and the rest still run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import torch

from bench import baselines as B
from bench import engine_bench as E


def _log(msg: str) -> None:
    print(f"[gpu {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _same(outs, ref) -> tuple[float, float]:
    eq = sum(o == r for o, r in zip(outs, ref)) / len(ref)
    lead = [B.leading_equal(o, r) for o, r in zip(outs, ref)]
    return eq, sum(lead) / len(lead)


def _ours(model):
    def fn(soft, ids):
        emb = torch.cat([soft.to(model.wte.weight.dtype), model.wte(ids)])[None]  # [1, n+T, C]
        h, _ = model.forward_dense(emb, torch.arange(emb.shape[1], device=ids.device)[None])
        return model.logits(h[0, -1]).float()
    return fn


def _hf(hf):
    def fn(soft, ids):
        wte = hf.get_input_embeddings()
        emb = torch.cat([soft.to(wte.weight.dtype), wte(ids)])[None]
        return hf(inputs_embeds=emb).logits[0, -1].float()
    return fn


@torch.inference_mode()
def first_step_logits(fns: dict, hf32, wl: B.Workload, device) -> dict:
    """Largest |logit difference| at the first generated position, for each `fn(soft, ids)`
    in `fns` (ours or HF's, any dtype), against HF float32 over `[soft prompt; wte(ids)]`
    embeddings (computed once per request)."""
    ref_fn = _hf(hf32)
    stats = {name: {"max_abs_logit_diff": 0.0, "max_rel_logit_diff": 0.0, "first_token_argmax_same": 0}
             for name in fns}
    for task, ids in wl.requests:
        soft = wl.tasks[task].to(device)
        t = torch.tensor(ids, device=device)
        ref = ref_fn(soft, t)
        for name, fn in fns.items():
            got, st = fn(soft, t), stats[name]
            d = float((got - ref).abs().max())
            st["max_abs_logit_diff"] = max(st["max_abs_logit_diff"], d)
            st["max_rel_logit_diff"] = max(st["max_rel_logit_diff"], d / float(ref.abs().max()))
            st["first_token_argmax_same"] += int(got.argmax() == ref.argmax())
    for st in stats.values():
        st["first_token_argmax_same"] /= len(wl.requests)
    return stats


SECTIONS = ("agreement", "engine", "tasks", "naive", "grouped")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--size", choices=["small", "tiny"], default="small")
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--naive-requests", type=int, default=16)
    p.add_argument("--max-num-seqs", type=lambda s: [int(x) for x in s.split(",")], default=[64, 128])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--control-std", type=lambda s: [float(x) for x in s.split(",") if x], default=[0.05, 0.02],
                   help="also check fp16 agreement on random models of these init stds (0.02: GPT-2's own)")
    p.add_argument("--sections", type=lambda s: set(s.split(",")), default=set(SECTIONS),
                   help=f"comma-separated, of {','.join(SECTIONS)} (default: all)")
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    if a.sections - set(SECTIONS):
        p.error(f"unknown sections {sorted(a.sections - set(SECTIONS))}")
    dev = torch.device(a.device)
    res: dict = {"args": {k: str(v) for k, v in vars(a).items()}, "torch": torch.__version__, "errors": {}}
    if dev.type == "cuda":
        res["gpu"] = torch.cuda.get_device_name(dev)
    model_dir = B.ensure_model(a.size)
    tok, wl = B.load_workload(model_dir, n_tasks=a.tasks, n_requests=a.requests, prompt_len=32,
                              new_tokens=a.new_tokens, virtual=(8, 32), seed=0)
    res["workload"] = wl.meta
    fp16 = torch.float16 if dev.type == "cuda" else torch.bfloat16  # CPU smoke runs: bf16 stands in
    graphs = dev.type == "cuda"
    fp16_name = "float16" if fp16 is torch.float16 else "bfloat16"
    seqs0 = a.max_num_seqs[0]

    def fenced(name, fn):
        if name.split("_")[0] not in a.sections:
            return
        _log(name)
        t0 = time.perf_counter()
        try:
            out = fn()
            _log(f"{name}: done in {time.perf_counter() - t0:.1f}s: {json.dumps(out, default=str)[:400]}")
            res[name] = out
        except Exception as e:  # record and go on: one GPU run must report everything it can
            traceback.print_exc()
            res["errors"][name] = f"{type(e).__name__}: {e}"

    def engine_runs(model, label, configs, extra=None):
        """Each config: one untimed pass (captures graphs), then `repeats` timed passes; the
        median pass is reported (and the best, and all)."""
        from server.engine.engine import Engine, EngineConfig

        rows = {}
        for seqs, static in configs:
            eng = Engine(model, tok, EngineConfig(max_num_seqs=seqs, max_num_batched_tokens=2048,
                                                  static_decode=static))
            E.run_engine(model, tok, wl, max_num_seqs=seqs, max_num_batched_tokens=2048, engine=eng, tag="warm")
            runs = [E.run_engine(model, tok, wl, max_num_seqs=seqs, max_num_batched_tokens=2048, engine=eng,
                                 tag=f"t{r}") for r in range(a.repeats)]
            runs.sort(key=lambda o: o["seconds"])
            mid = runs[(len(runs) - 1) // 2]  # the median run (the faster middle one for an even count)
            key = f"{label} seqs={seqs} {'graphs' if static else 'eager'}"
            rows[key] = {"tok_s": mid["tokens"] / mid["seconds"], "seconds": mid["seconds"],
                         "best_tok_s": runs[0]["tokens"] / runs[0]["seconds"],
                         "all_tok_s": [o["tokens"] / o["seconds"] for o in runs],
                         "steps": mid["steps"], "graphs": len(eng.static._graphs) if eng.static else 0}
            if extra is not None:
                extra[key] = mid["outputs"]
            del eng
            if dev.type == "cuda":
                torch.cuda.synchronize()
        return rows

    outputs: dict = {}
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    m32 = E.load_engine_model(model_dir, "float32", str(dev))[0]
    m16 = E.load_engine_model(model_dir, fp16_name, str(dev))[0]
    hf32 = B.load_hf(model_dir, torch.float32, str(dev))
    hf16 = B.load_hf(model_dir, fp16, str(dev))
    naive_runs: dict = {}  # the main model's naive runs, timed once, shared by agreement and `naive`

    # 1. agreement ------------------------------------------------------------------
    def agreement(m32, m16, hf32, hf16, wl, naive=None):
        """Engine fp16 (graphs) vs engine fp32 (TF32 off) on every request; and, as the
        control, HF's own fp16 vs HF fp32 (naive generate) on the first `naive_requests`.
        `naive`: a dict that keeps those naive runs' (outputs, seconds) by dtype."""
        ref = E.run_engine(m32, tok, wl, max_num_seqs=seqs0, max_num_batched_tokens=2048,
                           static_decode=False)["outputs"]
        got = E.run_engine(m16, tok, wl, max_num_seqs=seqs0, max_num_batched_tokens=2048,
                           static_decode=graphs)["outputs"]
        eq, lead = _same(got, ref)
        n = a.naive_requests
        runs = {"float32": B.run_naive(hf32, wl, n), fp16_name: B.run_naive(hf16, wl, n)}
        if naive is not None:
            naive.update(runs)
        naive32, naive16 = runs["float32"][0], runs[fp16_name][0]
        distinct = sum(len(set(o)) for o in ref) / len(ref)
        first = first_step_logits({"fp16": _ours(m16), "hf_fp16": _hf(hf16), "fp32": _ours(m32)}, hf32, wl, dev)
        return {"compared_requests": len(ref), "fp16_vs_fp32_identical": eq, "fp16_vs_fp32_mean_leading_equal": lead,
                "fp32_engine_vs_hf_fp32_identical": _same(ref[:n], naive32)[0],
                "control_hf_fp16_vs_hf_fp32_identical": _same(naive16, naive32)[0],
                "control_hf_fp16_vs_hf_fp32_mean_leading_equal": _same(naive16, naive32)[1],
                "fp16_engine_vs_hf_fp16_identical": _same(got[:n], naive16)[0],
                "fp16_engine_vs_fp32_engine_on_those": _same(got[:n], ref[:n])[0],
                "control_requests": n, "mean_distinct_tokens_per_request_fp32": distinct,
                "soft_prompt_std": wl.meta.get("soft_prompt_std"),
                "fp16_first_step": first["fp16"], "hf_fp16_first_step": first["hf_fp16"],
                "fp32_first_step": first["fp32"]}

    fenced("agreement", lambda: agreement(m32, m16, hf32, hf16, wl, naive_runs))

    def control(std):
        """The same check on a random model of init std `std`, its soft prompts drawn with
        that model's `wte` std (as the main workload's are with the main model's)."""
        from server.testmodel import make_test_model

        cdir = B.OUT_DIR / f"model-{a.size}-std{std:g}"
        if not (cdir / "config.json").exists():
            make_test_model(cdir, size=a.size, seed=0, init_std=std)
        _, cwl = B.load_workload(cdir, n_tasks=a.tasks, n_requests=a.requests, prompt_len=32,
                                 new_tokens=a.new_tokens, virtual=(8, 32), seed=0)
        c32 = E.load_engine_model(cdir, "float32", str(dev))[0]
        c16 = E.load_engine_model(cdir, fp16_name, str(dev))[0]
        return agreement(c32, c16, B.load_hf(cdir, torch.float32, str(dev)), B.load_hf(cdir, fp16, str(dev)), cwl)

    for std in a.control_std:
        fenced(f"agreement_std{std:g}", lambda: control(std))

    # 2. engine throughput ------------------------------------------------------------
    def throughput16():
        configs = [(s, st) for s in a.max_num_seqs for st in ((True, False) if dev.type == "cuda" else (False,))]
        return engine_runs(m16, fp16_name, configs, outputs)

    fenced("engine_fp16", throughput16)

    def throughput32():
        torch.backends.cuda.matmul.allow_tf32 = True
        try:
            return engine_runs(m32, "float32+tf32", [(seqs0, dev.type == "cuda")])
        finally:
            torch.backends.cuda.matmul.allow_tf32 = False

    fenced("engine_fp32_tf32", throughput32)

    def tasks_ratio():
        """One engine (graphs captured by an untimed pass), the same prompts over 1 and 64
        tasks of 20 virtual tokens, prefixes warm and cold: the median ratio of `repeats`
        back-to-back pairs."""
        from server.engine.engine import Engine, EngineConfig

        eng = Engine(m16, tok, EngineConfig(max_num_seqs=seqs0, max_num_batched_tokens=2048,
                                            static_decode=graphs))
        E.run_engine(m16, tok, wl, max_num_seqs=seqs0, max_num_batched_tokens=2048, engine=eng, tag="warm")
        out = {}
        for warm in (True, False):
            state, pairs = "warm" if warm else "cold", []
            for r in range(a.repeats):  # back-to-back pairs, order alternating: drift cancels in each ratio
                tps = {}
                for n in ((1, 64) if r % 2 == 0 else (64, 1)):
                    x = E.run_engine(m16, tok, wl.retasked(n, 20, 1000 + n), max_num_seqs=seqs0,
                                     max_num_batched_tokens=2048, engine=eng, tag=f"{n}-{state}-{r}",
                                     warm_prefixes=warm)
                    tps[n] = x["tokens"] / x["seconds"]
                pairs.append((tps[1], tps[64]))
            pairs.sort(key=lambda p: p[1] / p[0])
            one, many = pairs[(len(pairs) - 1) // 2]
            out[state] = {"tok_s_1_task": one, "tok_s_64_tasks": many, "ratio_64_over_1": many / one,
                          "pair_ratios": [m / o for o, m in pairs]}
        return out

    fenced("tasks_fp16", tasks_ratio)

    # 3. baselines on the same GPU --------------------------------------------------
    def naive():
        """Timed inside `agreement` when it ran (the same runs), else here."""
        out = {}
        for name, hf in (("float32", hf32), (fp16_name, hf16)):
            outs, sec = naive_runs.get(name) or B.run_naive(hf, wl, a.naive_requests)
            out[name] = {"tok_s": sum(map(len, outs)) / sec, "requests": a.naive_requests}
        return out

    fenced("naive", naive)

    def grouped():
        outs, sec = B.run_grouped(hf16, wl, 64)
        return {fp16_name: {"tok_s": sum(map(len, outs)) / sec}}

    fenced("grouped", grouped)

    # summary ------------------------------------------------------------------------
    lines = [f"bench.gpu on {res.get('gpu', dev.type)}, torch {torch.__version__}"]
    for name in [k for k in res if k.startswith("agreement")]:
        g = res[name]
        lines.append(f"{name}: engine fp16 vs fp32 greedy, {g['compared_requests']} requests x {a.new_tokens} "
                     f"tokens: {100 * g['fp16_vs_fp32_identical']:.1f}% identical (mean leading equal "
                     f"{g['fp16_vs_fp32_mean_leading_equal']:.1f}); control HF fp16 vs HF fp32 on "
                     f"{g['control_requests']}: {100 * g['control_hf_fp16_vs_hf_fp32_identical']:.1f}% (engine "
                     f"{100 * g['fp16_engine_vs_fp32_engine_on_those']:.1f}% on those); first-step max |dlogit| "
                     f"vs HF fp32: ours fp16 {g['fp16_first_step']['max_abs_logit_diff']:.4f}, HF fp16 "
                     f"{g['hf_fp16_first_step']['max_abs_logit_diff']:.4f}, ours fp32 "
                     f"{g['fp32_first_step']['max_abs_logit_diff']:.2e}; distinct tokens/request "
                     f"{g['mean_distinct_tokens_per_request_fp32']:.1f}")
    naive_tps = res.get("naive", {}).get(fp16_name, {}).get("tok_s")
    for sec in ("engine_fp16", "engine_fp32_tf32"):
        for k, v in res.get(sec, {}).items():
            x = f" = {v['tok_s'] / naive_tps:.1f}x naive {fp16_name}" if naive_tps else ""
            lines.append(f"{k}: {v['tok_s']:.0f} tok/s ({v['steps']} steps, {1e3 * v['seconds'] / v['steps']:.2f} "
                         f"ms/step, {v['graphs']} graphs){x}")
    for s in a.max_num_seqs:
        g, e = outputs.get(f"{fp16_name} seqs={s} graphs"), outputs.get(f"{fp16_name} seqs={s} eager")
        if g is not None and e is not None:
            eq, lead = _same(g, e)
            res[f"graphs_vs_eager_seqs{s}"] = eq
            lines.append(f"seqs={s}: graphs vs eager {fp16_name} greedy identical {100 * eq:.1f}% "
                         f"(mean leading equal {lead:.1f})")
    for k, v in res.get("naive", {}).items():
        lines.append(f"naive HF {k}: {v['tok_s']:.1f} tok/s")
    for k, v in res.get("grouped", {}).items():
        lines.append(f"grouped HF {k}: {v['tok_s']:.1f} tok/s")
    for state, v in res.get("tasks_fp16", {}).items():
        lines.append(f"64 tasks / 1 task ({state} prefixes): {v['ratio_64_over_1']:.2f} "
                     f"({v['tok_s_64_tasks']:.0f} / {v['tok_s_1_task']:.0f} tok/s)")
    if res["errors"]:
        lines.append(f"errors: {res['errors']}")
    res["summary"] = lines
    print("\n".join(lines))
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2, default=str) + "\n")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
