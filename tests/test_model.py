"""Our GPT-2 forward against transformers' GPT2LMHeadModel (fp32)."""

import pytest
import torch
from transformers import GPT2LMHeadModel

from server.engine.kv_cache import KVCache
from server.model import GPT2, StepMeta, additive_mask


def test_dense_logits_match_hf(tiny_model_dir):
    hf = GPT2LMHeadModel.from_pretrained(tiny_model_dir).eval()
    ours = GPT2.from_pretrained(str(tiny_model_dir))
    torch.manual_seed(0)
    ids = torch.randint(0, 50257, (3, 40))
    with torch.no_grad():
        ref = hf(ids).logits
        h, _ = ours.forward_dense(ours.wte(ids), torch.arange(40).expand(3, 40))
        got = ours.logits(h)
    assert (got - ref).abs().max().item() < 1e-4


def test_padded_lm_head_gives_the_same_logits(tiny_model_dir):
    """`pad_head` (what CUDA models get): 50,257 -> 50,304 rows of zeros, logits sliced back;
    the embedding becomes a view of the padded weight, not a second copy."""
    plain = GPT2.from_pretrained(str(tiny_model_dir))
    padded = GPT2.from_pretrained(str(tiny_model_dir))
    from server.model.backend import Backend, pad_head

    padded.backend = Backend(head_full=pad_head(padded))  # the plain F.linear path + padded head, as on CUDA
    full = padded.backend.head_full
    assert full.shape == (50304, plain.spec.n_embd) and not full[50257:].any()
    assert padded.wte.weight.data_ptr() == full.data_ptr() and padded.wte.weight.shape[0] == 50257
    torch.manual_seed(2)
    h = torch.randn(5, plain.spec.n_embd)
    with torch.inference_mode():
        got, ref = padded.logits(h), plain.logits(h)
        assert got.shape == (5, 50257)
        assert (got - ref).abs().max().item() < 1e-4
        assert padded.greedy(h) == ref.argmax(-1).tolist()
        ids = torch.tensor([1, 50256])
        assert torch.equal(padded.wte(ids), plain.wte(ids))


@pytest.mark.parametrize("token_major", [False, True], ids=["head-major", "token-major"])
def test_step_forward_matches_dense_for_mixed_rows(tiny_model_dir, token_major):
    """Flattened decode + prefill rows over the slot cache == per-row dense forward."""
    m = GPT2.from_pretrained(str(tiny_model_dir))
    s = m.spec
    cache = KVCache(n_layer=s.n_layer, n_head=s.n_head, head_dim=s.head_dim, max_len=64,
                    num_slots=4, device="cpu", dtype=torch.float32, token_major=token_major)
    for slot in range(4):
        cache.prepare(slot, 64)
    torch.manual_seed(1)
    seqs = [torch.randint(0, 50257, (n,)) for n in (7, 12, 3)]
    with torch.inference_mode():
        # prefill rows 0 and 2 fully, row 1 in two chunks (5 then 7 tokens)
        def prefill(rows):  # rows: (slot, tokens, past)
            ids = torch.cat([t for _, t, _ in rows])
            pos = torch.cat([torch.arange(p, p + len(t)) for _, t, p in rows])
            slot = torch.cat([torch.full((len(t),), sl) for sl, t, _ in rows])
            tq = max(len(t) for _, t, _ in rows)
            length = max(p + len(t) for _, t, p in rows)
            dest = torch.cat([torch.arange(b * tq, b * tq + len(t)) for b, (_, t, _) in enumerate(rows)])
            tt = torch.arange(tq)[None, :, None]
            j = torch.arange(length)[None, None, :]
            past = torch.tensor([p for _, _, p in rows])[:, None, None]
            ql = torch.tensor([len(t) for _, t, _ in rows])[:, None, None]
            mask = ((j <= past + tt) & (tt < ql)) | ((tt >= ql) & (j == 0))
            meta = StepMeta(slot=slot, n_decode=0, prefill_slots=torch.tensor([sl for sl, _, _ in rows]),
                            prefill_q=tq, prefill_len=length, prefill_dest=dest,
                            prefill_mask=additive_mask(mask.unsqueeze(1), torch.float32))
            return m.forward_step(ids, pos, meta, cache)

        prefill([(0, seqs[0], 0), (1, seqs[1][:5], 0), (2, seqs[2], 0)])
        h = prefill([(1, seqs[1][5:], 5)])
        ref, _ = m.forward_dense(m.wte(seqs[1])[None], torch.arange(12)[None])
        assert (m.logits(h[-1]) - m.logits(ref[0, -1])).abs().max() < 1e-4
        # decode one token for slots 0 and 2 (not dense: slot 1 idle)
        nxt = torch.tensor([11, 22])
        lens = torch.ones(3, dtype=torch.long)
        lens[0], lens[2] = 8, 4
        meta = StepMeta(slot=torch.tensor([0, 2]), n_decode=2, decode_rows=3, decode_len=8,
                        decode_slots=torch.tensor([0, 2]),
                        decode_mask=additive_mask((torch.arange(8)[None] < lens[:, None]).view(3, 1, 1, 8),
                                                  torch.float32))
        h = m.forward_step(nxt, torch.tensor([7, 3]), meta, cache)
        for row, (seq, tok) in enumerate(zip((seqs[0], seqs[2]), nxt)):
            full = torch.cat([seq, tok[None]])
            ref, _ = m.forward_dense(m.wte(full)[None], torch.arange(len(full))[None])
            assert (m.logits(h[row]) - m.logits(ref[0, -1])).abs().max() < 1e-4


