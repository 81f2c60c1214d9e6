"""polyprompt's engine in-process: `Engine.generate` on the whole mixed-task workload."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from bench.baselines import Workload

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
          # polyprompt serve --dtype D --quantize int8: int8 weights, activations in D between matmuls
          "float32+int8": torch.float32, "bfloat16+int8": torch.bfloat16}
# "...+kv8": the same with --kv-cache-dtype int8 (an int8 KV cache; CPU)
DTYPES.update({f"{d}+kv8": t for d, t in list(DTYPES.items()) if d != "float16"})


def split_dtype(dtype: str) -> tuple[str, str | None]:
    """"bfloat16+int8" -> ("bfloat16", "int8"); "float32" or "float32+kv8" -> ("float32", None)."""
    base, *rest = dtype.split("+")
    return base, "int8" if "int8" in rest else None


def kv_cache_dtype(dtype: str) -> str:
    """The engine's `kv_cache_dtype` of a bench dtype: "int8" for "...+kv8", else "auto"."""
    return "int8" if dtype.endswith("+kv8") else "auto"


def load_engine_model(model_dir: Path, dtype: str, device: str = "cpu"):
    from transformers import AutoTokenizer

    from server.lifecycle import freeze_heap, keep_freed_memory
    from server.model import GPT2

    keep_freed_memory()  # as `polyprompt serve` does at start
    model = GPT2.from_pretrained(str(model_dir), device=device, dtype=DTYPES[dtype],
                                 quantize=split_dtype(dtype)[1])
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    freeze_heap()  # as `polyprompt serve` does once loaded: no full collections of this heap mid-run
    return model, tokenizer


def _requests(wl: Workload, tag: str, key_prefix: str = ""):
    from server.engine.engine import Request
    from server.engine.sampler import SamplingParams

    params = SamplingParams(max_tokens=wl.new_tokens, temperature=0.0, ignore_eos=True)
    return [Request(f"{tag}-{i}", list(ids), params, task=task, prefix_key=f"{key_prefix}{task}",
                    soft_prompt=wl.tasks[task]) for i, (task, ids) in enumerate(wl.requests)]


def _fresh_engine(model, tokenizer, wl: Workload, cfg):
    """An engine as a server has it after a while: CPU matmul kernels built (as `polyprompt
    serve` does at startup), then an untimed warm-up under other prefix keys (one full batch,
    `max_num_seqs` requests: it touches the KV cache's pages once)."""
    from server.engine.engine import Engine

    engine = Engine(model, tokenizer, cfg)
    engine.warm_kernels()
    warm = Workload(wl.tasks, wl.requests[:cfg.max_num_seqs], wl.new_tokens, wl.meta)
    engine.generate(_requests(warm, "warm", key_prefix="warmup:"))
    return engine


def _warm_prefixes(engine, wl: Workload, key_prefix: str) -> None:
    """Every task's prefix KV computed ahead (a server's steady state), untimed."""
    for task, soft in wl.tasks.items():
        engine.warm_prefix(key_prefix + task, soft)
    while any(key_prefix + task not in engine.prefixes for task in wl.tasks):
        engine.step()


def _result(outs, seconds: float, steps: int, engine) -> dict:
    finish: dict[str, int] = {}
    for o in outs:
        finish[o.finish_reason] = finish.get(o.finish_reason, 0) + 1
    return {"outputs": [list(o.token_ids) for o in outs], "seconds": seconds, "steps": steps,
            "tokens": sum(len(o.token_ids) for o in outs), "finish_reasons": finish,
            "prefix_cache": engine.prefixes.stats()}


@torch.inference_mode()
def run_engine(model, tokenizer, wl: Workload, *, max_num_seqs: int, max_num_batched_tokens: int,
               warm_prefixes: bool = False, engine=None, tag: str = "run", **config) -> dict:
    """A fresh engine (`_fresh_engine`), then all of `wl.requests` through `Engine.generate`.
    The prefix cache starts cold (each task's prefix computed inside the timed run, as on a
    server's first requests) unless `warm_prefixes` (steady state: every task served
    before). `engine` reuses an engine (its captured CUDA graphs) instead: give each run its
    own `tag`, which keys its prefixes (cold again); `config` are further `EngineConfig`
    fields. Returns outputs, seconds, stats."""
    from server.engine.engine import EngineConfig

    need = max(wl.num_virtual(t) + len(ids) for t, ids in wl.requests) + wl.new_tokens
    cfg = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, **config)
    if need > model.spec.n_positions:
        raise ValueError(f"requests need {need} positions > {model.spec.n_positions}")
    fresh = engine is None
    if fresh:
        engine = _fresh_engine(model, tokenizer, wl, cfg)
    kp = "" if tag == "run" else f"{tag}:"
    if warm_prefixes:
        _warm_prefixes(engine, wl, kp)
    reqs = _requests(wl, tag, key_prefix=kp)
    steps0, t0 = engine.stats["steps"], time.perf_counter()
    outs = engine.generate(reqs)
    result = _result(outs, time.perf_counter() - t0, engine.stats["steps"] - steps0, engine)
    if fresh:
        del engine
        gc.collect()
    return result


@torch.inference_mode()
def run_interleaved(model, tokenizer, workloads: list[Workload], *, max_num_seqs: int,
                    max_num_batched_tokens: int, warm_prefixes: bool = False,
                    before_step: list | None = None, **config) -> list[dict]:
    """One fresh engine per workload (`_fresh_engine`), all on the same model, stepped in
    turn: a step of each engine per round, the order reversed every round, until every
    request is done. Each engine's `seconds` is the sum of its own steps' wall times, so a
    speed change of the machine lands on every engine's steps alike instead of on whichever
    whole run it fell in (a shared CPU's speed can change by 2-3x within seconds, which
    whole-run pairs could not separate from the code: bench/results/HISTORY.md, runs Q-S). The prefix
    cache starts cold (each prefix computed inside the timed steps) unless `warm_prefixes`.
    `before_step[i]()`, if given, runs (untimed) before each setup and step of engine `i`:
    A/B switches of the shared model.
    Returns one result per workload, as `run_engine`'s."""
    from server.engine.engine import EngineConfig

    cfg = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, **config)
    hooks = before_step or [lambda: None] * len(workloads)
    engines, finals, reqs = [], [], []
    for i, wl in enumerate(workloads):
        hooks[i]()
        eng = _fresh_engine(model, tokenizer, wl, cfg)
        if warm_prefixes:
            _warm_prefixes(eng, wl, "")
        done: dict = {}
        batch = _requests(wl, f"run{i}")
        for r in batch:
            r.on_output = lambda out, done=done: done.__setitem__(out.req_id, out) if out.finished else None
        engines.append(eng)
        finals.append(done)
        reqs.append(batch)
    steps0 = [eng.stats["steps"] for eng in engines]
    seconds = [0.0] * len(engines)
    for eng, batch in zip(engines, reqs):
        for r in batch:
            eng.add_request(r)
    rnd = 0
    while live := [i for i in range(len(engines)) if len(finals[i]) < len(reqs[i])]:
        for i in (live if rnd % 2 == 0 else live[::-1]):
            hooks[i]()
            t = time.perf_counter()
            engines[i].step()
            seconds[i] += time.perf_counter() - t
        rnd += 1
    results = [_result([finals[i][r.req_id] for r in reqs[i]], seconds[i], eng.stats["steps"] - steps0[i], eng)
               for i, eng in enumerate(engines)]
    del engines
    gc.collect()
    return results
