"""The ``attn_implementation="sparsek"`` attention function for transformers 5.x.

transformers calls ``fn(module, query, key, value, attention_mask, scaling=, dropout=, **kw)``
with ``(B, H, S, D)`` tensors (K/V not expanded for GQA) and wants ``(B, S, H, D)`` back.  We
run ``xformers.ops.memory_efficient_attention(..., op=SparseKOp)`` in the BMGHK layout
``[B, S, Hkv, R, D]`` with K/V (and the scores) expanded with stride 0 over the ``R`` query
heads of a group, so a GQA group shares one selection and nothing is copied.

Masks.  ``register()`` also registers transformers' ``sdpa_mask`` under our name, so the
function receives either ``None`` (no padding: plain causal attention) or a boolean
``[B, 1, Q, KV]`` mask.  A boolean mask is turned back into per-sequence lengths: the valid
keys of each row must be one contiguous block (left padding in batched generation, right
padding in training) and the valid queries the last ones of that block.  The valid tokens are
packed into one varlen sequence and run with a block-diagonal xFormers mask
(``BlockDiagonalCausalFromBottomRightMask``, its local-attention form for sliding-window
layers, ``BlockDiagonalMask`` for non-causal layers).  The mask we imply is compared with the
one transformers built; a pattern that is not of this form (e.g. packed sequences with
``position_ids`` resets) raises ``NotImplementedError`` instead of computing something else.
Outputs at padded query positions are zero.
"""

from typing import Optional, Tuple

import torch
import xformers.ops as xops
from xformers.ops.fmha import attn_bias as xab

from ..mask import SparseKMask
from ..ops import SparseKOp

NAME = "sparsek"
SCORER_ATTR = "sparsek_scorer"
# Set on the key tensor that a SparseKHFCache returns from update(): (cache, layer_idx).
CACHE_TAG = "_sparsek_cache"


def _sliding_window(module, kwargs) -> Optional[int]:
    sw = kwargs.get("sliding_window", None)
    if sw is None:
        sw = getattr(module, "sliding_window", None)
    return int(sw) if sw else None


def _base_dense(causal: bool, sliding_window: Optional[int]):
    if not causal:
        return None
    if sliding_window:
        return xab.LowerTriangularFromBottomRightLocalAttentionMask(sliding_window)
    return xab.LowerTriangularFromBottomRightMask()


def _base_varlen(causal: bool, sliding_window: Optional[int], q_lens, k_lens, device):
    # (device: xFormers puts the bias on CUDA by default whenever CUDA exists, which its input
    # check then rejects for a model on the CPU)
    if not causal:
        return xab.BlockDiagonalMask.from_seqlens(q_seqlen=q_lens, kv_seqlen=k_lens, device=device)
    base = xab.BlockDiagonalCausalFromBottomRightMask.from_seqlens(
        q_seqlen=q_lens, kv_seqlen=k_lens, device=device)
    if sliding_window:
        base = base.make_local_attention_from_bottomright(sliding_window)
    return base


class _Packing:
    """Which queries/keys of a padded batch are real, as one varlen sequence."""

    def __init__(self, q_idx, k_idx, q_lens, k_lens, k_start=None):
        self.q_idx, self.k_idx, self.q_lens, self.k_lens = q_idx, k_idx, q_lens, k_lens
        self.k_start = k_start  # [B] index of each row's first real key (all rows)


# transformers passes the same mask tensor to every layer of a kind in one forward: analyse it
# once (one entry: the last mask seen, with the arguments it was analysed for).
_MEMO = {"key": None, "mask": None, "result": None}


def _analyse_mask(mask: torch.Tensor, causal: bool, sliding_window: Optional[int]):
    """Boolean ``[B, 1|H, Q, KV]`` mask -> None (no padding) or a ``_Packing``."""
    key = (causal, sliding_window, mask._version, tuple(mask.shape))
    if _MEMO["mask"] is mask and _MEMO["key"] == key:
        return _MEMO["result"]
    result = _analyse_mask_uncached(mask, causal, sliding_window)
    _MEMO.update(key=key, mask=mask, result=result)
    return result


