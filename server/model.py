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
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from server import cpu_kernels

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
            raise ValueError("GPT-2 variants with scale_attn_by_inverse_layer_idx/reorder_and_upcast_attn are not supported")
        if not getattr(cfg, "scale_attn_weights", True):
            raise ValueError("GPT-2 variants without scale_attn_weights are not supported")
        return cls(
            n_layer=cfg.n_layer, n_head=cfg.n_head, n_embd=cfg.n_embd,
            n_positions=cfg.n_positions, vocab_size=cfg.vocab_size,
            layer_norm_epsilon=cfg.layer_norm_epsilon,
            eos_token_id=cfg.eos_token_id if cfg.eos_token_id is not None else 50256,
        )


@dataclass
class StepMeta:
    """Where each flattened token of a step lives. Built by the engine, tensors on device.

    Tokens `[0, n_decode)` are decode rows (one token each), the rest are prefill rows'
    tokens, row after row.
    """

    slot: torch.Tensor  # [N] long: cache slot of each token
    n_decode: int
    # decode rows: attention over cache[:decode_rows, :, :decode_len]
    decode_rows: int = 0  # number of leading cache slots covered (>= n_decode)
    decode_len: int = 0
    decode_slots: torch.Tensor | None = None  # [n_decode] long, None when == arange
    decode_lens: torch.Tensor | None = None  # [decode_rows] long: keys attended, by slot (1 for idle slots)
    # [decode_rows, 1, 1, decode_len] additive (0 / -inf); built from decode_lens when SDPA needs it
    decode_mask: torch.Tensor | None = None
    # prefill rows
    prefill_slots: torch.Tensor | None = None  # [Bp] long
    prefill_start: int | None = None  # set when prefill_slots are consecutive
    prefill_q: int = 0  # padded query length
    prefill_len: int = 0  # keys attended (max past + q)
    prefill_dest: torch.Tensor | None = None  # [N - n_decode] long: index into Bp * prefill_q
    prefill_pasts: torch.Tensor | None = None  # [Bp] long: cache positions before each row's tokens
    prefill_qlens: torch.Tensor | None = None  # [Bp] long: each row's tokens this step
    # [Bp, 1, prefill_q, prefill_len] additive (0 / -inf); built from pasts/qlens when SDPA needs it
    prefill_mask: torch.Tensor | None = None

    # The masks are built on the step's device, once a step (on a GPU a few tiny kernels beat
    # building them on the host and copying them over: ~30 ms of host CPU a 64-row prefill
    # on a 16-core GPU host, where every small CPU op wakes all threads).
    def decode_mask_for(self, dtype: torch.dtype) -> torch.Tensor:
        if self.decode_mask is None:
            allowed = torch.arange(self.decode_len, device=self.decode_lens.device)[None, :] < self.decode_lens[:, None]
            self.decode_mask = additive_mask(allowed.view(self.decode_rows, 1, 1, self.decode_len), dtype)
        return self.decode_mask

    def prefill_mask_for(self, dtype: torch.dtype) -> torch.Tensor:
        if self.prefill_mask is None:
            dev = self.prefill_pasts.device
            t = torch.arange(self.prefill_q, device=dev)[None, :, None]  # [1, Tq, 1]
            j = torch.arange(self.prefill_len, device=dev)[None, None, :]  # [1, 1, S]
            valid_q = t < self.prefill_qlens[:, None, None]
            mask = (j <= self.prefill_pasts[:, None, None] + t) & valid_q
            mask |= (~valid_q) & (j == 0)  # padded queries attend somewhere (no NaN), ignored
            self.prefill_mask = additive_mask(mask.unsqueeze(1), dtype)
        return self.prefill_mask


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Boolean "may attend" -> additive 0/-inf mask, on `allowed`'s device (SDPA's CPU
    kernel is faster with it)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, float("-inf"))


