"""Gradients of sparsek_attention (float64).

* ``torch.autograd.gradcheck`` (finite differences) w.r.t. q, k, v and scores on small inputs,
  with inputs drawn away from the selection's kinks (top-k ties, gates at 0 or 1);
* the analytic backward against autograd through ``reference.sparsek_reference`` on random
  shapes for every base bias, BMHK and BMGHK, windows and topk values; the reference's forward
  is itself checked against the independent numpy brute force of conftest;
* invariances every valid score gradient has (shifting all scores changes nothing).
"""

import pytest
import torch
from conftest import (
    BIAS_TYPES,
    brute_rows,
    brute_sparsek,
    kind_id,
    kink_margin,
    leaves,
    make_bias,
    max_abs,
    query_positions,
    allowed_matrix,
    rand_inputs,
    selection_heads,
)
from torch.autograd import gradcheck
from xformers.ops.fmha import attn_bias as xab

from xformers_sparsek import reference, sparsek_attention

F64 = torch.float64
CPU = torch.device("cpu")  # biases default to CUDA where a GPU is present


def separated_inputs(B, Mq, Mk, G, H, D, Dv, bias, window, topk, margin=1e-3, fractional=True):
    """rand_inputs whose selection is at least `margin` from every kink (resampled until so),
    and (if `fractional`) where some attended pool key has a gate strictly inside (0, 1)."""
    for _ in range(200):
        q, k, v, s = rand_inputs(B, Mq, Mk, G, H, D, Dv, F64)
        if kink_margin(s, bias, B, Mq, Mk, window, topk) < margin:
            continue
        if fractional and not has_fractional_gate(s, bias, B, Mq, Mk, window, topk):
            continue
        return q, k, v, s
    raise AssertionError("could not draw inputs away from the kinks")


def has_fractional_gate(s, bias, B, Mq, Mk, window, topk):
    pos = query_positions(bias, Mq, Mk) if window else None
    rows = brute_rows(selection_heads(s), allowed_matrix(bias, B, Mq, Mk), pos, window, topk)
    return any(((r.gates > 0) & (r.gates < 1)).any() for r in rows.values() if r.tau)


def gradcheck_sparsek(q, k, v, s, topk, window, bias, wrt_scores=True):
    """gradcheck w.r.t. the leaves behind q, k, v (and s): expanded inputs stay expanded."""
    views, bases = leaves(q, k, v, s)
    shapes = [t.shape for t in views]
    if not wrt_scores:
        bases[3] = bases[3].detach()

    def fn(q_, k_, v_, s_):
        args = [x.expand(sh) for x, sh in zip((q_, k_, v_, s_), shapes)]
        return sparsek_attention(*args, topk, window, bias)

    assert gradcheck(fn, tuple(bases), atol=1e-6)


# ------------------------------------------------------------------------------------------
# gradcheck


GRADCHECK_CASES = {
    # name: (bias factory, B, Mq, Mk, G, H, window, topk)
    "noncausal": (lambda: None, 1, 5, 7, None, 1, 0, 3),
    "causal_w0": (lambda: xab.LowerTriangularMask(), 1, 7, 7, None, 1, 0, 2),
    "causal_w2": (lambda: xab.LowerTriangularMask(), 1, 8, 8, None, 1, 2, 2),
    "bottom_right": (lambda: xab.LowerTriangularFromBottomRightMask(), 1, 4, 8, None, 1, 1, 2),
    "varlen_causal": (lambda: xab.BlockDiagonalCausalMask.from_seqlens([3, 4], [4, 6], device=CPU),
                      1, 7, 10, None, 1, 1, 2),
    "gqa_bmghk": (lambda: xab.LowerTriangularMask(), 1, 6, 6, 2, 2, 1, 2),
}


@pytest.mark.parametrize("case", list(GRADCHECK_CASES))
def test_gradcheck(case):
    make, B, Mq, Mk, G, H, window, topk = GRADCHECK_CASES[case]
    bias = make()
    D = 3 if G else 4
    q, k, v, s = separated_inputs(B, Mq, Mk, G, H, D, D, bias, window, topk)
    gradcheck_sparsek(q, k, v, s, topk, window, bias)


def test_gradcheck_qkv_with_tied_scores():
    """Ties at the top-k boundary: the selection is fixed (scores don't move); q/k/v grads."""
    bias = xab.LowerTriangularMask()
    q, k, v, _ = rand_inputs(1, 8, 8, None, 1, 4, 3, F64)
    s = torch.tensor([1.0, 0.5, 1.0, 0.5, 0.0, 1.0, 0.5, 1.0], dtype=F64).reshape(1, 8, 1)
    assert has_fractional_gate(s, bias, 1, 8, 8, 1, 2)
    gradcheck_sparsek(q, k, v, s, 2, 1, bias, wrt_scores=False)


def test_gradcheck_capped_simplex_gates():
    """Gates p = clip(u - tau(u), 0, 1) of the reference threshold vs finite differences."""
    for _ in range(5):
        for n, k in ((9, 3), (6, 1), (12, 5)):
            u = torch.randn(n, dtype=F64)
            tau, frac = reference.capped_simplex_tau(u, k)
            p = (u - tau).clamp(0, 1)
            assert abs(float(p.sum()) - k) < 1e-12
            # away from kinks only (u at tau or tau + 1)
            if min((u - tau).abs().min(), (u - tau - 1).abs().min()) < 1e-4:
                continue
            u.requires_grad_()
            assert gradcheck(lambda x: (x - reference.capped_simplex_tau(x, k)[0]).clamp(0, 1),
                             (u,), atol=1e-6)


# ------------------------------------------------------------------------------------------
# analytic backward vs autograd through the reference