def _analyse_mask_uncached(mask: torch.Tensor, causal: bool, sliding_window: Optional[int]):
    if mask.dtype != torch.bool:
        mask = mask == 0  # additive float mask: 0 = attend
    if mask.dim() != 4:
        raise NotImplementedError(f"sparsek attention: expected a 4-D attention mask, got {mask.dim()}-D")
    m = mask[:, 0]
    B, Q, KV = m.shape
    dev = m.device
    # Key j is a real token iff some query may attend it (causal: at least the query at
    # its own position, or the first real query if j precedes every query).
    key_valid = m.any(dim=1)
    k_cnt = key_valid.sum(1)
    k_start = torch.where(k_cnt > 0, key_valid.int().argmax(1), torch.zeros_like(k_cnt))
    j = torch.arange(KV, device=dev)
    contiguous = (key_valid == ((j >= k_start[:, None]) & (j < (k_start + k_cnt)[:, None])))
    if not bool(contiguous.all()):
        raise NotImplementedError(
            "sparsek attention: the attention mask's real keys are not one contiguous block "
            "per sequence (only left/right padding is supported)"
        )
    k_end = k_start + k_cnt
    i = torch.arange(Q, device=dev)
    if causal:
        qpos = i + (KV - Q)  # bottom-right: query i sits at key position KV - Q + i
        q_valid = (qpos[None, :] >= k_start[:, None]) & (qpos[None, :] < k_end[:, None])
        q_cnt = q_valid.sum(1)
        # the real queries must be the last ones of the real key block
        if not bool(((~q_valid) | (qpos[None, :] >= (k_end - q_cnt)[:, None])).all()):
            raise NotImplementedError("sparsek attention: real queries are not bottom-right aligned")
        expect = (j[None, None, :] >= k_start[:, None, None]) & (j[None, None, :] <= qpos[None, :, None])
        if sliding_window:
            expect &= qpos[None, :, None] - j[None, None, :] < sliding_window
    else:
        q_valid = torch.ones(B, Q, dtype=torch.bool, device=dev)
        q_cnt = q_valid.sum(1)
        expect = key_valid[:, None, :].expand(B, Q, KV)
    expect = expect & key_valid[:, None, :]
    rows = q_valid[:, :, None].expand(B, Q, KV)
    if not bool((expect == m)[rows].all()):
        raise NotImplementedError(
            "sparsek attention: the attention mask is not causal/bidirectional attention with "
            "left or right padding (e.g. packed sequences); use attn_implementation='sdpa' "
            "for it"
        )
    if bool((k_cnt == KV).all()) and bool((q_cnt == Q).all()):
        return None
    keep = q_cnt > 0  # sequences with no real query produce nothing
    q_idx = (torch.arange(B, device=dev)[:, None] * Q + i[None, :])[q_valid & keep[:, None]]
    k_idx = (torch.arange(B, device=dev)[:, None] * KV + j[None, :])[key_valid & keep[:, None]]
    return _Packing(q_idx, k_idx, q_cnt[keep].tolist(), k_cnt[keep].tolist(), k_start)


def sequence_positions(kv: int, packing: Optional[_Packing], device) -> torch.Tensor:
    """Each key's position in its own sequence: ``[KV]`` (no padding) or ``[B, KV]`` (key index
    minus the row's first real key index; negative on left padding, which is never attended)."""
    j = torch.arange(kv, device=device)
    if packing is None or packing.k_start is None:
        return j
    return j[None, :] - packing.k_start.to(device)[:, None]


