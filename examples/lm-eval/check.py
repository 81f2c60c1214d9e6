"""lm-evaluation-harness through polyprompt, against the PEFT model evaluated directly.

    pip install "lm-eval[api]"     # not a dependency of polyprompt
    python examples/lm-eval/check.py [--model DIR] [--hf]

Starts `polyprompt serve` (CPU, float32) on a model folder (default: a tiny random GPT-2
built here), registers a task whose soft prompt is a PEFT adapter saved with
`save_pretrained`, and runs the two tasks of this folder (`capitals_mc.yaml`: multiple
choice, log-likelihoods through `echo` + `logprobs`; `capitals_gen.yaml`: greedy
generation to a newline) twice with lm-eval:

1. model type `local-completions` against the server's /v1/completions, `model` = the task;
2. the same PEFT adapter in-process (`PeftDirect` below): PEFT's forward for the
   log-likelihoods and `generate(use_cache=False)` for generation, with lm-eval's own
   tokenization of each request (`TemplateLM`).

It prints both sets of metrics and compares them sample by sample (log-likelihoods within
1e-4, the same chosen answer, the same generated text); exit status 1 if they differ.
`--hf` also runs lm-eval's own `hf` model with `peft=` (its generation uses PEFT's cached
`generate`, which re-inserts the soft prompt at every step with peft 0.21, so only its
multiple-choice figures are comparable). Nothing is downloaded: the tasks read local JSONL
files and the tokenizer is the model folder's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
TASKS = ["polyprompt_capitals_mc", "polyprompt_capitals_gen"]
TASK_NAME = "capitals-eval"
TOL = 1e-4


def build_adapter(model_dir: str, out: Path, n_virtual: int = 8, seed: int = 3):
    import torch
    from peft import PromptTuningConfig, get_peft_model
    from transformers import GPT2LMHeadModel

    base = GPT2LMHeadModel.from_pretrained(model_dir)
    pm = get_peft_model(base, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n_virtual))
    w = pm.prompt_encoder["default"].embedding.weight
    with torch.no_grad():
        w.copy_(torch.randn(w.shape, generator=torch.Generator().manual_seed(seed)) * 0.3)
    pm.save_pretrained(out)
    return pm.eval()


def peft_direct_lm(pm, tokenizer):
    """An lm-eval model computing what PEFT computes, in float32."""
    import torch
    from lm_eval.api.model import TemplateLM

    class PeftDirect(TemplateLM):
        def __init__(self):
            super().__init__()
            self.pm, self.tok = pm, tokenizer

        @property
        def eot_token_id(self) -> int:
            return self.tok.eos_token_id

        def tok_encode(self, string, add_special_tokens=None, **kwargs):
            return self.tok.encode(string)

        @torch.no_grad()
        def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
            out = []
            for _, ctx, cont in requests:
                ids = ctx + cont
                logits = self.pm(input_ids=torch.tensor([ids])).logits[0].float()
                lp = torch.log_softmax(logits[logits.shape[0] - len(ids):], dim=-1)
                rows = lp[len(ctx) - 1:len(ids) - 1]
                target = torch.tensor(cont)
                out.append((float(rows.gather(1, target[:, None]).sum()), bool((rows.argmax(-1) == target).all())))
            return out

        @torch.no_grad()
        def generate_until(self, requests, disable_tqdm=False):
            out = []
            for req in requests:
                context, kw = req.args
                until = kw.get("until") or []
                ids = self.tok.encode(context)
                x = torch.tensor([ids])
                gen = self.pm.generate(input_ids=x, attention_mask=torch.ones_like(x), do_sample=False,
                                       use_cache=False, max_new_tokens=kw.get("max_gen_toks", 256),
                                       pad_token_id=self.eot_token_id, eos_token_id=self.eot_token_id)
                text = self.tok.decode([t for t in gen[0, len(ids):].tolist() if t != self.eot_token_id])
                for stop in until:
                    text = text.split(stop)[0]
                out.append(text)
            return out

        def loglikelihood_rolling(self, requests, disable_tqdm=False):
            raise NotImplementedError

    return PeftDirect()


def start_server(model_dir: str, data_dir: str, port: int) -> subprocess.Popen:
    import httpx

    env = {k: v for k, v in os.environ.items() if not k.startswith("POLYPROMPT_")}
    env["POLYPROMPT_DATA_DIR"] = data_dir
    proc = subprocess.Popen([sys.executable, "-m", "server.cli", "serve", "--model", model_dir, "--port", str(port),
                             "--device", "cpu", "--dtype", "float32", "--log-level", "warning"], env=env, cwd=REPO)
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the server exited at start-up")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("the server did not start in 180 s")


def evaluate(model, model_args=None) -> dict:
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    return simple_evaluate(model=model, model_args=model_args, tasks=TASKS, log_samples=True,
                           task_manager=TaskManager(include_path=str(HERE)), batch_size=1)


def per_sample(result: dict, task: str) -> list:
    """What each document got: its choices' log-likelihoods, or its generated text."""
    samples = sorted(result["samples"][task], key=lambda s: s["doc_id"])
    if task.endswith("_mc"):
        return [[float(r[0]) for r in s["resps"] for r in r] for s in samples]
    return [s["filtered_resps"][0] for s in samples]


