"""The workload every scenario shares, the FLOP accounting, and the two baselines.

Baselines are what a user does without polyprompt, on Hugging Face `generate`:
- naive: one request at a time, KV cache on, the task's soft prompt switched per request.
- grouped: requests batched per task (left-padded), groups one after another.

PEFT's own cached `generate` for prompt tuning is wrong in transformers 5.24 + peft 0.21
(it re-inserts the soft prompt at every step), so both spell out PEFT's computation:
`generate(inputs_embeds=cat([soft prompt; wte(ids)]), ...)` on the base model.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

OUT_DIR = Path(__file__).resolve().parent / "out"


# ---------------------------------------------------------------------- model + workload
def load_workload(model_dir: Path, **kw):
    """The tokenizer of the GPT-2 in `model_dir` and `make_workload(**kw)` for it (hidden
    size from its config, soft prompts with the std of its `wte`)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    hidden = json.loads((Path(model_dir) / "config.json").read_text())["n_embd"]
    return tok, make_workload(tok, hidden=hidden, std=wte_std(model_dir), **kw)


def leading_equal(a: list[int], b: list[int]) -> int:
    """How many leading tokens two outputs share (where rounding first bites)."""
    k = 0
    while k < min(len(a), len(b)) and a[k] == b[k]:
        k += 1
    return k


def ensure_model(size: str, root: Path = OUT_DIR) -> Path:
    """The random GPT-2 of `size` (real tokenizer), built once into bench/out/model-SIZE."""
    path = root / f"model-{size}"
    if not (path / "config.json").exists() or not any(path.glob("*.safetensors")):
        from server.testmodel import make_test_model

        print(f"[bench] building a random {size} GPT-2 into {path} ...", flush=True)
        make_test_model(path, size=size, seed=0)
    return path


def wte_std(model_dir: Path) -> float:
    from safetensors import safe_open

    for f in sorted(Path(model_dir).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as st:
            for key in st.keys():
                if key.endswith("wte.weight"):
                    return float(st.get_tensor(key).float().std())
    raise KeyError(f"no wte.weight in {model_dir}")


@dataclass
class Workload:
    tasks: dict[str, torch.Tensor]  # name -> soft prompt [n_virtual, C] float32 (the adapters)
    requests: list[tuple[str, list[int]]]  # (task, prompt token ids), in arrival order
    new_tokens: int
    meta: dict = field(default_factory=dict)

    def num_virtual(self, task: str) -> int:
        return int(self.tasks[task].shape[0])

    def retasked(self, n_tasks: int, num_virtual: int, seed: int) -> "Workload":
        """Same prompts, spread over `n_tasks` fresh tasks that all have `num_virtual` tokens."""
        hidden = next(iter(self.tasks.values())).shape[1]
        std = self.meta["soft_prompt_std"]
        g = torch.Generator().manual_seed(seed)
        tasks = {f"mix{n_tasks}-{i:03d}": torch.randn(num_virtual, hidden, generator=g) * std
                 for i in range(n_tasks)}
        names = list(tasks)
        reqs = [(names[i % n_tasks], ids) for i, (_, ids) in enumerate(self.requests)]
        return Workload(tasks, reqs, self.new_tokens, {**self.meta, "tasks": n_tasks})


def _vocab_words(tokenizer) -> list[str]:
    words = sorted({t[1:] for t in tokenizer.get_vocab() if t.startswith("\u0120") and t[1:].isalpha()
                    and t[1:].islower() and len(t) >= 4})
    return words


def make_workload(tokenizer, *, hidden: int, std: float, n_tasks: int, n_requests: int,
                  prompt_len: int, new_tokens: int, virtual: tuple[int, int], seed: int) -> Workload:
    """Seeded: `n_tasks` random soft prompts (std ~ wte's), `n_requests` real-word prompts of
    ~`prompt_len` tokens (uniform in [0.75, 1.25] x), tasks spread evenly and shuffled."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    tasks = {}
    for i in range(n_tasks):
        n = rng.randint(virtual[0], virtual[1])
        tasks[f"task-{i:03d}"] = torch.randn(n, hidden, generator=g) * std
    words = _vocab_words(tokenizer)
    lo, hi = max(1, round(prompt_len * 0.75)), max(1, round(prompt_len * 1.25))
    names = list(tasks)
    reqs = []
    for i in range(n_requests):
        n = rng.randint(lo, hi)
        text = " ".join(rng.choice(words) for _ in range(n + 4))
        ids = tokenizer.encode(text)[:n]
        reqs.append((names[i % n_tasks], ids))
    rng.shuffle(reqs)
    meta = {"tasks": n_tasks, "requests": n_requests, "prompt_len": prompt_len, "new_tokens": new_tokens,
            "virtual_tokens": list(virtual), "seed": seed, "soft_prompt_std": std}
    return Workload(tasks, reqs, new_tokens, meta)


# ---------------------------------------------------------------------- FLOPs + roofline
@dataclass(frozen=True)
class FlopModel:
    non_embedding_params: int
    hidden: int
    vocab: int

    @classmethod
    def from_config(cls, model_dir: Path) -> "FlopModel":
        cfg = json.loads((Path(model_dir) / "config.json").read_text())
        c, layers, v = cfg["n_embd"], cfg["n_layer"], cfg["vocab_size"]
        inner = cfg.get("n_inner") or 4 * c
        per_layer = (c * 3 * c + 3 * c) + (c * c + c) + (c * inner + inner) + (inner * c + c) + 4 * c
        return cls(layers * per_layer + 2 * c, c, v)

    def request_flops(self, n_virtual: int, n_prompt: int, n_new: int) -> float:
        """The work PEFT defines for one request: the transformer over virtual + prompt +
        (new - 1) fed-back tokens, the LM head on the `n_new` positions that produce a token.
        The same count for every method (attention FLOPs ignored), like MFU."""
        return (2.0 * self.non_embedding_params * (n_virtual + n_prompt + n_new - 1)
                + 2.0 * self.hidden * self.vocab * n_new)

    def workload_flops(self, wl: Workload, requests: list[tuple[str, list[int]]] | None = None) -> float:
        reqs = wl.requests if requests is None else requests
        return sum(self.request_flops(wl.num_virtual(t), len(ids), wl.new_tokens) for t, ids in reqs)


def matmul_roofline(dtype: torch.dtype, m: int = 2048, k: int = 768, n: int = 3072, reps: int = 7) -> float:
    """Best-of-`reps` FLOP/s of one large `[m,k] x [k,n]` matmul in `dtype` on this machine."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g).to(dtype)
    b = torch.randn(k, n, generator=g).to(dtype)
    out = torch.empty(m, n, dtype=dtype)
    for _ in range(2):
        torch.matmul(a, b, out=out)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.matmul(a, b, out=out)
        best = min(best, time.perf_counter() - t0)
    return 2.0 * m * k * n / best


# ---------------------------------------------------------------------- HF baselines
def load_hf(model_dir: Path, dtype: torch.dtype = torch.float32, device: str = "cpu"):
    from transformers import GPT2LMHeadModel

    return GPT2LMHeadModel.from_pretrained(str(model_dir), dtype=dtype).to(device).eval()


def _gen_kwargs(hf, new_tokens: int) -> dict:
    # No EOS: the engine runs with ignore_eos, so nothing may stop or suppress EOS here
    # (min_new_tokens alone would ban EOS and change the greedy choice on rare steps).
    return dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, use_cache=True,
                eos_token_id=None, pad_token_id=hf.config.eos_token_id if hf.config.eos_token_id is not None
                else 0, num_beams=1)