def test_prefix_kv_matches_joint_forward(tiny_model_dir):
    m = GPT2.from_pretrained(str(tiny_model_dir))
    torch.manual_seed(2)
    soft = torch.randn(5, m.spec.n_embd) * 0.3
    ids = torch.randint(0, 50257, (6,))
    with torch.inference_mode():
        kv = m.prefix_kv(soft)
        assert kv.shape == (m.spec.n_layer, 2, m.spec.n_head, 5, m.spec.head_dim)
        past = [(kv[i, 0][None], kv[i, 1][None]) for i in range(m.spec.n_layer)]
        h1, _ = m.forward_dense(m.wte(ids)[None], torch.arange(5, 11)[None], past=past)
        x = torch.cat([soft, m.wte(ids)])[None]
        h2, _ = m.forward_dense(x, torch.arange(11)[None])
    assert (h1[0] - h2[0, 5:]).abs().max() < 1e-4


def _full_argmax(m, h):
    return m.logits(h).max(dim=-1).indices.tolist()


def test_greedy_screen_equals_full_fp32_argmax(tiny_model_dir):
    """`GPT2.greedy` (bf16 screen + fp32 rescoring) picks exactly the fp32 head's argmax."""
    m = GPT2.from_pretrained(str(tiny_model_dir))
    if not m.has_greedy_screen:  # CPUs without native bf16: force it, the answer must not change
        m.enable_greedy_screen()
    g = torch.Generator().manual_seed(3)
    with torch.inference_mode():
        for rows, scale in ((1, 1.0), (7, 5.0), (64, 30.0), (130, 0.1)):
            h = torch.randn(rows, m.spec.n_embd, generator=g) * scale
            assert m.greedy(h) == _full_argmax(m, h)
        m.MAX_CANDIDATES = 0  # the fallback (too many candidates) gives the same answer
        h = torch.randn(9, m.spec.n_embd, generator=g)
        assert m.greedy(h) == _full_argmax(m, h)


def test_greedy_screen_decides_near_ties_in_fp32(tiny_model_dir):
    """Two tokens 1e-4 apart (far below bf16's resolution, far above fp32 noise): the winner
    is the fp32 one, whichever side of the tie it is on."""
    m = GPT2.from_pretrained(str(tiny_model_dir))
    g = torch.Generator().manual_seed(4)
    h = torch.randn(1, m.spec.n_embd, generator=g) * 3
    with torch.inference_mode():
        hn = m.ln_f(h)[0]
        a, b = _full_argmax(m, h)[0], 123
        for delta in (1e-4, -1e-4):
            w = m.wte.weight
            w[b] = w[a] + delta * hn / hn.dot(hn)  # logit_b = logit_a + delta
            m.pack()  # rebuild the packed head and the bf16 screen from the edited weights
            if not m.has_greedy_screen:
                m.enable_greedy_screen()
            logits = m.logits(h)[0]
            assert abs((logits[b] - logits[a]).item() - delta) < 2e-5
            want = b if delta > 0 else a
            assert _full_argmax(m, h)[0] == want
            assert m.greedy(h) == [want]


