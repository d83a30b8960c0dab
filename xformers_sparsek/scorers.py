"""Training-free key scorers for :func:`xformers_sparsek.sparsify`.

A scorer is any callable ``scorer(query, key, value, attn_bias) -> scores`` returning one
finite score per key and KV head, shaped ``key.shape[:-1]`` (float32 recommended), or
``None`` to leave that call as exact attention.  It sees the tensors as the model passed
them to ``memory_efficient_attention`` (BMK inputs arrive as BMHK with one head).  Scores
that require grad receive gradients (the call is routed through ``sparsek_attention``);
the default scorer returns detached scores.

Default: :class:`MeanQueryScorer` -- the expected logit of key ``j`` under the running mean
of the queries up to ``j``::

    u_j = sharpness * K**-0.5 * < mean_{i <= j, same sequence} q_i , k_j >

averaged over the query heads of a GQA group (BMGHK with K/V expanded over H), plus a
bonus on the first ``sinks`` keys of every sequence (attention sinks).

Why this one: SparseK's score is query-independent, and a key's expected logit under "the
queries so far" is the cheapest such proxy for how much attention it gets.  It is causal-safe:
``u_j`` depends only on tokens ``<= j`` of ``j``'s own sequence (the running sums restart at
every block-diagonal boundary), so a key's score never changes when later tokens are
appended -- prefill, training and incremental decoding see the same selection.
``sharpness`` makes the capped-simplex gates close to hard top-k (gates are 1 except for
keys within ``1/sharpness`` of the selection threshold): a model that was never trained with
gates should see its selected keys unscaled.  The scale of the call is not used (it only
multiplies the scores, which ``sharpness`` already sets).
"""

from typing import Optional

import torch

from ._layout import is_causal, segments_of


class MeanQueryScorer:
    """Causal-safe running-mean-query scorer (see the module docstring).

    Args:
        sharpness: multiplier on the expected logits (larger = harder top-k gates).
        sinks: number of leading keys of every sequence that get ``sink_bonus``.
        sink_bonus: added to the (sharpened) scores of the sink keys.

    Causal bases need every sequence's queries to cover its keys one to one (self-attention
    prefill or training: ``q_len == k_len`` per sequence); otherwise (decoding against a KV
    cache) a key's running query mean is unknown and the scorer returns ``None`` (the call
    stays exact).  Non-causal bases (None, ``BlockDiagonalMask``) use the mean of all the
    sequence's queries.
    """

    def __init__(self, sharpness: float = 100.0, sinks: int = 4, sink_bonus: float = 1e4):
        self.sharpness = float(sharpness)
        self.sinks = int(sinks)
        self.sink_bonus = float(sink_bonus)

    def __repr__(self) -> str:
        return (
            f"MeanQueryScorer(sharpness={self.sharpness}, sinks={self.sinks}, "
            f"sink_bonus={self.sink_bonus})"
        )

    @torch.no_grad()
    def __call__(self, query, key, value, attn_bias) -> Optional[torch.Tensor]:
        if query.ndim not in (4, 5):
            raise ValueError(
                f"MeanQueryScorer: query must be BMHK or BMGHK, got shape {tuple(query.shape)}"
            )
        q, k = query.detach(), key.detach()
        if q.ndim == 4:  # BMHK -> BMGHK with H = 1
            q, k = q.unsqueeze(3), k.unsqueeze(3)
        B, Mq, G, H, D = q.shape
        Mk = k.shape[1]
        shared = H == 1 or k.stride(3) == 0
        causal = attn_bias is not None and is_causal(attn_bias)
        segs = segments_of(attn_bias, B, Mq, Mk)
        if causal and any(s.q_len != s.k_len for s in segs):
            return None
        dev = q.device
        # Exclusive prefix sums of the queries over the flattened [B*Mq] axis (float64:
        # long sequences), heads averaged over the GQA group where keys are shared.
        qf = q.reshape(B * Mq, G, H, D).to(torch.float64)
        if shared:
            qf = qf.mean(2, keepdim=True)
        cs = torch.cat([qf.new_zeros((1,) + qf.shape[1:]), qf.cumsum(0)])
        # Per key: the query range whose mean it uses, and its offset in its sequence.
        key_idx, lo, hi, off = [], [], [], []
        for s in segs:
            n = s.k_len
            t = torch.arange(n)
            key_idx.append(s.k_start + t)
            off.append(t)
            lo.append(torch.full((n,), s.q_start))
            hi.append(s.q_start + t + 1 if causal else torch.full((n,), s.q_start + s.q_len))
        key_idx, lo, hi, off = (torch.cat(x).to(dev) for x in (key_idx, lo, hi, off))
        cnt = (hi - lo).clamp(min=1).to(torch.float64).view(-1, 1, 1, 1)
        qbar = (cs[hi] - cs[lo]) / cnt  # [nkeys, G, H or 1, D]
        kf = k.reshape(B * Mk, G, H, D)[key_idx]
        if shared:
            kf = kf[:, :, :1]
        u = (qbar * kf.to(torch.float64)).sum(-1) * (self.sharpness * D**-0.5)
        u = u + torch.where(off < self.sinks, self.sink_bonus, 0.0).view(-1, 1, 1).to(u)
        out = torch.zeros(B * Mk, G, u.shape[-1], dtype=torch.float32, device=dev)
        out[key_idx] = u.to(torch.float32)
        out = out.reshape(B, Mk, G, -1).expand(B, Mk, G, H)
        return out[:, :, :, 0] if query.ndim == 4 else out


mean_query_scorer = MeanQueryScorer()
"""The default scorer instance (``MeanQueryScorer()`` with its default parameters)."""
