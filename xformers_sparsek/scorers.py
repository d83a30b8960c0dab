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

    CHUNK = 4096  # queries per step of the prefix sums (bounds the float64 temporaries)

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
        Hs = 1 if shared else H
        qf = q.reshape(B * Mq, G, H, D)
        kf = k.reshape(B * Mk, G, H, D)[:, :, :Hs]
        factor = self.sharpness * D**-0.5
        u = torch.zeros(B * Mk, G, Hs, dtype=torch.float64, device=dev)

        def chunk_mean(a, b):  # queries [a, b) in float64, averaged over the GQA group
            x = qf[a:b].to(torch.float64)
            return x.mean(2, keepdim=True) if shared else x

        # Per query: its sequence, its offset in it, and the key at its position.
        seg_of_q = torch.repeat_interleave(
            torch.arange(len(segs)), torch.tensor([g.q_len for g in segs])
        ).to(dev)
        q_start = torch.tensor([g.q_start for g in segs], device=dev)
        k_start = torch.tensor([g.k_start for g in segs], device=dev)
        NQ = seg_of_q.numel()
        # Chunked prefix sums (float64, bounded memory): a sequence's running sum is the
        # global prefix minus the prefix at its first query.
        carry = torch.zeros(G, Hs, D, dtype=torch.float64, device=dev)
        base = torch.zeros(len(segs), G, Hs, D, dtype=torch.float64, device=dev)
        for a in range(0, NQ, self.CHUNK):
            b = min(NQ, a + self.CHUNK)
            x = chunk_mean(a, b)
            inc = carry + x.cumsum(0)
            carry = inc[-1]
            seg = seg_of_q[a:b]
            first = torch.nonzero((q_start >= a) & (q_start < b)).flatten()
            base[first] = (inc - x)[q_start[first] - a]
            off = torch.arange(a, b, device=dev) - q_start[seg]
            if causal:  # query at offset t <-> key at offset t (q_len == k_len)
                u[k_start[seg] + off] = (
                    ((inc - base[seg]) * kf[k_start[seg] + off]).sum(-1)
                    / (off + 1).view(-1, 1, 1)
                )
        base[q_start >= NQ] = carry  # empty trailing sequences
        if not causal:  # every key of a sequence sees the mean of all its queries
            n = torch.tensor([max(g.q_len, 1) for g in segs], device=dev).view(-1, 1, 1, 1)
            qbar = (torch.cat([base[1:], carry[None]]) - base) / n if segs else base
            for g, s_qbar in zip(segs, qbar):
                kk = kf[g.k_start:g.k_start + g.k_len].to(torch.float64)
                u[g.k_start:g.k_start + g.k_len] = (kk * s_qbar).sum(-1)
        u = u * factor
        # attention sinks: the first keys of every sequence
        for g in segs:
            u[g.k_start:g.k_start + min(self.sinks, g.k_len)] += self.sink_bonus
        out = u.to(torch.float32).reshape(B, Mk, G, Hs).expand(B, Mk, G, H)
        return out[:, :, :, 0] if query.ndim == 4 else out


mean_query_scorer = MeanQueryScorer()
"""The default scorer instance (``MeanQueryScorer()`` with its default parameters)."""
