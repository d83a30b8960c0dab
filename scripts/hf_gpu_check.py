#!/usr/bin/env python
"""GPU check of the transformers integration on a random-weight Llama (no downloads).

    PYTHONPATH=. python scripts/hf_gpu_check.py [--out DIR]

Prints (and writes hf_gpu_check.json to --out): exact mode vs sdpa (bf16, padded batch),
SparseK forward+backward with scorer gradients (timed against sdpa), and greedy generation with
SparseKHFCache vs DynamicCache (float32 and bf16).
"""

import argparse
import json
import os
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, reps=3):
    fn()
    _sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        _sync()
        ts.append(time.perf_counter() - t)
    return sorted(ts)[len(ts) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=None)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--gen-prompt", type=int, default=512)
    ap.add_argument("--gen-steps", type=int, default=64)
    args = ap.parse_args()
    from transformers import AutoModelForCausalLM, LlamaConfig

    import xformers_sparsek
    import xformers_sparsek.hf as sk_hf

    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    res = {"info": str(xformers_sparsek.info()) if hasattr(xformers_sparsek, "info") else ""}
    cfg = LlamaConfig(vocab_size=1000, hidden_size=1024, intermediate_size=2048, num_hidden_layers=4,
                      num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=16384)
    torch.manual_seed(0)
    m = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").to(dev, torch.bfloat16).eval()
    sk_hf.register()
    S = args.seq
    ids = torch.randint(0, 1000, (2, S), device=dev)
    am = torch.ones_like(ids)
    am[1, : S // 4] = 0
    real = am.bool()
    with torch.no_grad():
        m.set_attn_implementation("sdpa")
        ref = m(ids, attention_mask=am).logits.float()
        m.set_attn_implementation("sparsek")
        out = m(ids, attention_mask=am).logits.float()
    d = (out - ref)[real].abs()
    res["exact_bf16_padded"] = {"max_abs": float(d.max()), "mean_abs": float(d.mean()),
                                "logit_std": float(ref[real].std())}
    print("exact", res["exact_bf16_padded"], flush=True)

    # SparseK fwd+bwd with scorer gradients vs sdpa fwd+bwd
    sk_hf.add_scorers(m, topk=256, window=128)
    for p in m.parameters():
        p.requires_grad_(False)
    sp = sk_hf.scorer_parameters(m)
    for p in sp:
        p.requires_grad_(True)
    m.train()
    x = torch.randint(0, 1000, (1, S), device=dev)

    def step():
        for p in sp:
            p.grad = None
        loss = m(x, labels=x).loss
        loss.backward()
        return loss

    loss = step()
    gn = [float(p.grad.norm()) for p in sp]
    t_sparse = timed(step)
    m.set_attn_implementation("sdpa")
    for p in m.model.embed_tokens.parameters():
        p.requires_grad_(True)  # so sdpa's backward runs through attention
    t_sdpa = timed(lambda: m(x, labels=x).loss.backward())
    for p in m.model.embed_tokens.parameters():
        p.requires_grad_(False)
    m.set_attn_implementation("sparsek")
    res["train_step"] = {"loss": float(loss), "scorer_grad_norm_min": min(gn), "scorer_grad_norm_max": max(gn),
                         "sparsek_s": t_sparse, "sdpa_s": t_sdpa}
    print("train", res["train_step"], flush=True)
    m.eval()

    # generation: SparseKHFCache vs DynamicCache
    m.generation_config.eos_token_id = None
    for dt in (torch.float32, torch.bfloat16):
        m.to(dt)
        with torch.no_grad():
            with torch.random.fork_rng():
                for p in sp:
                    p.copy_(torch.randn_like(p) * 0.05)
            prompt = torch.randint(0, 1000, (2, args.gen_prompt), device=dev)
            t = time.perf_counter()
            g_ref = m.generate(prompt, max_new_tokens=args.gen_steps, do_sample=False)
            t_dyn = time.perf_counter() - t
            cache = sk_hf.SparseKHFCache(m.config)
            t = time.perf_counter()
            g = m.generate(prompt, max_new_tokens=args.gen_steps, do_sample=False, past_key_values=cache)
            t_sk = time.perf_counter() - t
        same = (g == g_ref)[:, args.gen_prompt:].float().mean().item()
        res[f"generate_{str(dt).split('.')[-1]}"] = {
            "equal": bool(torch.equal(g, g_ref)), "token_agreement": same, "dynamic_s": t_dyn,
            "sparse_cache_s": t_sk, "kv_bytes": cache.kv_bytes(), "overflow": cache.overflow_count()}
        print("generate", dt, res[f"generate_{str(dt).split('.')[-1]}"], flush=True)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "hf_gpu_check.json"), "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
