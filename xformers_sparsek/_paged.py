"""Paged K/V (xFormers' ``Paged*PaddedKeysMask``) on the PyTorch path.

A paged bias describes the same attention as its non-paged padded-keys counterpart
(``_UNPAGED_TYPE``), with each sequence's keys stored in pages of ``page_size`` keys:
logical key ``j`` of sequence ``s`` lives at physical key
``block_tables[s, j // page_size] * page_size + j % page_size``.  We gather the pages into
the contiguous padded layout ([1, num_seqs * max_pages * page_size, ...]) and run the
ordinary path with the non-paged bias; the scores (shaped ``key.shape[:-1]``) are paged
like the keys and gathered the same way.  Forward only, as xFormers' own paged ops.
"""

from typing import List

import torch
from xformers.ops.fmha import attn_bias as xab

PAGED_BIASES = (
    xab.PagedBlockDiagonalPaddedKeysMask,
    xab.PagedBlockDiagonalCausalWithOffsetPaddedKeysMask,
)

FORWARD_ONLY = (
    "paged attn_bias ({}) is forward-only (as xFormers' own paged ops): gradients to "
    "query/key/value/scores are not available; run under torch.no_grad() or detach the inputs"
)


def is_paged(base) -> bool:
    return type(base) in PAGED_BIASES


def check_forward_only(base, tensors) -> None:
    """Raise when autograd would need gradients through a paged bias (forward only)."""
    if is_paged(base) and torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in tensors
    ):
        raise ValueError(FORWARD_ONLY.format(type(base).__name__))


def paged_problems(base, B: int, Mq: int, Mk: int) -> List[str]:
    """Reasons (argument named) why a paged bias does not fit these shapes."""
    r: List[str] = []
    ps = base.page_size
    bt = base.block_tables
    name = type(base).__name__
    if B != 1:
        r.append(f"{name} needs batch size 1, got query batch {B}")
    if base.q_seqinfo.seqstart_py[-1] != Mq:
        r.append(f"{name} covers {base.q_seqinfo.seqstart_py[-1]} queries but query has {Mq}")
    if not isinstance(bt, torch.Tensor) or bt.ndim != 2 or bt.is_floating_point():
        return r + [f"{name}.block_tables must be an integer tensor [num_seqs, max_pages]"]
    seqlens = base.k_seqinfo.seqlen_py
    if bt.shape[0] != len(seqlens):
        r.append(f"{name}.block_tables has {bt.shape[0]} rows for {len(seqlens)} sequences")
        return r
    if Mk % ps:
        r.append(f"key length {Mk} must be a whole number of pages (page_size={ps})")
    if any(n > bt.shape[1] * ps for n in seqlens):
        r.append(f"{name}: a key sequence is longer than block_tables.shape[1] * page_size")
        return r
    used = torch.arange(bt.shape[1], device=bt.device) * ps < torch.tensor(
        seqlens, device=bt.device).unsqueeze(1)
    pages = bt[used]
    if pages.numel() and (int(pages.min()) < 0 or int(pages.max()) >= Mk // ps):
        r.append(
            f"{name}.block_tables holds page indices outside [0, {Mk // ps}) "
            f"(key length {Mk} / page_size {ps})"
        )
    return r


def unpaged_bias(base):
    """The non-paged padded-keys bias over the gathered keys."""
    qs = base.q_seqinfo.seqstart_py
    q_seqlen = [qs[i + 1] - qs[i] for i in range(len(qs) - 1)]
    padding = base.block_tables.shape[1] * base.page_size
    return base._UNPAGED_TYPE.from_seqlens(
        q_seqlen=q_seqlen, kv_padding=padding, kv_seqlen=base.k_seqinfo.seqlen_py,
        device=base.block_tables.device,  # (xFormers' default is CUDA whenever it exists)
    )


def logical_to_physical(base) -> torch.Tensor:
    """int64 [num_seqs * max_pages * page_size]: physical key of every padded logical key
    (0 for the padding past each sequence's length, which no query attends)."""
    bt = base.block_tables.to(torch.int64)
    ps = base.page_size
    j = torch.arange(bt.shape[1] * ps, device=bt.device)
    idx = bt[:, j // ps] * ps + j % ps
    lens = torch.tensor(base.k_seqinfo.seqlen_py, device=bt.device).unsqueeze(1)
    return torch.where(j < lens, idx, 0).reshape(-1)


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """t[:, idx], keeping stride-0 (expanded) head dims expanded."""
    shape = list(t.shape)
    base = t
    for d in range(2, t.ndim):
        if t.stride(d) == 0 and t.shape[d] > 1:
            base = base.narrow(d, 0, 1)
    out = base.index_select(1, idx.to(t.device))
    shape[1] = idx.numel()
    return out.expand(shape)


def unpage(k, v, scores, base):
    """(k, v, scores, bias) in the contiguous padded layout of the non-paged bias."""
    idx = logical_to_physical(base)
    return (
        _take(k, idx),
        _take(v, idx),
        _take(scores, idx) if scores is not None else None,
        unpaged_bias(base),
    )
