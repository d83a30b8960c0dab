"""torch.compile, query chunking, and a long-sequence smoke test (CPU PyTorch path)."""

import os
import time

import numpy as np
import pytest
import torch
from conftest import brute_row, leaves, max_abs, rand_inputs
from xformers.ops.fmha import attn_bias as xab

from xformers_sparsek import _attention, sparsek_attention

F32, F64 = torch.float32, torch.float64
CPU = torch.device("cpu")  # biases default to CUDA where a GPU is present


def fwd_bwd(fn, q, k, v, s, topk, window, bias, dout=None, **kw):
    (qv, kv, vv, sv), inputs = leaves(q, k, v, s)
    res = fn(qv, kv, vv, sv, topk, window, bias, **kw)
    out = res[0] if isinstance(res, tuple) else res
    dout = torch.randn_like(out) if dout is None else dout
    grads = torch.autograd.grad(out, inputs, dout)
    return res, grads, dout


# ------------------------------------------------------------------------------------------
# torch.compile


def test_compile_fullgraph_matches_eager():
    # backend="aot_eager": traces dynamo + AOTAutograd (custom ops, fake impls, autograd
    # registration) exactly as inductor would, without inductor's codegen, which takes
    # ~20 s per graph on a 2-core machine.
    compiled = torch.compile(sparsek_attention, fullgraph=True, backend="aot_eager")
    cases = [
        (rand_inputs(1, 24, 24, 2, 3, 16, 16, F32), 5, 3, xab.LowerTriangularMask()),
        (rand_inputs(1, 16, 20, None, 2, 16, 8, F32), 3, 2,
         xab.BlockDiagonalCausalMask.from_seqlens([5, 11], [7, 13], device=CPU)),
    ]
    for (q, k, v, s), topk, window, bias in cases:
        (out_c, lse_c), g_c, dout = fwd_bwd(compiled, q, k, v, s, topk, window, bias,
                                             return_lse=True)
        (out_e, lse_e), g_e, _ = fwd_bwd(sparsek_attention, q, k, v, s, topk, window, bias,
                                          dout, return_lse=True)
        assert max_abs(out_c, out_e) <= 1e-6 and max_abs(lse_c, lse_e) <= 1e-6
        for name, a, b in zip("qkvs", g_c, g_e):
            assert max_abs(a, b) <= 1e-6, name
        assert float(g_c[3].abs().max()) > 0  # score gradients flow through the graph


def test_plain_eager_calls_skip_the_custom_op(monkeypatch):
    # Without autograd (and outside torch.compile) sparsek_attention runs the forward directly
    # (functional._plain_eager_call): the same bits as through the custom op, which still
    # runs whenever an input needs a gradient.
    from xformers_sparsek import functional

    calls = []
    op = functional.sparsek_fwd
    monkeypatch.setattr(functional, "sparsek_fwd", lambda *a: calls.append(1) or op(*a))
    q, k, v, s = rand_inputs(2, 20, 20, None, 3, 16, 16, F32)
    bias = xab.LowerTriangularMask()
    for scores, topk in ((s, 5), (None, None)):
        direct = sparsek_attention(q, k, v, scores, topk, 3 if topk else 0, bias,
                                   return_lse=True)
        assert not calls
        with torch.no_grad():
            assert not calls and sparsek_attention(q, k, v, scores, topk) is not None
        qg = q.clone().requires_grad_()
        via_op = sparsek_attention(qg, k, v, scores, topk, 3 if topk else 0, bias,
                                   return_lse=True)
        assert calls
        calls.clear()
        assert torch.equal(direct[0], via_op[0].detach()) and torch.equal(direct[1], via_op[1])
    with torch.no_grad():  # no autograd, but a dispatch mode: the custom op runs
        from torch.utils.flop_counter import FlopCounterMode

        with FlopCounterMode(display=False):
            sparsek_attention(q, k, v, s, 5)
    assert calls


# ------------------------------------------------------------------------------------------
# chunking