def compare(a: dict, b: dict) -> list[str]:
    problems = []
    for task in TASKS:
        sa, sb = per_sample(a, task), per_sample(b, task)
        for i, (x, y) in enumerate(zip(sa, sb, strict=True)):
            if task.endswith("_mc"):
                if max(abs(p - q) for p, q in zip(x, y, strict=True)) > TOL or x.index(max(x)) != y.index(max(y)):
                    problems.append(f"{task} doc {i}: log-likelihoods {x} vs {y}")
            elif x != y:
                problems.append(f"{task} doc {i}: generated {x!r} vs {y!r}")
    return problems


def metrics(result: dict) -> dict:
    return {t: {k: v for k, v in result["results"][t].items() if k.split(",")[0] in ("acc", "exact_match")}
            for t in TASKS}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", help="a GPT-2 folder (default: a tiny random one built here)")
    ap.add_argument("--port", type=int, default=8765)
    ap.add_argument("--hf", action="store_true", help="also run lm-eval's own `hf` model with peft=")
    args = ap.parse_args()
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.chdir(REPO)  # the task YAMLs name their data files from the repository root
    import httpx
    from transformers import AutoTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model
        if model_dir is None:
            from server.testmodel import make_test_model

            model_dir = str(make_test_model(Path(tmp) / "tiny-gpt2", size="tiny", seed=0))
        adapter = Path(tmp) / "adapter"
        pm = build_adapter(model_dir, adapter)
        proc = start_server(model_dir, str(Path(tmp) / "data"), args.port)
        try:
            url = f"http://127.0.0.1:{args.port}"
            r = httpx.post(f"{url}/v1/tasks", json={"name": TASK_NAME, "num_virtual_tokens": 8})
            r.raise_for_status()
            files = {n: (n, (adapter / n).read_bytes()) for n in ("adapter_model.safetensors", "adapter_config.json")}
            httpx.post(f"{url}/v1/tasks/{TASK_NAME}/prompt", files=files).raise_for_status()
            t0 = time.time()
            served = evaluate("local-completions", {"base_url": f"{url}/v1/completions", "model": TASK_NAME,
                                                    "tokenizer_backend": "huggingface", "tokenizer": model_dir,
                                                    "tokenized_requests": True, "max_retries": 1})
            t_served = time.time() - t0
        finally:
            proc.terminate()
            proc.wait(30)
        t0 = time.time()
        direct = evaluate(peft_direct_lm(pm, AutoTokenizer.from_pretrained(model_dir)))
        t_direct = time.time() - t0
        report = {"server (local-completions)": metrics(served), "PEFT direct": metrics(direct),
                  "seconds": {"server": round(t_served, 1), "PEFT direct": round(t_direct, 1)}}
        if args.hf:
            hf = evaluate("hf", {"pretrained": model_dir, "peft": str(adapter), "dtype": "float32", "device": "cpu"})
            report["lm-eval hf + peft"] = metrics(hf)
            report["hf vs PEFT direct (multiple choice only is comparable)"] = compare(hf, direct)[:5]
        problems = compare(served, direct)
        report["samples differing (server vs PEFT direct)"] = problems
        print(json.dumps(report, indent=2))
        return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
