"""polyprompt's engine in-process: `Engine.generate` on the whole mixed-task workload."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import torch

from bench.baselines import Workload

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_engine_model(model_dir: Path, dtype: str, device: str = "cpu"):
    from transformers import AutoTokenizer

    from server.model import GPT2

    model = GPT2.from_pretrained(str(model_dir), device=device, dtype=DTYPES[dtype])
    return model, AutoTokenizer.from_pretrained(str(model_dir))


def _requests(wl: Workload, tag: str, key_prefix: str = ""):
    from server.engine.engine import Request
    from server.engine.sampler import SamplingParams

    params = SamplingParams(max_tokens=wl.new_tokens, temperature=0.0, ignore_eos=True)
    return [Request(f"{tag}-{i}", list(ids), params, task=task, prefix_key=f"{key_prefix}{task}",
                    soft_prompt=wl.tasks[task]) for i, (task, ids) in enumerate(wl.requests)]


@torch.inference_mode()
def run_engine(model, tokenizer, wl: Workload, *, max_num_seqs: int, max_num_batched_tokens: int,
               warm_prefixes: bool = False, engine=None, tag: str = "run", **config) -> dict:
    """A fresh engine, an untimed warm-up under other prefix keys (one full batch,
    `max_num_seqs` requests: it touches the KV cache's pages once, as any server has long done), then all of
    `wl.requests` through `Engine.generate`. The prefix cache starts cold (each task's
    prefix computed inside the timed run, as on a server's first requests) unless
    `warm_prefixes` (steady state: every task served before). `engine` reuses an engine
    (its captured CUDA graphs) instead: give each run its own `tag`, which keys its prefixes
    (cold again); `config` are further `EngineConfig` fields.
    Returns outputs, seconds, stats."""
    from server.engine.engine import Engine, EngineConfig

    need = max(wl.num_virtual(t) + len(ids) for t, ids in wl.requests) + wl.new_tokens
    cfg = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens, **config)
    if need > model.spec.n_positions:
        raise ValueError(f"requests need {need} positions > {model.spec.n_positions}")
    fresh = engine is None
    if fresh:
        engine = Engine(model, tokenizer, cfg)
        engine.warm_kernels()  # as `polyprompt serve` does at startup
        warm = Workload(wl.tasks, wl.requests[:max_num_seqs], wl.new_tokens, wl.meta)
        engine.generate(_requests(warm, "warm", key_prefix="warmup:"))
    kp = "" if tag == "run" else f"{tag}:"
    if warm_prefixes:
        for task, soft in wl.tasks.items():
            engine.warm_prefix(kp + task, soft)
        while any(kp + task not in engine.prefixes for task in wl.tasks):
            engine.step()
    reqs = _requests(wl, tag, key_prefix=kp)
    steps0, t0 = engine.stats["steps"], time.perf_counter()
    outs = engine.generate(reqs)
    seconds = time.perf_counter() - t0
    steps = engine.stats["steps"] - steps0
    finish = {}
    for o in outs:
        finish[o.finish_reason] = finish.get(o.finish_reason, 0) + 1
    result = {"outputs": [list(o.token_ids) for o in outs], "seconds": seconds, "steps": steps,
              "tokens": sum(len(o.token_ids) for o in outs), "finish_reasons": finish,
              "prefix_cache": engine.prefixes.stats()}
    if fresh:
        del engine
        gc.collect()
    return result
