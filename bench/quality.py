"""`python -m bench.quality`: what cheaper precisions cost in answers, against float32.

    python -m bench.quality                        # 124M-shape random GPT-2, the bench workload
    python -m bench.quality --size tiny --requests 16 --tasks 4    # smoke run

For each variant (`--variants`, default bfloat16, float32+int8, bfloat16+int8; "D+int8" is
`polyprompt serve --dtype D --quantize int8`, "...+kv8" adds `--kv-cache-dtype int8`, whose
log-likelihood is taken through the engine's cache: `engine_nll`):
- **greedy agreement** with float32 over the bench workload (the same seeded requests, soft
  prompts and `--new-tokens` as `python -m bench`, through the engine in-process): the share
  of requests whose generated tokens all equal float32's, and the mean number of leading
  tokens equal;
- **log-likelihood change** on a held-out text (`--text`, default this repository's
  README.md: prose the model never saw), teacher-forced in windows of `--window` tokens: the
  mean negative log-likelihood per token in nats, and its change against float32 (mean
  |delta| per token, and the change of the mean). The model is a random one (real
  checkpoints cannot be downloaded here), so the absolute NLL means nothing; the change is
  what a precision costs.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from bench import baselines as B
from bench import engine_bench as E

REPO = Path(__file__).resolve().parent.parent


def _csv(s: str) -> list[str]:
    return [x for x in s.split(",") if x]


@torch.inference_mode()
def token_nll(model, ids: list[int], window: int) -> torch.Tensor:
    """Per-token NLL (nats, float32) of `ids[1:]` given the tokens before, in windows."""
    out = []
    for s in range(0, len(ids) - 1, window):
        chunk = torch.tensor(ids[s:s + window + 1])
        if chunk.numel() < 2:
            break
        x = model.wte(chunk[:-1])[None]
        pos = torch.arange(chunk.numel() - 1)[None]
        h, _ = model.forward_dense(x, pos)
        logits = model.logits(h[0]).float()
        out.append(F.cross_entropy(logits, chunk[1:], reduction="none"))
    return torch.cat(out)


@torch.inference_mode()
def engine_nll(model, tokenizer, ids: list[int], window: int, kv_cache_dtype: str) -> torch.Tensor:
    """`token_nll` through the engine's KV cache (prompt log-probs of each window as one
    request): what a cache that stores keys and values differently (`+kv8`) costs."""
    from server.engine.engine import Engine, EngineConfig, Request
    from server.engine.sampler import SamplingParams

    eng = Engine(model, tokenizer, EngineConfig(max_num_seqs=8, kv_cache_dtype=kv_cache_dtype))
    params = SamplingParams(max_tokens=1, temperature=0.0, ignore_eos=True, prompt_logprobs=0)
    chunks = [ids[s:s + window + 1] for s in range(0, len(ids) - 1, window)]
    outs = eng.generate([Request(f"nll-{i}", c, params) for i, c in enumerate(chunks) if len(c) >= 2])
    return torch.tensor([-lp.logprob for o in outs for lp in o.prompt_logprobs[1:]], dtype=torch.float32)


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.split("\n\n")[0])
    p.add_argument("--size", choices=["small", "tiny"], default="small")
    p.add_argument("--model", type=Path, default=None)
    p.add_argument("--variants", type=_csv, default=["bfloat16", "float32+int8", "bfloat16+int8"])
    p.add_argument("--requests", type=int, default=128)
    p.add_argument("--tasks", type=int, default=32)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--text", type=Path, default=REPO / "README.md")
    p.add_argument("--window", type=int, default=512)
    p.add_argument("--max-text-tokens", type=int, default=4096)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    a = p.parse_args(argv)
    bad = [v for v in a.variants if v not in E.DTYPES]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {','.join(E.DTYPES)}")
    torch.manual_seed(a.seed)
    model_dir = a.model or B.ensure_model(a.size)
    tok, wl = B.load_workload(model_dir, n_tasks=a.tasks, n_requests=a.requests, prompt_len=a.prompt_len,
                              new_tokens=a.new_tokens, virtual=(8, 32), seed=a.seed)
    text_ids = tok(a.text.read_text())["input_ids"][: a.max_text_tokens]
    ref_tokens = ref_nll = None
    results = []
    for variant in ["float32"] + [v for v in a.variants if v != "float32"]:
        t0 = time.perf_counter()
        model, etok = E.load_engine_model(model_dir, variant)
        kv = E.kv_cache_dtype(variant)
        run = E.run_engine(model, etok, wl, max_num_seqs=64, max_num_batched_tokens=2048, kv_cache_dtype=kv)
        nll = token_nll(model, text_ids, a.window) if kv == "auto" else engine_nll(model, etok, text_ids, a.window, kv)
        row = {"variant": variant, "engine_tok_s": run["tokens"] / run["seconds"],
               "nll_mean": float(nll.mean()), "paths": model.backend.describe(model)}
        if ref_tokens is None:
            ref_tokens, ref_nll = run["outputs"], nll
        else:
            same = [o == r for o, r in zip(run["outputs"], ref_tokens)]
            lead = [next((i for i, (x, y) in enumerate(zip(o, r)) if x != y), len(r))
                    for o, r in zip(run["outputs"], ref_tokens)]
            row.update(agree=sum(same) / len(same), mean_leading_equal=sum(lead) / len(lead),
                       nll_delta_mean=float(nll.mean() - ref_nll.mean()),
                       nll_abs_delta_per_token=float((nll - ref_nll).abs().mean()),
                       ppl_ratio=math.exp(float(nll.mean() - ref_nll.mean())))
        results.append(row)
        print(f"[quality] {variant}: {time.perf_counter() - t0:.1f}s "
              + json.dumps({k: v for k, v in row.items() if k != "paths"}), flush=True)
        del model
    print(f"\nrandom GPT-2 {a.size}, {len(wl.requests)} requests x {a.new_tokens} greedy tokens, "
          f"{len(text_ids)} held-out tokens ({a.text.name}), windows of {a.window}")
    print(f"{'variant':<16}{'all 32 equal':>14}{'lead equal':>12}{'NLL':>10}{'dNLL':>10}{'|d| /tok':>10}")
    for r in results:
        print(f"{r['variant']:<16}{r.get('agree', 1.0):>14.3f}{r.get('mean_leading_equal', a.new_tokens):>12.1f}"
              f"{r['nll_mean']:>10.4f}{r.get('nll_delta_mean', 0.0):>+10.4f}{r.get('nll_abs_delta_per_token', 0.0):>10.4f}")
    if a.out:
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "results": results,
                                     "cpu": _cpu()}, indent=1))


if __name__ == "__main__":
    main()