def sparsek_scores(module, value: torch.Tensor, positions: Optional[torch.Tensor] = None,
                   sinks: bool = True):
    """Scores ``[B, KV, Hkv]`` of the layer's scorer for value states ``[B, Hkv, KV, Dv]``
    (None where the layer has no scorer or runs in exact mode).  ``positions``: per-sequence
    key positions (default ``arange(KV)``: no padding)."""
    scorer = getattr(module, SCORER_ATTR, None)
    if scorer is None or scorer.topk is None:
        return None
    if positions is None:
        positions = torch.arange(value.shape[2], device=value.device)
    return scorer(value, positions, sinks=sinks)


def sparsek_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: Optional[torch.Tensor],
    scaling: Optional[float] = None,
    dropout: float = 0.0,
    **kwargs,
) -> Tuple[torch.Tensor, None]:
    """transformers attention interface: ``(B, H, S, D)`` in, ``((B, S, H, Dv), None)`` out."""
    if dropout and module.training:
        raise NotImplementedError("sparsek attention: attention dropout is not supported (set attention_dropout=0)")
    tag = getattr(key, CACHE_TAG, None)
    if tag is not None:
        cache, layer_idx = tag
        return cache._attend(module, layer_idx, query, key, value, attention_mask, scaling), None

    B, H, Q, D = query.shape
    Hkv, KV, Dv = key.shape[1], key.shape[2], value.shape[-1]
    if H % Hkv:
        raise ValueError(f"sparsek attention: {H} query heads are not a multiple of {Hkv} KV heads")
    R = H // Hkv
    causal = bool(getattr(module, "is_causal", True))
    if kwargs.get("is_causal") is not None:
        causal = bool(kwargs["is_causal"])
    sw = _sliding_window(module, kwargs) if causal else None
    scorer = getattr(module, SCORER_ATTR, None)
    topk = scorer.topk if scorer is not None else None
    window = scorer.window if (scorer is not None and causal) else 0

    packing = _analyse_mask(attention_mask, causal, sw) if attention_mask is not None else None
    # Sinks (the first real tokens of each sequence) need per-sequence positions.  Not on
    # sliding-window layers: a sliding-window cache drops the first keys, so the key tensor
    # does not tell where its sequence starts (see docs/huggingface.md).
    positions = sequence_positions(KV, packing, key.device)
    scores = sparsek_scores(module, value, positions, sinks=not sw)  # [B, KV, Hkv] or None
    q = query.transpose(1, 2).unflatten(2, (Hkv, R))  # [B, Q, Hkv, R, D]
    k = key.transpose(1, 2)  # [B, KV, Hkv, D]
    v = value.transpose(1, 2)
    if packing is None:
        base = _base_dense(causal, sw)
    elif packing.q_idx.numel() == 0:  # every row is padding
        return query.new_zeros(B, Q, H, Dv), None
    else:
        q = q.reshape(B * Q, Hkv, R, D)[packing.q_idx].unsqueeze(0)
        k = k.reshape(B * KV, Hkv, D)[packing.k_idx].unsqueeze(0)
        v = v.reshape(B * KV, Hkv, Dv)[packing.k_idx].unsqueeze(0)
        if scores is not None:
            scores = scores.reshape(B * KV, Hkv)[packing.k_idx].unsqueeze(0)
        base = _base_varlen(causal, sw, packing.q_lens, packing.k_lens, q.device)
    nb, nk = k.shape[0], k.shape[1]
    k = k.unsqueeze(3).expand(nb, nk, Hkv, R, D)
    v = v.unsqueeze(3).expand(nb, nk, Hkv, R, Dv)
    if scores is not None:
        bias = SparseKMask(scores.unsqueeze(3).expand(nb, nk, Hkv, R), topk, window, base)
    else:
        bias = base
    out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=scaling, op=SparseKOp)
    if packing is not None:
        flat = out.new_zeros(B * Q, Hkv, R, Dv)
        out = flat.index_copy(0, packing.q_idx, out[0]).view(B, Q, Hkv, R, Dv)
    return out.reshape(B, Q, H, Dv), None
