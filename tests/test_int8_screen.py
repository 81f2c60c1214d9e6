"""The int8 greedy screen (`server.model.greedy.Int8Screen`): its bound holds for every token,
and the tokens it picks are exactly the full LM head's argmax, for fp32 and bf16 models, ties
and the fallbacks included."""

from __future__ import annotations

import pytest
import torch

from server import cpu_kernels, cpu_matmul
from server.model import GPT2
from server.model.greedy import BLOCK, Int8Screen

LIB = cpu_kernels.load()
pytestmark = pytest.mark.skipif(not cpu_matmul.int8(LIB), reason="SKIPPED LOUDLY: no AVX512-VNNI int8 kernel "
                                "here (CPU or compiler lacks it), so the int8 greedy screen cannot run")


def _exact_argmax(h: torch.Tensor, w: torch.Tensor) -> list[int]:
    """The definition: float64 logits of the model's own values (a bf16 model's rounded to
    bf16, as its head's output is), first maximum on ties."""
    logits = h.double() @ w.double().T
    if h.dtype == torch.bfloat16:
        logits = logits.to(torch.bfloat16).double()
    return logits.argmax(-1).tolist()


def test_the_bound_holds_for_every_token():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1000, 128, generator=g) * 0.12
    w[5, 7] = 3.0  # an outlier: that token's int8 weights are coarse, its block's bound wide
    screen = Int8Screen(w, LIB)
    for scale in (0.01, 1.0, 50.0):
        h = torch.randn(9, 128, generator=g) * scale
        h[0, 3] = 40 * scale  # an outlier sets the row's scale
        exact = h.double() @ w[screen.perm].double().T  # in the screen's (sorted) order
        for x in (None, h.to(torch.bfloat16)):  # fp32 rows as they are, and rounded to bf16 first
            y = cpu_matmul.linear_int8(LIB, h if x is None else x, screen.weight).double()
            rounding = 0 if x is None else y.abs() * 2**-7  # bf16 logits: the pick allows for this
            per_token = screen._bounds(h, x).repeat_interleave(BLOCK, dim=1)[:, :w.shape[0]]
            err = (y - exact).abs()
            assert bool((err <= per_token + rounding).all())
            assert float((err / per_token).max()) > 0.02  # and it is not vacuous


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_screened_greedy_is_the_full_heads_argmax(tiny_model_dir, dtype):
    m = GPT2.from_pretrained(str(tiny_model_dir), dtype=dtype)
    m.enable_greedy_screen(kind="int8")
    screen = m.backend.screen
    assert isinstance(screen, Int8Screen)
    g = torch.Generator().manual_seed(3)
    w = m.head_weight()
    with torch.inference_mode():
        for rows, scale in ((1, 1.0), (7, 5.0), (64, 30.0), (130, 0.1)):
            h = (torch.randn(rows, m.spec.n_embd, generator=g) * scale).to(dtype)
            got = m.greedy(h)
            assert got == _exact_argmax(m.ln_f(h), w)
            assert got == m._full_greedy(m.ln_f(h))  # the unscreened path (the head's kernel)
        assert screen.calls == 4 and screen.fallbacks == 0  # it screened, it did not fall back
        screen.MAX_ROW_CANDIDATES = 0  # the fallback (too many candidates) gives the same answer
        h = torch.randn(9, m.spec.n_embd, generator=g).to(dtype)
        assert m.greedy(h) == _exact_argmax(m.ln_f(h), w) and screen.fallbacks == 9


def test_ties_go_to_the_lowest_id_and_near_ties_to_the_exact_winner():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(700, 64, generator=g) * 0.12
    h = torch.randn(1, 64, generator=g) * 3
    a = _exact_argmax(h, w)[0]
    for b in (a - 1 if a else a + 1, 650):  # an exact tie, below and above the winner's id
        w2 = w.clone()
        w2[b] = w2[a]
        assert Int8Screen(w2, LIB).greedy(h, w2, _fail) == [min(a, b)]
    for delta in (1e-4, -1e-4):  # 1e-4 apart: far below int8's resolution, far above fp32 noise
        w2 = w.clone()
        w2[650] = w2[a] + delta * h[0] / h[0].dot(h[0])
        assert Int8Screen(w2, LIB).greedy(h, w2, _fail) == [650 if delta > 0 else a]
    # bf16: token 650 made a hair better than the winner (one bf16 step in the weight where h
    # is smallest): the exact logits differ, the bf16-rounded ones tie, and the lower id wins
    wb, hb = w.to(torch.bfloat16), h.to(torch.bfloat16)
    top = _exact_argmax(hb, wb)[0]
    k = int(hb[0].float().abs().argmin())
    wb[650] = wb[top]
    step = torch.tensor(wb[top, k].float().abs().item() * 2**-7 + 1e-30)
    wb[650, k] = (wb[top, k].float() + step * torch.sign(hb[0, k].float())).to(torch.bfloat16)
    exact = (hb.double() @ wb.double().T)[0]
    assert exact[650] > exact[top] and exact[650].to(torch.bfloat16) == exact[top].to(torch.bfloat16)
    assert Int8Screen(wb, LIB).greedy(hb, wb, _fail) == [min(650, top)] == _exact_argmax(hb, wb)


def test_rows_it_cannot_bound_fall_back():
    w = torch.randn(300, 64, generator=torch.Generator().manual_seed(5))
    screen = Int8Screen(w, LIB)
    h = torch.randn(3, 64, generator=torch.Generator().manual_seed(6))
    h[1, 0] = float("inf")  # that row alone goes to the full head
    sent = []
    got = screen.greedy(h, w, lambda x: sent.append(x.clone()) or [7] * x.shape[0])
    ok = _exact_argmax(h[[0, 2]], w)
    assert got == [ok[0], 7, ok[1]] and len(sent) == 1 and torch.equal(sent[0], h[1:2])
    zero = torch.zeros(2, 64)  # every logit 0: all 300 tokens tie, too many candidates
    screen.MAX_ROW_CANDIDATES = 100
    assert screen.greedy(zero, w, lambda x: [0] * x.shape[0]) == [0, 0] and screen.fallbacks == 3


def test_a_screen_that_cannot_help_turns_itself_off(tiny_model_dir):
    m = GPT2.from_pretrained(str(tiny_model_dir))
    m.enable_greedy_screen(kind="int8")
    screen = m.backend.screen
    screen.MAX_ROW_CANDIDATES = 0  # every row to the full head
    g = torch.Generator().manual_seed(7)
    with torch.inference_mode():
        for i in range(40):
            h = torch.randn(4, m.spec.n_embd, generator=g)
            assert m.greedy(h) == _exact_argmax(m.ln_f(h), m.head_weight())
            assert m.has_greedy_screen == (i < 31)  # off after its 32nd call
    assert screen.calls == 32 and screen.fallbacks == 128


def _fail(h):
    raise AssertionError("the screen fell back to the full head")


def test_the_default_screen_is_int8_and_the_switch_turns_it_off(tiny_model_dir, monkeypatch):
    for dtype in (torch.float32, torch.bfloat16):
        m = GPT2.from_pretrained(str(tiny_model_dir), dtype=dtype)
        assert isinstance(m.backend.screen, Int8Screen)
        assert m.backend.describe(m)["greedy"] == "int8 screen + exact rescoring"
    monkeypatch.setenv("POLYPROMPT_CPU_SCREEN", "0")
    m = GPT2.from_pretrained(str(tiny_model_dir), dtype=torch.bfloat16)
    assert m.backend.screen is None and m.backend.describe(m)["greedy"] == "full LM head + argmax"
