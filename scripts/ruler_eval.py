#!/usr/bin/env python3
"""RULER (lm-eval's ``niah_single_1`` and ``ruler_vt``) on SmolLM2-135M-Instruct (offline
gguf) under dense, window-with-sinks and SparseK + window attention of the same key budget;
merges its records into docs/ruler.json and rewrites docs/ruler.md.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python scripts/ruler_eval.py --length 4096 --limit 10

(lm-eval's RULER metrics exist for lengths 4096, 8192, ..., 131072 only.)

Needs ``lm_eval`` (0.4.x; the RULER tasks generate their data locally from the tokenizer).

Methods (generation with transformers' DynamicCache; every decode step sees the full cache):
  dense        transformers' ``sdpa``.
  window-sink  the last ``B - sinks`` keys plus the first ``sinks`` keys (B = topk + window).
  sparsek      ``sparsek_attention`` with topk/window on a causal base and the training-free
               ``MeanQueryScorer`` (scripts/quality.py's sparsek method).  A key's score
               depends only on tokens up to it, so it is computed once, when the key arrives
               (prefill: the scorer over the prompt; decode: the running query mean so far),
               and kept per layer: decode steps select exactly what a full recomputation
               over the sequence would.
  sparsek-hf   the hf integration (``attn_implementation="sparsek"``) with per-layer
               ``SparseKScorer``s loaded from ``--scorers FILE`` (e.g. the fine-tuned ones of
               scripts/gpu_finetune.py, docs/quality_gpu_scorers.safetensors; topk/window/sinks
               from the file's metadata); ``--scorers init`` uses fresh scorers (a sliding
               window plus 4 sinks; recorded as ``sparsek-hf-init``).  A scorer's score depends
               on its own token only, so the decode steps (recomputed from the cache) select
               what a full recomputation would.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python scripts/ruler_eval.py --length 4096 --limit 10 \
        --methods sparsek-hf --scorers docs/quality_gpu_scorers.safetensors
"""

import argparse
import datetime
import json
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import quality  # noqa: E402  (model loading and the scorer of the perplexity study)

TASKS = ["niah_single_1", "ruler_vt"]


class Cfg:
    topk = 1024
    window = 256
    sinks = 4
    scorer = None


# per layer: scores of the keys seen so far [1, n, G] and the running sum of the queries'
# group means [G, D] (float64), for the sparsek method's decode steps
_STATE = {}


def _group_mean(q):  # [1, L, G, R, D] -> [L, G, D] float64
    return q[0].to(torch.float64).mean(2)


def sparsek_attn_fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    from xformers.ops.fmha import attn_bias as xab

    from xformers_sparsek import sparsek_attention

    B, Hq, L, D = query.shape
    Lk = key.shape[2]
    if B != 1:
        raise NotImplementedError("ruler_eval.py generates one sequence at a time")
    q, k, v = quality._to_bmghk(query, key, value)
    layer = module.layer_idx
    sc = Cfg.scorer
    if L == Lk:  # prefill: score every prompt key
        u = sc(q, k, v, xab.LowerTriangularMask())[..., 0]  # [1, L, G]
        _STATE[layer] = (u, _group_mean(q).sum(0))
    else:  # decode: the new keys' scores from the running query mean
        u, qsum = _STATE[layer]
        new = []
        for t in range(L):
            qsum = qsum + _group_mean(q[:, t:t + 1])[0]
            pos = Lk - L + t
            kt = k[0, pos, :, 0].to(torch.float64)  # [G, D]
            s = sc.sharpness * D**-0.5 * (qsum / (pos + 1) * kt).sum(-1)
            if pos < sc.sinks:
                s = s + sc.sink_bonus
            new.append(s.to(torch.float32))
        u = torch.cat([u, torch.stack(new).unsqueeze(0)], dim=1)
        _STATE[layer] = (u, qsum)
    s = u.unsqueeze(-1).expand(1, Lk, u.shape[2], q.shape[3])
    base = xab.LowerTriangularFromBottomRightMask()
    out = sparsek_attention(q, k, v, s, Cfg.topk, Cfg.window, attn_bias=base, scale=scaling)
    return out.reshape(B, L, Hq, -1), None


def window_sink_attn_fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                        **kw):
    L, Lk = query.shape[2], key.shape[2]
    W = Cfg.topk + Cfg.window
    i = torch.arange(L).view(-1, 1) + (Lk - L)  # absolute position of each query
    j = torch.arange(Lk).view(1, -1)
    keep = (j <= i) & ((i - j < W - Cfg.sinks) | (j < Cfg.sinks))
    bias = torch.zeros(L, Lk, dtype=query.dtype).masked_fill(~keep, float("-inf"))
    out = F.scaled_dot_product_attention(query, key, value, attn_mask=bias, scale=scaling,
                                         enable_gqa=True)
    return out.transpose(1, 2), None


def set_method(model, method):
    from transformers import AttentionInterface

    AttentionInterface.register("ruler_sparsek", sparsek_attn_fn)
    AttentionInterface.register("ruler_window_sink", window_sink_attn_fn)
    model.set_attn_implementation(
        {"dense": "sdpa", "sparsek": "ruler_sparsek", "window-sink": "ruler_window_sink",
         "sparsek-hf": "sparsek"}[method])


