"""A compact GPT-2 forward of our own, built for mixed-task serving.

Module names follow Hugging Face's (`wte`, `wpe`, `h.N.attn.c_attn`, `ln_f`, ...) so
weights copy over with key and shape checks. HF's GPT-2 uses `Conv1D` (weight
`[in, out]`); we store `nn.Linear` weights (`[out, in]`) and transpose on load.

Two forwards:
- `forward_dense(x, positions)`: plain causal attention over a padded-free batch,
  returning per-layer keys/values. Used to compute a task's prefix KV and for the
  parity test against `GPT2LMHeadModel`.
- `forward_step(ids, positions, meta, cache)`: the serving forward. Tokens of all rows
  are flattened into one `[N, C]` matrix, so the matmuls (nearly all the FLOPs) carry no
  padding; only attention is split: decode rows (one query each) attend to their slot
  of the KV cache through a view, prefill rows (several queries) through a gather.

How the serving forward runs on this device (packed weights, native kernels, the greedy
screen, the padded CUDA head) is one object, `self.backend` (`server.model.backend`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from server import cpu_kernels
from server.model import backend as backends
from server.model.attention import StepMeta, attend, native_step
from server.model.greedy import argmax_rows
from server.model.linear import Linear, bucket_rows, bucketed, pad_rows

if TYPE_CHECKING:  # pragma: no cover
    from server.engine.kv_cache import KVCache


@dataclass(frozen=True)
class GPT2Spec:
    n_layer: int
    n_head: int
    n_embd: int
    n_positions: int
    vocab_size: int
    layer_norm_epsilon: float = 1e-5
    eos_token_id: int = 50256

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @classmethod
    def from_hf_config(cls, cfg) -> "GPT2Spec":
        act = getattr(cfg, "activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ValueError(f"unsupported GPT-2 activation {act!r}")
        if getattr(cfg, "scale_attn_by_inverse_layer_idx", False) or getattr(cfg, "reorder_and_upcast_attn", False):
            raise ValueError("GPT-2 variants with scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn are "
                             "not supported")
        if not getattr(cfg, "scale_attn_weights", True):
            raise ValueError("GPT-2 variants without scale_attn_weights are not supported")
        return cls(
            n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
            n_positions=cfg.n_positions, vocab_size=cfg.vocab_size,
            layer_norm_epsilon=cfg.layer_norm_epsilon,
            eos_token_id=cfg.eos_token_id if cfg.eos_token_id is not None else 50256,
        )


class Block(nn.Module):
    def __init__(self, spec: GPT2Spec):
        super().__init__()
        c = spec.n_embd
        self.ln_1 = nn.LayerNorm(c, eps=spec.layer_norm_epsilon)
        self.attn = nn.Module()
        self.attn.c_attn = Linear(c, 3 * c)
        self.attn.c_proj = Linear(c, c)
        self.ln_2 = nn.LayerNorm(c, eps=spec.layer_norm_epsilon)
        self.mlp = nn.Module()
        self.mlp.c_fc = Linear(c, 4 * c)
        self.mlp.c_proj = Linear(4 * c, c)

    def mlp_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp.c_proj(self.mlp.c_fc(self.ln_2(x), gelu=True))


class GPT2(nn.Module):
    def __init__(self, spec: GPT2Spec):
        super().__init__()
        self.spec = spec
        self.wte = nn.Embedding(spec.vocab_size, spec.n_embd)
        self.wpe = nn.Embedding(spec.n_positions, spec.n_embd)
        self.h = nn.ModuleList(Block(spec) for _ in range(spec.n_layer))
        self.ln_f = nn.LayerNorm(spec.n_embd, eps=spec.layer_norm_epsilon)
        self.lm_head: torch.Tensor | None = None  # None: tied to wte
        self.backend = backends.Backend()  # plain torch until `pack` chooses for the device
        self.quantize: str | None = None  # "int8": `pack` puts every CPU matmul on int8 weights

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32, quantize: str | None = None) -> "GPT2":
        """Load any HF GPT-2 checkpoint (hub id or local folder); `quantize="int8"`: every
        matmul on int8 weights (CPU, `server.model.backend.choose`)."""
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel.from_pretrained(name_or_path, dtype=torch.float32)
        model = cls.from_hf(hf)
        del hf
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        model.quantize = quantize
        model.pack()
        return model

    def pack(self, batch_hint: int = 128) -> None:
        """Choose the backend for the device and dtype (again after the weights changed)."""
        if self.backend.head_full is not None:  # CUDA: already padded, the weights are views of it
            return
        self.backend = backends.choose(self, batch_hint=batch_hint, quantize=self.quantize)

    def set_native_kernels(self, on: bool, amx: bool = True) -> bool:
        """Use the native CPU kernels (`server.cpu_kernels`: decode and prefill attention,
        the KV-cache write, the bf16 greedy argmax, and with `amx` the AMX matmul of bf16
        decode steps) when `on` and they can run here (CPU, fp32/bf16, AVX-512, a C
        compiler; AMX for the matmul); else SDPA and torch ops. Returns whether they are in use."""
        return backends.set_native(self, self.backend, on, amx)

    def enable_greedy_screen(self, batch_hint: int = 128, kind: str = "bf16") -> None:
        """Screen greedy rows with a bf16 (`GreedyScreen`, fp32 models) or int8 (`Int8Screen`,
        needs VNNI) copy of the LM head, also where it would not be chosen (tests: the answer
        must not change)."""
        self.backend.screen = backends.make_screen(self.head_weight(), kind, batch_hint)

    @property
    def amx_kernels(self) -> bool:
        return any(m.amx is not None for m in self.backend.linears(self))

    @property
    def native_kernels(self) -> bool:
        return self.backend.native is not None

    @classmethod
    def from_hf(cls, hf) -> "GPT2":
        spec = GPT2Spec.from_hf_config(hf.config)
        model = cls(spec)
        src = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()}
        own = model.state_dict()
        conv1d = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
        for key, dst in own.items():
            if key not in src:
                raise KeyError(f"checkpoint has no weight {key!r}")
            w = src[key]
            if key.endswith(conv1d):
                w = w.t()
            if tuple(w.shape) != tuple(dst.shape):
                raise ValueError(f"{key}: checkpoint shape {tuple(w.shape)} != expected {tuple(dst.shape)}")
            dst.copy_(w)
        head = src.get("lm_head.weight")
        if head is not None and not torch.equal(head, src["wte.weight"]):
            model.lm_head = nn.Parameter(head.clone(), requires_grad=False)
        return model

    # ------------------------------------------------------------------ pieces
    def head_weight(self) -> torch.Tensor:
        return self.wte.weight if self.lm_head is None else self.lm_head

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Final layer norm + LM head: `[..., C]` -> `[..., V]`."""
        return self._head_logits(self.ln_f(hidden))

    def _head_logits(self, h: torch.Tensor) -> torch.Tensor:
        """The LM head alone, on normed hidden states (packed and row-bucketed on CPU)."""
        b = self.backend
        if b.head_full is not None:
            return F.linear(h, b.head_full)[..., : self.spec.vocab_size]
        if b.head is None:
            return F.linear(h, self.head_weight())
        return bucketed(b.head, h) if h.dim() == 2 else b.head(h)

    @property
    def has_greedy_screen(self) -> bool:
        return self.backend.screening

    @property
    def has_fast_greedy(self) -> bool:
        """`greedy` beats `logits` + argmax here (CPU: bf16 screen, or block-wise bf16 argmax)."""
        return self.backend.head is not None

    def greedy(self, hidden: torch.Tensor) -> list[int]:
        """Greedy tokens for hidden states `[R, C]`, exactly `logits(hidden).argmax(-1)`: by
        the greedy screen where there is one (CPU: int8 where the CPU has VNNI, else bf16 for
        fp32 models), else from the full logits (a bf16 model's by the native or block-wise argmax)."""
        b = self.backend
        if not b.screening:
            return self._full_greedy(self.ln_f(hidden))
        return b.screen.greedy(self.ln_f(hidden), self.head_weight(), self._full_greedy)

    def _full_greedy(self, h: torch.Tensor) -> list[int]:
        """The argmax of the full LM head's logits of normed hidden states `h` (first maximum on ties)."""
        logits = self._head_logits(h)
        if logits.dtype != torch.bfloat16:
            return logits.argmax(-1).tolist()
        lib = self.backend.native
        return cpu_kernels.argmax_rows(lib, logits) if lib is not None else argmax_rows(logits)

    def _qkv(self, blk: Block, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        s = self.spec
        qkv = blk.attn.c_attn(blk.ln_1(x))  # [..., 3C]
        q, k, v = qkv.split(s.n_embd, dim=-1)
        shape = (*x.shape[:-1], s.n_head, s.head_dim)
        return q.reshape(shape), k.reshape(shape), v.reshape(shape)  # [..., H, D]

    # ------------------------------------------------------------------ dense forward
    def forward_dense(self, x: torch.Tensor, positions: torch.Tensor,
                      past: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        """Causal forward over input embeddings `x` `[B, T, C]` at `positions` `[B, T]`.

        `past` (optional) holds per-layer `(k, v)` `[B, H, P, D]` prefixes. Returns the
        hidden states `[B, T, C]` and per-layer `(k, v)` `[B, H, P+T, D]`.
        """
        h = x + self.wpe(positions)
        kvs = []
        for i, blk in enumerate(self.h):
            q, k, v = (t.transpose(1, 2) for t in self._qkv(blk, h))  # [B, H, T, D]
            if past is not None:
                k = torch.cat([past[i][0], k], dim=2)
                v = torch.cat([past[i][1], v], dim=2)
            kvs.append((k, v))
            t, p = q.shape[2], k.shape[2]
            mask = torch.ones(t, p, dtype=torch.bool, device=x.device).tril(p - t)
            a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # [B, H, T, D]
            h = h + blk.attn.c_proj(a.transpose(1, 2).reshape(h.shape))
            h = h + blk.mlp_forward(h)
        return h, kvs

    def prefix_kv(self, embeds: torch.Tensor) -> torch.Tensor:
        """Keys/values of a soft prompt `[n, C]` at positions 0..n-1: `[L, 2, H, n, D]`."""
        return self.prefix_kv_batch([embeds])[0]

    PREFIX_PAD_SLACK = 1.25  # a group of prompts pads to its longest: at most 25 % more tokens

    def prefix_kv_batch(self, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
        """`prefix_kv` of several soft prompts in a few forwards (right-padded: causal
        attention keeps padding out of every real position). Prompts of similar lengths
        share a forward, so padding stays under `PREFIX_PAD_SLACK` (one forward padding 32
        prompts of 8-32 tokens to 32 computes ~60 % more tokens than they have). Prompts may
        live on the host: each group moves to the model's device and dtype in one copy."""
        order = sorted(range(len(prompts)), key=lambda i: prompts[i].shape[0])
        groups: list[list[int]] = []
        real = 0
        for i in order:
            n = prompts[i].shape[0]
            if groups and (len(groups[-1]) + 1) * n <= self.PREFIX_PAD_SLACK * (real + n):
                groups[-1].append(i)
                real += n
            else:
                groups.append([i])
                real = n
        out: list[torch.Tensor | None] = [None] * len(prompts)
        for group in groups:
            for i, kv in zip(group, self._prefix_kv_padded([prompts[i] for i in group])):
                out[i] = kv
        return out  # type: ignore[return-value]

    def _prefix_kv_padded(self, prompts: list[torch.Tensor]) -> list[torch.Tensor]:
        n_max = max(p.shape[0] for p in prompts)
        x = prompts[0].new_zeros(len(prompts), n_max, self.spec.n_embd)  # [B, n, C]
        for b, p in enumerate(prompts):
            x[b, : p.shape[0]] = p
        w = self.wte.weight
        x = x.to(device=w.device, dtype=w.dtype)
        pos = torch.arange(n_max, device=x.device).expand(len(prompts), n_max)
        _, kvs = self.forward_dense(x, pos)
        full = torch.stack([torch.stack(kv) for kv in kvs])  # [L, 2, B, H, n, D]: one copy per layer
        return [full[:, :, b, :, :p.shape[0]].contiguous() for b, p in enumerate(prompts)]

    WARM_MAX_TOKENS = 2048  # larger steps are rare; their kernels are built when first seen

    @torch.inference_mode()
    def warm_kernels(self, max_tokens: int, max_rows: int) -> int:
        """Build oneDNN's kernel for every bucketed row count up to `max_tokens` (the block
        matmuls; oneDNN caches kernels by shape, so one block stands for all) and up to
        `max_rows` (the LM head), so no request pays for building them. CPU only; returns
        how many row counts were warmed."""
        b = self.backend
        if b.head is None or b.quantize:  # the int8 kernel builds nothing per shape
            return 0
        blk, c = self.h[0], self.spec.n_embd
        sizes = sorted({bucket_rows(n) for n in range(1, min(max_tokens, self.WARM_MAX_TOKENS) + 1)})
        for m in sizes:
            x = self.wte.weight.new_zeros(m, c)
            blk.attn.c_attn(x)
            blk.attn.c_proj(x)
            blk.mlp.c_proj(blk.mlp.c_fc(x, gelu=True))
            if m <= bucket_rows(max_rows):
                b.head(x)
                if b.screening and b.screen.layer is not None:
                    b.screen.layer(x.to(torch.bfloat16))
        return len(sizes)

    # ------------------------------------------------------------------ serving forward
    def forward_step(self, ids: torch.Tensor, positions: torch.Tensor, meta: StepMeta,
                     cache: "KVCache") -> torch.Tensor:
        """One engine step over `N` flattened tokens; writes their K/V into `cache`.

        Returns hidden states `[N, C]` (before the final layer norm). On CPU the rows of
        every matmul are padded to `bucket_rows(N)`; padding rows are zeros, never written
        to the cache, never attended to.
        """
        s, lib = self.spec, self.backend.native
        n = ids.shape[0]
        rows = bucket_rows(n) if self.backend.head is not None else n
        x = pad_rows(self.wte(ids) + self.wpe(positions), rows)  # [rows, C]
        a_pad = x.new_zeros(rows, s.n_embd) if rows > n else None
        c = s.n_embd
        native = native_step(meta, positions, cache) if lib is not None else None
        if cache.quantized and native is None:
            raise RuntimeError("the int8 KV cache needs the native CPU kernels, which this model does not use")
        for i, blk in enumerate(self.h):
            qkv = blk.attn.c_attn(blk.ln_1(x))[:n]  # [N, 3C]
            # keys and values of every token into the cache, in one write: [N, 2, H, D]
            kv = qkv[:, c:].view(n, 2, s.n_head, s.head_dim)
            scales = cache.scales(i)
            if native is not None:
                cpu_kernels.write_kv(lib, cache.kv[i], kv, native.slots, native.positions, prechecked=True,
                                     scale=None if scales is None else cache.scale[i])
            else:
                cache.kv[i][:, meta.slot, :, positions] = kv
            q = qkv[:, :c].view(n, s.n_head, s.head_dim)
            a = attend(lib, q, cache.k[i], cache.v[i], meta, native, scales).reshape(n, c)  # [N, C]
            if a_pad is not None:
                a_pad[:n] = a
                a = a_pad
            x = x + blk.attn.c_proj(a)
            x = x + blk.mlp_forward(x)
        return x[:n]