@pytest.mark.parametrize("chunks", ["tiny_tile", "one_chunk"])
@pytest.mark.parametrize("case", ["causal_window", "padded_local"])
def test_chunked_equals_unchunked(case, chunks, monkeypatch):
    if case == "causal_window":
        bias, B, M, Mk, window, topk = xab.LowerTriangularMask(), 2, 150, 150, 7, 11
    else:
        bias = xab.BlockDiagonalCausalLocalAttentionPaddedKeysMask.from_seqlens_local(
            [41, 3, 77], 90, [60, 90, 77], 50).to(CPU)
        B, M, Mk, window, topk = 1, 121, 270, 5, 9
    q, k, v, s = rand_inputs(B, M, Mk, None, 2, 8, 8, F64)
    (ref, ref_lse), ref_g, dout = fwd_bwd(sparsek_attention, q, k, v, s, topk, window, bias,
                                          return_lse=True)
    if chunks == "tiny_tile":  # chunks of the minimum size (16 queries)
        monkeypatch.setattr(_attention, "_TARGET_TILE", 1)
    else:  # all queries in one chunk
        monkeypatch.setattr(_attention, "_chunk_size", lambda nq, *args, **kw: max(1, nq))
    (out, lse), g, _ = fwd_bwd(sparsek_attention, q, k, v, s, topk, window, bias, dout,
                               return_lse=True)
    assert max_abs(out, ref) <= 1e-12 and max_abs(lse, ref_lse) <= 1e-12
    for name, a, b in zip("qkvs", g, ref_g):
        assert max_abs(a, b) <= 1e-12, name


# ------------------------------------------------------------------------------------------
# long sequence

LONG = dict(M=8192, G=3, H=3, D=64, topk=256, window=64)


@pytest.fixture(scope="module")
def long_run():
    """One forward + backward at M = 8192 (BMGHK, expanded K/V/scores), timed."""
    torch.manual_seed(8192)
    M, G, H, D = LONG["M"], LONG["G"], LONG["H"], LONG["D"]
    q, k, v, s = rand_inputs(1, M, M, G, H, D, D, F32)
    (qv, kv, vv, sv), inputs = leaves(q, k, v, s)
    dout = torch.randn(1, M, G, H, D)
    t0, c0 = time.perf_counter(), time.process_time()
    out = sparsek_attention(qv, kv, vv, sv, LONG["topk"], LONG["window"],
                            xab.LowerTriangularMask())
    t1 = time.perf_counter()
    grads = torch.autograd.grad(out, inputs, dout)
    t2, c2 = time.perf_counter(), time.process_time()
    print(f"\nlong sequence M={M}: forward {t1 - t0:.1f} s, backward {t2 - t1:.1f} s wall, "
          f"{c2 - c0:.1f} s CPU on {torch.get_num_threads()} threads, "
          f"load average {os.getloadavg()[0]:.1f}")
    return dict(q=q, k=k, v=v, s=s, dout=dout, out=out.detach(), grads=grads,
                wall=t2 - t0, cpu=c2 - c0)


def row_expected(run, i, g):
    """float64 output and dq of query i, group g, from the brute-force selection of its row."""
    q, k, v, s = (run[n].double() for n in "qkvs")
    M, window, topk = LONG["M"], LONG["window"], LONG["topk"]
    allowed = np.arange(M) <= i  # causal
    r = brute_row(s[0, :, g, 0].numpy(), allowed, i, window, topk)
    keys = r.window + r.selected
    m = torch.tensor(np.concatenate([np.ones(len(r.window)), r.gates]))
    qi = q[0, i, g].clone().requires_grad_()  # [H, D]
    logits = LONG["D"] ** -0.5 * m * (qi @ k[0, keys, g, 0].T)  # [H, |S|]
    out = (torch.softmax(logits, -1) * m) @ v[0, keys, g, 0]
    (dq,) = torch.autograd.grad(out, qi, run["dout"][0, i, g].double())
    return out.detach(), dq, len(r.pool)


def test_long_sequence_correct(long_run):
    out, grads = long_run["out"], long_run["grads"]
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(g).all() for g in grads)
    assert float(grads[3].abs().max()) > 0
    M = LONG["M"]
    rows = [0, 1, 63, 64, 319, 320, 321, 1000, M - 1] + torch.randint(322, M - 1, (11,)).tolist()
    pools = []
    for n, i in enumerate(rows):
        g = n % LONG["G"]
        expect, dq, npool = row_expected(long_run, i, g)
        pools.append(npool)
        assert max_abs(out[0, i, g], expect) <= 1e-4 * max(1.0, float(expect.abs().max())), i
        assert max_abs(grads[0][0, i, g], dq) <= 1e-4 * max(1.0, float(dq.abs().max())), i
    assert min(pools) == 0 and max(pools) > 8000  # from window-only rows to full pools


def test_long_sequence_wall_time(long_run):
    """Forward + backward at M = 8192 within 60 s on a 2-core machine.

    This machine is shared (CI builds, other sessions' jobs): when other processes take the
    cores, wall time grows while the CPU time we use does not, so the run also passes if
    its CPU time per thread is under 60 s.  Both are printed by the fixture.
    """
    wall, cpu = long_run["wall"], long_run["cpu"]
    per_thread = cpu / torch.get_num_threads()
    assert min(wall, per_thread) < 60, f"forward+backward: {wall:.1f} s wall, {cpu:.1f} s CPU"