def bucket_rows(n: int) -> int:
    """`n` rounded up to one of a few sizes (multiples of 8 to 128, of 64 to 1024, then 128).

    oneDNN builds (JIT-compiles) a kernel for every new matmul shape it sees: about 1-2 ms
    at decode sizes and about 40 ms for a 2k-token bf16 prefill, per weight shape. Token
    counts change every step under continuous batching, so the CPU path pads rows to these
    buckets, whose kernels are built once and then come from oneDNN's cache; the padding
    itself costs little (at most 1/8 extra rows past 128).
    """
    step = 8 if n <= 128 else 64 if n <= 1024 else 128
    return -(-n // step) * step


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    return x if x.shape[0] == rows else torch.cat([x, x.new_zeros(rows - x.shape[0], *x.shape[1:])])


def _bucketed(linear: "Linear", x: torch.Tensor) -> torch.Tensor:
    """`linear(x)` for rows `[R, C]`, run padded to `bucket_rows(R)` rows (a prebuilt kernel)."""
    n = x.shape[0]
    return linear(_pad_rows(x, bucket_rows(n)))[:n]


BLOCK = 64


def _block_max(logits: torch.Tensor):
    """Maxima of `[R, V]` logits per block of 64 and per row, in one pass (bf16 row-wise
    reductions are slow on CPU; these are not). Returns blocks `[R, V//64, 64]` (a view),
    their maxima, the last `V % 64` logits, and the row maxima."""
    r, v = logits.shape
    vm = v // BLOCK * BLOCK
    blocks = logits[:, :vm].reshape(r, -1, BLOCK)
    bmax = blocks.amax(dim=-1)
    tail = logits[:, vm:]
    top = bmax.amax(dim=-1)
    if tail.shape[1]:
        top = torch.maximum(top, tail.amax(dim=-1))
    return blocks, bmax, tail, top


def _argmax_rows(logits: torch.Tensor) -> list[int]:
    """`logits.argmax(-1)` (first maximum) by way of `_block_max`."""
    blocks, bmax, tail, top = _block_max(logits)
    hit = bmax == top[:, None]
    first = hit.int().argmax(dim=-1)  # argmax returns the first of equal maxima
    inner = (blocks[torch.arange(logits.shape[0]), first] == top[:, None]).int().argmax(dim=-1)
    tok = first * BLOCK + inner
    if tail.shape[1]:
        in_tail = (tail == top[:, None]).int().argmax(dim=-1) + blocks.shape[1] * BLOCK
        tok = torch.where(hit.any(dim=-1), tok, in_tail)
    return tok.tolist()


def _can_pack(dtype: torch.dtype) -> bool:
    return torch.backends.mkldnn.is_available() and dtype in (torch.float32, torch.bfloat16)


class Linear(nn.Linear):
    """`nn.Linear` that, on CPU, runs on a weight pre-packed for oneDNN.

    oneDNN's blocked weight layout is what lets bf16 matmuls use AMX: at decode-sized
    batches it is ~2-3x faster than `F.linear` on the plain `[out, in]` weight. GELU
    (tanh) can be fused into the same kernel.
    """

    packed: torch.Tensor | None = None
    # bf16 on CPU with AMX (see `set_amx`): the kernel library while steps of at most
    # AMX_MAX_ROWS rows (decode) run on `cpu_kernels.linear_amx`, and the weight in its tile
    # layout (kept when switched off: switching back is free)
    _amx_lib = None
    _amx_packed: torch.Tensor | None = None
    AMX_MAX_ROWS = 64  # past ~64-96 rows oneDNN is as fast (measured), and prefill is compute-bound

    @property
    def amx(self) -> torch.Tensor | None:
        """The packed weight the AMX kernel runs on, None while it is off."""
        return self._amx_packed if self._amx_lib is not None else None

    def set_amx(self, lib) -> bool:
        """Run steps of up to AMX_MAX_ROWS rows on the native AMX kernel (`lib`: the loaded
        kernels, with AMX) when this weight suits it (bf16, inputs a multiple of 32); `None`
        turns it off. Returns whether it is on."""
        w = self.weight.detach()
        ok = lib is not None and w.dtype == torch.bfloat16 and w.device.type == "cpu" and self.in_features % 32 == 0
        if ok and self._amx_packed is None:
            self._amx_packed = cpu_kernels.pack_amx(w)
        self._amx_lib = lib if ok else None
        return ok

    def pack(self, batch_hint: int) -> None:
        w = self.weight.detach()
        self.packed = torch.ops.mkldnn._reorder_linear_weight(w, batch_hint) if _can_pack(w.dtype) and \
            w.device.type == "cpu" else None

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        if self._amx_lib is not None and x.dim() == 2 and x.shape[0] <= self.AMX_MAX_ROWS:
            return cpu_kernels.linear_amx(self._amx_lib, x, self._amx_packed, self.out_features, self.bias, gelu)
        if self.packed is None:
            y = F.linear(x, self.weight, self.bias)
            return F.gelu(y, approximate="tanh") if gelu else y
        shape = x.shape
        y = torch.ops.mkldnn._linear_pointwise(
            x.reshape(-1, shape[-1]).contiguous(), self.packed, self.bias,
            "gelu" if gelu else "none", [], "tanh" if gelu else "")
        return y.view(*shape[:-1], y.shape[-1])


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
        self._head: Linear | None = None  # packed LM head (CPU), see `pack`
        self._head_full: torch.Tensor | None = None  # zero-padded LM head (CUDA), see `pad_head`
        self._screen: Linear | None = None  # bf16 copy of the LM head for exact greedy, see `greedy`
        self._screen_bound = 0.0
        self._screen_calls = self._screen_fallbacks = 0
        self._native = None  # native CPU kernels (ctypes library), see `set_native_kernels`

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, name_or_path: str, *, device: str | torch.device = "cpu",
                        dtype: torch.dtype = torch.float32) -> "GPT2":
        """Load any HF GPT-2 checkpoint (hub id or local folder)."""
        from transformers import GPT2LMHeadModel

        hf = GPT2LMHeadModel.from_pretrained(name_or_path, dtype=torch.float32)
        model = cls.from_hf(hf)
        del hf
        model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        model.pack()
        return model

    def pack(self, batch_hint: int = 128) -> None:
        """Pre-pack every matmul weight for oneDNN (CPU fp32/bf16); on CUDA, pad the LM head."""
        w = self.wte.weight
        if w.device.type == "cuda":
            self.pad_head()
        if w.device.type != "cpu" or not _can_pack(w.dtype):
            return
        for m in self.modules():
            if isinstance(m, Linear):
                m.pack(batch_hint)
        head = Linear(self.spec.n_embd, self.spec.vocab_size, bias=False, device="meta")
        head.weight = nn.Parameter(self.head_weight().detach(), requires_grad=False)
        head.pack(batch_hint)
        object.__setattr__(self, "_head", head)  # not a submodule: no duplicate parameters
        if w.dtype == torch.float32 and torch.ops.mkldnn._is_mkldnn_bf16_supported():
            self.enable_greedy_screen(batch_hint)
        self.set_native_kernels(True)

    def set_native_kernels(self, on: bool, amx: bool = True) -> bool:
        """Use the native CPU kernels (`server.cpu_kernels`: decode and prefill attention,
        the KV-cache write, the bf16 greedy argmax, and with `amx` the AMX matmul of bf16
        decode steps) when `on` and they can run here (CPU, fp32/bf16, AVX-512, a C
        compiler; AMX for the matmul); else SDPA and torch ops. Returns whether they are in use."""
        w = self.wte.weight
        lib = None
        if on and w.device.type == "cpu" and cpu_kernels.supports(
                w.dtype, self.spec.head_dim, self.spec.n_positions, self.spec.n_head):
            lib = cpu_kernels.load()
        object.__setattr__(self, "_native", lib)
        amx_lib = lib if amx and cpu_kernels.amx(lib) else None
        for m in self._linears():
            m.set_amx(amx_lib)
        return lib is not None

    def _linears(self) -> list["Linear"]:
        """Every matmul of the serving forward: the blocks', the packed LM head, the screen."""
        extra = [m for m in (self._head, self._screen) if m is not None]
        return [m for m in self.modules() if isinstance(m, Linear)] + extra

    @property
    def amx_kernels(self) -> bool:
        return any(m.amx is not None for m in self._linears())

    @property
    def native_kernels(self) -> bool:
        return self._native is not None

    def enable_greedy_screen(self, batch_hint: int = 128) -> None:
        """Keep a bf16 copy of the LM head (packed for oneDNN) to screen greedy rows; see `greedy`."""
        screen = Linear(self.spec.n_embd, self.spec.vocab_size, bias=False, device="meta")
        screen.weight = nn.Parameter(self.head_weight().detach().to(torch.bfloat16), requires_grad=False)
        screen.pack(batch_hint)
        object.__setattr__(self, "_screen", screen)
        self._screen_bound = float(self.head_weight().detach().float().norm(dim=1).max())

    HEAD_ALIGN = 64  # rows

    def pad_head(self) -> None:
        """Give the LM head a row count that is a multiple of `HEAD_ALIGN` (GPU).

        GPT-2's vocabulary (50,257) is odd, so its logits' rows are not 16-byte aligned and
        cuBLAS runs the head with a slow unaligned kernel: 106 us a 64-row fp16 decode step
        on an H100, for 77 MB of weights (~0.7 TB/s). Padded with zero rows to 50,304, the
        head takes the aligned kernels; logits are sliced back to the vocabulary. The
        embedding (or untied head) becomes a view of the padded weight's first rows, so
        nothing is stored twice.
        """
        w = self.head_weight().detach()
        v = w.shape[0]
        rows = -(-v // self.HEAD_ALIGN) * self.HEAD_ALIGN
        if rows == v or self._head_full is not None:
            return
        full = w.new_zeros(rows, w.shape[1])
        full[:v] = w
        if self.lm_head is None:
            self.wte.weight = nn.Parameter(full[:v], requires_grad=False)
        else:
            self.lm_head = nn.Parameter(full[:v], requires_grad=False)
        object.__setattr__(self, "_head_full", full)

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
        if self._head_full is not None:
            return F.linear(h, self._head_full)[..., : self.spec.vocab_size]
        if self._head is None:
            return F.linear(h, self.head_weight())
        return _bucketed(self._head, h) if h.dim() == 2 else self._head(h)

    @property
    def has_greedy_screen(self) -> bool:
        return self._screen is not None

    @property
    def has_fast_greedy(self) -> bool:
        """`greedy` beats `logits` + argmax here (CPU: bf16 screen, or block-wise bf16 argmax)."""
        return self._head is not None

    # |bf16 logit - fp32 logit| <= SCREEN_EPS * ||h|| * max_j ||w_j||: rounding h and w to bf16
    # (2u + u^2, u = 2^-8), fp32 accumulation over C <= 4096 terms (C * 2^-24), and rounding
    # the bf16 output (u * |logit| <= u * ||h|| ||w|| * (1 + 2^-7)): at most 0.0121 in all, with
    # round-to-nearest conversions (oneDNN's and PyTorch's).
    SCREEN_EPS = 0.0125
    MAX_CANDIDATES = 64  # per row on average; beyond that the full fp32 head is cheaper

    def greedy(self, hidden: torch.Tensor) -> list[int]:
        """Greedy tokens for hidden states `[R, C]`, exactly `logits(hidden).argmax(-1)`.

        The LM head is 1/4 of a decode step's FLOPs. A bf16 copy (AMX, half the bytes: ~6x
        faster here) screens the vocabulary: by the bound above, the fp32 argmax is among
        the tokens whose bf16 logit is within 2 * bound of the row's best, typically a few
        dozen. Only those are rescored in fp32, and the best fp32 logit wins (ties: lowest
        id, like argmax). If a row has too many candidates, everything falls back to the
        full fp32 head, so the answer never depends on the screen; a model that falls back
        on most of its first 32+ calls stops screening.
        """
        if self._screen is None:
            logits = self.logits(hidden)
            if logits.dtype != torch.bfloat16:
                return logits.argmax(-1).tolist()
            return cpu_kernels.argmax_rows(self._native, logits) if self._native is not None else _argmax_rows(logits)
        r = hidden.shape[0]
        h = self.ln_f(hidden)  # [R, C] fp32
        lb = _bucketed(self._screen, h.to(torch.bfloat16))  # [R, V] bf16
        bound = self.SCREEN_EPS * h.norm(dim=-1) * self._screen_bound  # [R]
        blocks, bmax, tail, top = _block_max(lb)  # look inside candidate blocks only
        thr = top.float() - 2 * bound  # [R]
        thr = (thr - thr.abs() * 2**-7).to(lb.dtype)  # rounding to bf16 (2^-9) can't raise it past thr
        br, bc = (bmax >= thr[:, None]).nonzero(as_tuple=True)  # candidate blocks
        pi, pj = (blocks[br, bc] >= thr[br][:, None]).nonzero(as_tuple=True)
        tr, tc = (tail >= thr[:, None]).nonzero(as_tuple=True)
        vm = blocks.shape[1] * BLOCK
        rows = torch.cat([br[pi], tr])
        cols = torch.cat([bc[pi] * BLOCK + pj, tc + vm])
        self._screen_calls += 1
        if rows.numel() > self.MAX_CANDIDATES * r:
            self._screen_fallbacks += 1
            if self._screen_calls >= 32 and self._screen_fallbacks * 2 > self._screen_calls:
                # this model's logits are too close for the bound (the bound is worst-case):
                # the screen only adds work here, so stop screening
                object.__setattr__(self, "_screen", None)
            return self._head_logits(h).max(dim=-1).indices.tolist()
        score = (h[rows] * self.head_weight()[cols]).sum(-1)  # exact fp32 logits of the candidates
        best = torch.full((r,), float("-inf")).scatter_reduce_(0, rows, score, "amax")
        win = score == best[rows]
        tok = torch.full((r,), self.spec.vocab_size, dtype=torch.long).scatter_reduce_(0, rows[win], cols[win], "amin")
        if bool((tok == self.spec.vocab_size).any()):  # a row without candidates (non-finite values)
            return self._head_logits(h).max(dim=-1).indices.tolist()
        return tok.tolist()

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
        if self._head is None:
            return 0
        blk, c = self.h[0], self.spec.n_embd
        sizes = sorted({bucket_rows(n) for n in range(1, min(max_tokens, self.WARM_MAX_TOKENS) + 1)})
        for m in sizes:
            x = self.wte.weight.new_zeros(m, c)
            blk.attn.c_attn(x)
            blk.attn.c_proj(x)
            blk.mlp.c_proj(blk.mlp.c_fc(x, gelu=True))
            if m <= bucket_rows(max_rows):
                self._head(x)
                if self._screen is not None:
                    self._screen(x.to(torch.bfloat16))
        return len(sizes)

    # ------------------------------------------------------------------ serving forward
    def forward_step(self, ids: torch.Tensor, positions: torch.Tensor, meta: StepMeta,
                     cache: "KVCache") -> torch.Tensor:
        """One engine step over `N` flattened tokens; writes their K/V into `cache`.

        Returns hidden states `[N, C]` (before the final layer norm). On CPU the rows of
        every matmul are padded to `bucket_rows(N)`; padding rows are zeros, never written
        to the cache, never attended to.
        """
        s = self.spec
        n = ids.shape[0]
        rows = bucket_rows(n) if self._head is not None else n
        x = _pad_rows(self.wte(ids) + self.wpe(positions), rows)  # [rows, C]
        a_pad = x.new_zeros(rows, s.n_embd) if rows > n else None
        c = s.n_embd
        native = self._native_step(meta, positions, cache) if self._native is not None else None
        for i, blk in enumerate(self.h):
            qkv = blk.attn.c_attn(blk.ln_1(x))[:n]  # [N, 3C]
            # keys and values of every token into the cache, in one write: [N, 2, H, D]
            kv = qkv[:, c:].view(n, 2, s.n_head, s.head_dim)
            if native is not None:
                cpu_kernels.write_kv(self._native, cache.kv[i], kv, native.slots, native.positions)
            else:
                cache.kv[i][:, meta.slot, :, positions] = kv
            q = qkv[:, :c].view(n, s.n_head, s.head_dim)
            a = self._attend(q, cache.k[i], cache.v[i], meta, native).reshape(n, c)  # [N, C]
            if a_pad is not None:
                a_pad[:n] = a
                a = a_pad
            x = x + blk.attn.c_proj(a)
            x = x + blk.mlp_forward(x)
        return x[:n]

    def _native_step(self, meta: StepMeta, positions: torch.Tensor, cache: "KVCache") -> "_NativeStep":
        """A step's indices for the native kernels, after the bounds checks `index_put_` and
        SDPA would make (the kernels take raw pointers); ~15 us (decode) to ~30 us (prefill)."""
        n, nd, n_slots = positions.shape[0], meta.n_decode, cache.kv[0].shape[1]
        slots, positions = meta.slot.long().contiguous(), positions.long().contiguous()
        if n and (int(positions.min()) < 0 or int(positions.max()) >= cache.max_len or
                  int(slots.min()) < 0 or int(slots.max()) >= n_slots):
            raise IndexError("a step's slots or positions are outside the KV cache")
        if meta.prefill_pasts is not None and n > nd:  # what prefill_attention indexes by
            ends = meta.prefill_pasts + meta.prefill_qlens
            if int(meta.prefill_qlens.sum()) != n - nd or int(meta.prefill_qlens.min()) < 1 or \
                    int(meta.prefill_pasts.min()) < 0 or int(ends.max()) > cache.max_len or \
                    int(meta.prefill_slots.min()) < 0 or int(meta.prefill_slots.max()) >= n_slots:
                raise IndexError("a step's prefill rows do not match its tokens or the KV cache")
        # a decode row attends to its own slot's keys 0..position
        return _NativeStep(slots, positions, positions[:nd] + 1)

    def _attend(self, q: torch.Tensor, kc: torch.Tensor, vc: torch.Tensor, meta: StepMeta,
                native: "_NativeStep | None") -> torch.Tensor:
        nd = meta.n_decode
        if nd == q.shape[0]:
            return self._attend_decode(q, kc, vc, meta, native)
        if native is not None and meta.prefill_pasts is not None:
            pre = cpu_kernels.prefill_attention(self._native, q[nd:], kc, vc, meta.prefill_slots,
                                                meta.prefill_pasts, meta.prefill_qlens)
        else:
            pre = _prefill_attention(q[nd:], kc, vc, meta)
        return pre if nd == 0 else torch.cat([self._attend_decode(q[:nd], kc, vc, meta, native), pre])

    def _attend_decode(self, q, kc, vc, meta: StepMeta, native: "_NativeStep | None") -> torch.Tensor:
        if native is not None:
            return cpu_kernels.decode_attention(self._native, q, kc, vc, native.slots[:meta.n_decode],
                                                native.decode_lens)
        return _decode_attention(q, kc, vc, meta)


class _NativeStep(NamedTuple):
    """A step's token slots and positions (contiguous int64) and its decode rows' key lengths."""

    slots: torch.Tensor
    positions: torch.Tensor
    decode_lens: torch.Tensor


def _decode_attention(q, kc, vc, meta: StepMeta) -> torch.Tensor:
    """One query per row over a contiguous range of cache slots (a view, no copy)."""
    rows, length = meta.decode_rows, meta.decode_len
    k = kc[:rows, :, :length]  # [rows, H, S, D]
    v = vc[:rows, :, :length]
    if meta.decode_slots is None:  # decode rows are exactly slots 0..rows-1
        qf = q.unsqueeze(2)  # [rows, H, 1, D]
    else:
        qf = q.new_zeros(rows, q.shape[1], 1, q.shape[2])
        qf[meta.decode_slots] = q.unsqueeze(2)
    o = F.scaled_dot_product_attention(qf, k, v, attn_mask=meta.decode_mask_for(q.dtype))  # [rows, H, 1, D]
    o = o.squeeze(2)
    return o if meta.decode_slots is None else o[meta.decode_slots]


def _prefill_attention(q, kc, vc, meta: StepMeta) -> torch.Tensor:
    """Several queries per row; rows padded to `prefill_q`, keys gathered by slot."""
    bp, tq, length = meta.prefill_slots.shape[0], meta.prefill_q, meta.prefill_len
    nh, hd = q.shape[1], q.shape[2]
    if meta.prefill_start is not None:
        rows = slice(meta.prefill_start, meta.prefill_start + bp)
        k, v = kc[rows, :, :length], vc[rows, :, :length]  # [Bp, H, S, D] views
    else:
        k = kc[meta.prefill_slots, :, :length]  # [Bp, H, S, D] gathered
        v = vc[meta.prefill_slots, :, :length]
    if bp * tq == q.shape[0]:  # no padding
        qp = q.view(bp, tq, nh, hd)
    else:
        qp = q.new_zeros(bp * tq, nh, hd)
        qp[meta.prefill_dest] = q
        qp = qp.view(bp, tq, nh, hd)
    o = F.scaled_dot_product_attention(qp.transpose(1, 2), k, v, attn_mask=meta.prefill_mask_for(q.dtype))
    o = o.transpose(1, 2).reshape(bp * tq, nh, hd)  # [Bp*Tq, H, D]
    return o if bp * tq == q.shape[0] else o[meta.prefill_dest]
