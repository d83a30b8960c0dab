"""``python -m xformers_sparsek demo``: SparseK next to dense attention on a long input.

The input imitates one attention layer of a small LM (SmolLM2-135M shapes: 9 query heads,
3 KV heads, head dim 64) over an 8K-token causal sequence in which a few hundred
"anchor" tokens carry the information later queries look for.  Scores come from a
training-free, causal-safe scorer (each key's own features only; see ``key_norm_scores``).
The demo prints the selection statistics, the error of the fast path against the float64
path and against dense attention, and the timings.
"""

import argparse
import time

import torch
import torch.nn.functional as F
from xformers.ops.fmha import attn_bias as xab

from . import _cuda, _ext
from ._problem import make_problem
from ._selection import select
from .functional import sparsek_attention


def key_norm_scores(k: torch.Tensor) -> torch.Tensor:
    """A training-free score: the (standardised) norm of each key.  It reads only key j's
    own features, so it never looks at future tokens."""
    n = k.float().norm(dim=-1)
    return (n - n.mean(dim=1, keepdim=True)) / n.std(dim=1, keepdim=True).clamp(min=1e-6)


def make_inputs(S, G, H, D, device, dtype, n_anchor=256, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    topics = torch.randn(n_anchor, D, generator=g)
    anchor_pos = torch.randperm(S, generator=g)[:n_anchor]
    k = 0.5 * torch.randn(1, S, G, D, generator=g)
    k[0, anchor_pos] += 2.0 * topics.unsqueeze(1)  # anchors: strong, distinct keys
    # queries look for a random earlier anchor's topic, plus noise
    pick = torch.randint(0, n_anchor, (S,), generator=g)
    q = 0.5 * torch.randn(1, S, G, H, D, generator=g) + topics[pick].view(1, S, 1, 1, D)
    v = torch.randn(1, S, G, D, generator=g)
    to = dict(device=device, dtype=dtype)
    q = q.to(**to)
    k = k.to(**to).unsqueeze(3).expand(1, S, G, H, D)
    v = v.to(**to).unsqueeze(3).expand(1, S, G, H, D)
    return q, k, v


def timed(fn, device, reps=None):
    """(mean ms per call, last output); on CUDA: 3 calls after a warm-up call."""
    reps = reps or (3 if device.type == "cuda" else 1)
    if device.type == "cuda":
        fn()
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        out = fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t) / reps * 1e3, out


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m xformers_sparsek demo")
    ap.add_argument("--seq", type=int, default=8192)
    ap.add_argument("--topk", type=int, default=512)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    dev = torch.device(args.device)
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    S, G, H, D = args.seq, 3, 3, 64
    q, k, v = make_inputs(S, G, H, D, dev, dtype)
    scores = key_norm_scores(k[:, :, :, 0]).unsqueeze(3).expand(1, S, G, H)
    bias = xab.LowerTriangularMask()
    prob = make_problem(q, k, v, scores, bias, args.topk, args.window, None)
    why = _cuda.unsupported_reason(prob.q, prob.k, prob.v, prob.scores, prob.layout)
    path = "CUDA kernels" if why is None and dev.type == "cuda" else "PyTorch path"
    print(f"SparseK demo: S={S}, 9 query / 3 KV heads, D={D}, {dtype}, causal, "
          f"topk={args.topk}, window={args.window}, device={dev} ({path})")
    if dev.type == "cuda" and why is not None:
        print(f"  (CUDA kernels not used: {why})")
    if dev.type == "cpu" and _ext.extension_error():
        print(f"  (extension: {_ext.extension_error()})")

    # Selection statistics.
    sel = select(prob.scores, prob.layout, args.topk)
    pool = prob.layout.pool_size.float()
    attended = torch.clamp(pool, max=args.topk) + (prob.layout.win_hi - prob.layout.win_lo).float()
    dense = (prob.layout.win_hi - prob.layout.pool_lo).float()
    sparse_q = torch.isfinite(sel.tau)
    print(f"selection: {int(sparse_q.sum())}/{sparse_q.numel()} (head, query) pairs sparsified; "
          f"attended keys per query {attended.mean():.0f} vs {dense.mean():.0f} dense "
          f"({100 * attended.sum() / dense.sum():.1f}% of the causal work)")
    if sparse_q.any():
        nF = sel.nF[sparse_q].float()
        print(f"  fractional gates per query: mean {nF.mean():.1f}, max {int(nF.max())}; "
              f"tau range [{sel.tau[sparse_q].min():.3f}, {sel.tau[sparse_q].max():.3f}]")

    t_sparse, out = timed(lambda: sparsek_attention(q, k, v, scores, args.topk, args.window, bias), dev)
    t_exact, exact = timed(lambda: sparsek_attention(q, k, v, None, None, 0, bias), dev)
    qt = q.reshape(1, S, G * H, D).transpose(1, 2)
    kt = k.reshape(1, S, G * H, D).transpose(1, 2)
    vt = v.reshape(1, S, G * H, D).transpose(1, 2)
    t_dense, dense_out = timed(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), dev)
    dense_out = dense_out.transpose(1, 2).reshape(out.shape)

    def rel(a, b):
        return ((a.double() - b.double()).norm() / b.double().norm()).item()

    # Fast path vs the float64 PyTorch path on a slice of queries (the last 512 of them).
    tail = slice(S - 512, S)
    ref = sparsek_attention(q.double()[:, tail.start:], k.double(), v.double(), scores.double(),
                            args.topk, args.window, xab.LowerTriangularFromBottomRightMask())
    print(f"error of the {path} vs float64 (last 512 queries): {rel(out[:, tail], ref):.2e}")
    print(f"exact mode vs dense SDPA: {rel(exact, dense_out):.2e}")
    print(f"SparseK vs dense attention output (approximation): {rel(out, dense_out):.3f}")
    print(f"time: SparseK {t_sparse:.1f} ms | exact mode {t_exact:.1f} ms | dense SDPA {t_dense:.1f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