def combos(causal, Mk):
    """(window, topk) pairs covering windows 0/1/4 and topk 1, 3 and >= every pool."""
    if causal:
        return [(0, 1), (1, 3), (4, Mk + 2)]
    return [(0, 1), (0, 3), (0, Mk + 2)]


# layout: (G, H, D, Dv)
LAYOUTS = {"bmhk": (None, 2, 8, 8), "bmghk": (2, 3, 8, 8), "bmhk_dv": (None, 2, 6, 10)}
BACKWARD_CASES = (
    [(kind, lay) for kind in BIAS_TYPES for lay in ("bmhk", "bmghk")]
    + [(type(None), "bmhk_dv"), (xab.BlockDiagonalCausalMask, "bmhk_dv")]
)


@pytest.mark.parametrize("kind,layout", BACKWARD_CASES,
                         ids=[f"{kind_id(k)}-{lay}" for k, lay in BACKWARD_CASES])
def test_backward_matches_reference(kind, layout):
    G, H, D, Dv = LAYOUTS[layout]
    bias, B, Mq, Mk, causal = make_bias(kind, max_len=7 if G else 9, allow_empty=True)
    for window, topk in combos(causal, Mk):
        (q, k, v, s), inputs = leaves(*rand_inputs(B, Mq, Mk, G, H, D, Dv, F64))
        dout = torch.randn(*q.shape[:-1], Dv, dtype=F64)
        ctx = f"{bias} B={B} Mq={Mq} Mk={Mk} window={window} topk={topk}"

        out, lse = sparsek_attention(q, k, v, s, topk, window, bias, return_lse=True)
        grads = torch.autograd.grad(out, inputs, dout)
        ref_out, ref_lse = reference.sparsek_reference(q, k, v, s, topk, window, bias)
        ref_grads = torch.autograd.grad(ref_out, inputs, dout, allow_unused=True)
        if ref_grads[3] is None:  # every pool fits in topk: the reference never reads scores
            ref_grads = ref_grads[:3] + (torch.zeros_like(inputs[3]),)

        assert out.shape == q.shape[:-1] + (Dv,) and lse.shape == ref_lse.shape, ctx
        assert max_abs(out, ref_out) <= 1e-9, ctx
        assert max_abs(lse, ref_lse) <= 1e-9, ctx
        for name, g, r in zip("qkvs", grads, ref_grads):
            assert g.shape == r.shape, (name, ctx)
            assert max_abs(g, r) <= 1e-9, (name, ctx, max_abs(g, r))
        # the reference itself agrees with the test's own brute force
        b_out, b_lse = brute_sparsek(q, k, v, s, topk, window, bias)
        assert max_abs(ref_out, b_out) <= 1e-9 and max_abs(ref_lse, b_lse) <= 1e-9, ctx


def test_empty_rows_give_zero_and_minus_inf():
    """Bottom-right with more queries than keys: the first queries see no key."""
    bias = xab.LowerTriangularFromBottomRightMask()
    (q, k, v, s), _ = leaves(*rand_inputs(1, 7, 4, None, 2, 8, 8, F64))
    out, lse = sparsek_attention(q, k, v, s, 2, 1, bias, return_lse=True)
    assert (out[:, :3] == 0).all() and torch.isneginf(lse[:, :, :3]).all()
    assert torch.isfinite(lse[:, :, 3:]).all()
    grads = torch.autograd.grad(out, (q, k, v, s), torch.randn_like(out))
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][:, :3] == 0).all()


# ------------------------------------------------------------------------------------------
# invariances of the score gradient


def score_grad(q, k, v, s, topk, window, bias):
    s = s.detach().clone().requires_grad_()
    out = sparsek_attention(q, k, v, s, topk, window, bias)
    (ds,) = torch.autograd.grad(out, (s,), torch.ones_like(out))
    return ds


@pytest.mark.parametrize("kind", [type(None), xab.LowerTriangularMask,
                                  xab.BlockDiagonalCausalWithOffsetPaddedKeysMask],
                         ids=kind_id)
def test_score_grad_shift_invariant(kind):
    """out(u + c) == out(u) for a per-(batch, head) constant c, so sum_j du_j == 0 there."""
    Mq = Mk = 0
    while min(Mq, Mk) < 7:  # long enough for pools larger than topk
        bias, B, Mq, Mk, causal = make_bias(kind, max_len=15)
    largest = 0.0
    for window, topk in combos(causal, Mk)[:2]:
        q, k, v, s = rand_inputs(B, Mq, Mk, None, 3, 8, 8, F64, score_scale=0.3)
        ds = score_grad(q, k, v, s, topk, window, bias)
        largest = max(largest, float(ds.abs().max()))
        assert ds.sum(1).abs().max() <= 1e-12 * max(1.0, float(ds.abs().max()))
    assert largest > 0  # the check was not vacuous


def test_score_grad_at_tie_with_tau():
    """Regression: a score exactly at tau (gate 0, a kink).  Pool [0.75, 0.25, 0.0], topk 1:
    tau = 0, F = {0, 1} counted strictly (DESIGN.md), so du = [g/2, -g/2, 0] with
    g = dL/dm_0; it once gave [2g/3, -g/3, 0] (|F| = 3 in the mean, 2 elsewhere)."""
    q, k, v, _ = rand_inputs(1, 1, 3, None, 1, 8, 8, F64)
    s = torch.tensor([0.75, 0.25, 0.0], dtype=F64).reshape(1, 3, 1)
    ds = score_grad(q, k, v, s, 1, 0, None).flatten()
    assert abs(float(ds.sum())) <= 1e-12 * float(ds.abs().max())  # shift invariance
    assert float(ds[0].abs()) > 0 and float(ds[2]) == 0.0