def attach_scorers(model, path, topk, window):
    """Give ``model`` the hf scorers of the safetensors file ``path`` (``"init"``: fresh ones);
    returns a description for the record."""
    import hashlib

    from safetensors import safe_open

    import xformers_sparsek.hf as sk_hf

    meta = {}
    if path != "init":
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
        for name, want in (("topk", topk), ("window", window)):
            if name in meta and int(meta[name]) != want:
                raise SystemExit(f"--scorers {path} was trained with {name}={meta[name]}, not {want}")
    sk_hf.add_scorers(model, topk, window, sinks=int(meta.get("sinks", 4)),
                      init_slope=float(meta.get("init_slope", 0.5)), set_attn_implementation=False)
    if path == "init":
        return "fresh scorers (init)"
    n = sk_hf.load_scorer_weights(model, path)
    expected = len(sk_hf.scorer_parameters(model))
    if n != expected:
        raise SystemExit(f"--scorers {path}: {n} scorer tensors loaded, the model has {expected}")
    with open(path, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    return f"{os.path.basename(path)} (sha256 {digest})"


def run(method, model, tok, tokdir, length, limit, log):
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM

    set_method(model, method)
    _STATE.clear()
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=1, max_length=length + 256)
    t0 = time.time()
    res = simple_evaluate(
        model=lm, tasks=TASKS, limit=limit, num_fewshot=0,
        gen_kwargs="max_gen_toks=32", log_samples=False,
        metadata={"max_seq_lengths": [length], "tokenizer": tokdir},
    )
    out = {}
    for task in TASKS:
        r = res["results"][task]
        score = r.get(f"{length},none", r.get(str(length)))
        out[task] = score
        log(f"  {method:12s} {task:14s} L={length}: {score}")
    out["seconds"] = time.time() - t0
    return out


def write_report(db, path_md):
    lines = [
        "# RULER on SmolLM2-135M-Instruct (CPU)",
        "",
        "Written by `scripts/ruler_eval.py` from docs/ruler.json.  lm-eval's `niah_single_1`",
        "(one needle in a repeated-noise haystack) and `ruler_vt` (variable tracking), scored",
        "by lm-eval (per sample, the fraction of the expected strings found in the generation;",
        "shown as a percentage), greedy generation of at most 32 tokens, the gguf model in",
        "float32.  Every method has the same key budget per query (`topk + window`);",
        "`window-sink` keeps the 4 first keys plus the most recent ones, `sparsek` the window",
        "plus the top-`topk` keys of the training-free `MeanQueryScorer` (no fine-tuning),",
        "`sparsek-hf` the window plus the top-`topk` keys of the per-layer `SparseKScorer`s",
        "fine-tuned by scripts/gpu_finetune.py (docs/quality.md; file in the scorers column),",
        "`sparsek-hf-init` the same scorers untrained (a sliding window plus 4 sinks).",
        "`n` is the number of generated samples per task (lm-eval's `limit`): with n = 10 a",
        "score's binomial standard error is up to 16 points, so only large gaps mean anything.",
        "",
        "| length | budget (topk + window) | method | n | niah_single_1 | ruler_vt | run | commit | scorers |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in sorted(db):
        r = db[key]
        lines.append(
            f"| {r['length']} | {r['topk']} + {r['window']} | {r['method']} | {r['limit']} | "
            f"{100 * r['niah_single_1']:.0f} | {100 * r['ruler_vt']:.0f} | {r['date']} ({r['seconds']:.0f} s) "
            f"| {r['commit']} | {r.get('scorers', '')} |")
    with open(path_md, "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--length", type=int, default=4096)
    p.add_argument("--limit", type=int, default=10, help="samples per task")
    p.add_argument("--topk", type=int, default=1024)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--methods", nargs="+", default=["dense", "window-sink", "sparsek"],
                   choices=["dense", "window-sink", "sparsek", "sparsek-hf"])
    p.add_argument("--scorers", default=None,
                   help="sparsek-hf: safetensors file of the hf scorers, or 'init' (fresh scorers)")
    p.add_argument("--out", default=os.path.join(ROOT, "docs"))
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    Cfg.topk, Cfg.window = a.topk, a.window
    Cfg.scorer = quality.make_scorer("mean-query")
    model, tok = quality.load_model()
    scorers = None
    if "sparsek-hf" in a.methods:
        if not a.scorers:
            raise SystemExit("--methods sparsek-hf needs --scorers FILE (or --scorers init)")
        scorers = attach_scorers(model, a.scorers, a.topk, a.window)
    tokdir = os.path.join("/tmp", "ruler_tokenizer")
    tok.save_pretrained(tokdir)  # the RULER generators load the tokenizer by path
    jpath = os.path.join(a.out, "ruler.json")
    db = json.load(open(jpath)) if os.path.exists(jpath) else {}
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    for method in a.methods:
        r = run(method, model, tok, tokdir, a.length, a.limit, lambda s: print(s, flush=True))
        extra = {}
        if method == "sparsek-hf":
            extra["scorers"] = scorers
            method += "-init" if a.scorers == "init" else ""
        key = f"{a.length}-{a.topk}-{a.window}-{method}"
        db[key] = dict(length=a.length, topk=a.topk, window=a.window, method=method,
                       limit=a.limit, date=stamp, commit=quality.git_commit(), **r, **extra)
        with open(jpath, "w") as f:
            json.dump(db, f, indent=1, sort_keys=True)
        write_report(db, os.path.join(a.out, "ruler.md"))


if __name__ == "__main__":
    main()