def test_blockwise_argmax_is_argmax():
    """The bf16 fast argmax returns argmax's answer, first maximum on ties, tail included."""
    from server.model.greedy import argmax_rows as _argmax_rows

    g = torch.Generator().manual_seed(5)
    x = torch.randn(6, 50257, generator=g).to(torch.bfloat16)
    x[1, 50250] = 9  # maximum in the tail (past the last whole block)
    x[2, 100] = x[2, 7000] = 9  # a tie: the first one wins
    x[3, :] = 0  # all equal: index 0
    x[4, 63] = x[4, 64] = 9  # tie across a block boundary
    assert _argmax_rows(x) == x.float().argmax(-1).tolist() == [_argmax_rows(x)[0], 50250, 100, 0, 63,
                                                                 _argmax_rows(x)[5]]


def test_greedy_screen_turns_itself_off_when_it_cannot_help(tiny_model_dir):
    """A model whose logits crowd within the bound (here: a huge final-norm gain) falls back
    every time; after 32 calls it stops screening, and every answer stays the argmax."""
    m = GPT2.from_pretrained(str(tiny_model_dir))
    with torch.inference_mode():
        m.ln_f.weight.mul_(1000.0)  # |h| grows 1000x, the bound with it; the logit gaps do too,
        m.wte.weight[:, 1:] *= 1e-3  # unless the head is squeezed: most logits within the bound
        m.pack()
        m.enable_greedy_screen(kind="bf16")  # the bf16 screen's bound (the int8 one's: test_int8_screen)
        g = torch.Generator().manual_seed(6)
        for _ in range(40):
            h = torch.randn(4, m.spec.n_embd, generator=g)
            assert m.greedy(h) == _full_argmax(m, h)
    assert not m.has_greedy_screen and m.backend.screen.fallbacks >= 16


def test_bucket_rows_and_warm_kernels(tiny_model_dir):
    from server.model import bucket_rows

    assert [bucket_rows(n) for n in (1, 8, 9, 128, 129, 1024, 1025, 2048)] == [8, 8, 16, 128, 192, 1024, 1152, 2048]
    m = GPT2.from_pretrained(str(tiny_model_dir))
    assert m.warm_kernels(200, 4) == len({bucket_rows(n) for n in range(1, 201)})


def test_greedy_screen_stays_on_for_an_ordinary_model(tiny_model_dir):
    m = GPT2.from_pretrained(str(tiny_model_dir))
    if not m.has_greedy_screen:
        m.enable_greedy_screen()
    g = torch.Generator().manual_seed(7)
    with torch.inference_mode():
        for _ in range(40):
            h = torch.randn(4, m.spec.n_embd, generator=g)
            assert m.greedy(h) == _full_argmax(m, h)
    assert m.has_greedy_screen and m.backend.screen.fallbacks == 0


def test_prefix_kv_batch_groups_by_length_and_matches_one_at_a_time(tiny_model_dir, monkeypatch):
    m = GPT2.from_pretrained(str(tiny_model_dir))
    g = torch.Generator().manual_seed(4)
    lens = [9, 30, 1, 12, 31, 8, 29, 10]
    prompts = [torch.randn(n, m.spec.n_embd, generator=g) * 0.3 for n in lens]
    groups = []
    real = m._prefix_kv_padded
    monkeypatch.setattr(m, "_prefix_kv_padded", lambda ps: groups.append([p.shape[0] for p in ps]) or real(ps))
    with torch.inference_mode():
        got = m.prefix_kv_batch(prompts)
        for p, kv in zip(prompts, got):
            ref = real([p])[0]
            assert kv.shape == ref.shape and (kv - ref).abs().max() < 1e-5
    # similar lengths share a forward, padding within the slack; every prompt once
    assert sorted(n for grp in groups for n in grp) == sorted(lens)
    assert len(groups) < len(lens)
    for grp in groups:
        assert len(grp) * max(grp) <= m.PREFIX_PAD_SLACK * sum(grp)