def _quiet(hf) -> None:
    gc = hf.generation_config
    gc.eos_token_id = None
    gc.temperature, gc.top_p, gc.top_k = None, None, None


@torch.inference_mode()
def run_naive(hf, wl: Workload, n: int) -> tuple[list[list[int]], float]:
    """One request at a time; returns (outputs, seconds) for the first `n` requests."""
    _quiet(hf)
    adapters = wl.tasks  # one dict keyed by task, switched per request like set_adapter
    wte = hf.get_input_embeddings()
    dev = wte.weight.device
    kw = _gen_kwargs(hf, wl.new_tokens)

    def one(task: str, ids: list[int]) -> list[int]:
        soft = adapters[task].to(wte.weight)
        emb = torch.cat([soft, wte(torch.tensor(ids, device=dev))]).unsqueeze(0)  # [1, n+T, C]
        mask = torch.ones(emb.shape[:2], dtype=torch.long, device=dev)
        out = hf.generate(inputs_embeds=emb, attention_mask=mask, **kw)
        return out[0, -wl.new_tokens:].tolist()

    one(*wl.requests[0])  # warm-up
    t0 = time.perf_counter()
    outs = [one(t, ids) for t, ids in wl.requests[:n]]
    return outs, time.perf_counter() - t0


@torch.inference_mode()
def run_grouped(hf, wl: Workload, max_batch: int = 64) -> tuple[list[list[int]], float]:
    """HF generate batched per task (left-padded), groups one after another."""
    _quiet(hf)
    wte = hf.get_input_embeddings()
    dev = wte.weight.device
    kw = _gen_kwargs(hf, wl.new_tokens)
    groups: dict[str, list[int]] = {}
    for i, (task, _) in enumerate(wl.requests):
        groups.setdefault(task, []).append(i)

    def batch(task: str, idx: list[int]) -> list[list[int]]:
        soft = wl.tasks[task].to(wte.weight)
        n = soft.shape[0]
        rows = [wl.requests[i][1] for i in idx]
        width = n + max(len(r) for r in rows)
        emb = torch.zeros(len(rows), width, soft.shape[1], dtype=soft.dtype, device=dev)  # [B, W, C]
        mask = torch.zeros(len(rows), width, dtype=torch.long, device=dev)
        for b, ids in enumerate(rows):
            pad = width - n - len(ids)
            emb[b, pad:pad + n] = soft
            emb[b, pad + n:] = wte(torch.tensor(ids, device=dev))
            mask[b, pad:] = 1
        out = hf.generate(inputs_embeds=emb, attention_mask=mask, **kw)
        return out[:, -wl.new_tokens:].tolist()

    first = next(iter(groups))
    batch(first, groups[first][:2])  # warm-up
    outs: list[list[int] | None] = [None] * len(wl.requests)
    t0 = time.perf_counter()
    for task, idx in groups.items():
        for s in range(0, len(idx), max_batch):
            part = idx[s:s + max_batch]
            for i, o in zip(part, batch(task, part)):
                outs[i] = o
    return outs, time.perf_counter() - t0
