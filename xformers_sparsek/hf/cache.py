"""``SparseKHFCache``: a transformers ``Cache`` backed by ``SparseKCache`` (constant memory).

Each layer keeps a :class:`xformers_sparsek.cache.SparseKCache`: the ``window`` most recent
keys, the ``topk`` keys selected by the last query and the scores the threshold still needs,
so the memory per layer is fixed however long the context grows, and decoding stays exact
(it equals SparseK attention over the full context).

How it plugs into transformers: the attention module calls ``cache.update(k, v, layer_idx)``
and then the attention function with what ``update`` returned.  A constant-memory cache
cannot return the full K/V, so ``update`` only records the new tokens and returns them with a
tag; ``sparsek_attention_forward`` sees the tag and hands the step to the layer's
``SparseKCache.update_and_attend`` (with the scores of the new tokens from the layer's
scorer).  So this cache works with ``attn_implementation="sparsek"`` and layers that have a
scorer with ``topk`` set (``add_scorers``).

Padding (left-padded batched generation): the padding tokens are passed to
``SparseKCache.update_and_attend`` as ``valid=False`` (never stored; each sequence keeps its
own length).

Limits: no beam search / cropping (evicted keys are gone), no sliding-window layers beyond
their window, no gradients (``update_and_attend`` runs under ``no_grad``).
"""

from typing import Optional

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..cache import SparseKCache
from .attention import CACHE_TAG, SCORER_ATTR, _analyse_mask, _sliding_window


class SparseKCacheLayer(CacheLayerMixin):
    """One layer of :class:`SparseKHFCache` (created lazily, sized on the first step)."""

    is_sliding = False
    is_compileable = False
    supports_early_init = False

    def __init__(self, capacity: Optional[int] = None, layer_idx: Optional[int] = None):
        super().__init__()
        self.capacity = capacity
        self.layer_idx = layer_idx
        self.sparse: Optional[SparseKCache] = None
        self.cumulative_length = 0
        self._pending = False  # update() ran, the attention function has not consumed it yet

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if self._pending:
            raise RuntimeError(
                "SparseKHFCache: the previous step's keys were never attended through the cache; "
                "the model must run with attn_implementation='sparsek' (xformers_sparsek.hf.add_scorers) "
                "and pass the keys returned by cache.update() to the attention function"
            )
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self._pending = True
        self.cumulative_length += key_states.shape[-2]
        k, v = key_states.view_as(key_states), value_states.view_as(value_states)
        setattr(k, CACHE_TAG, (self, self.layer_idx))
        return k, v

    def get_mask_sizes(self, query_length: int):
        return self.cumulative_length + query_length, 0

    def get_seq_length(self) -> int:
        return self.cumulative_length

    def get_max_length(self) -> int:
        return -1

    def offload(self):
        pass

    def prefetch(self):
        pass

    def reset(self) -> None:
        self.sparse = None  # re-created (and re-sized) on the next step
        self.cumulative_length = 0
        self._pending = False

    def kv_bytes(self) -> int:
        return sum(c.kv_bytes() for c in self._caches())

    def reorder_cache(self, beam_idx):
        raise NotImplementedError("SparseKHFCache: beam search is not supported (evicted keys are gone)")

    def crop(self, tokens_to_remove: int):
        raise NotImplementedError("SparseKHFCache: crop is not supported (evicted keys are gone)")

    def batch_repeat_interleave(self, repeats: int):
        if repeats != 1:
            raise NotImplementedError("SparseKHFCache: batch_repeat_interleave is not supported")

    def batch_select_indices(self, indices):
        raise NotImplementedError("SparseKHFCache: batch_select_indices is not supported")

    # called by sparsek_attention_forward
    def _attend(self, module, layer_idx, query, key, value, attention_mask, scaling):
        self._pending = False
        scorer = getattr(module, SCORER_ATTR, None)
        if scorer is None or scorer.topk is None:
            raise NotImplementedError(
                f"SparseKHFCache: layer {layer_idx} has no SparseK scorer with topk set; call "
                "xformers_sparsek.hf.add_scorers(model, topk=..., window=...) or use a DynamicCache"
            )
        B, H, M, D = query.shape
        Hkv, Dv = key.shape[1], value.shape[-1]
        R = H // Hkv
        sw = _sliding_window(module, {})
        if sw is not None and self.cumulative_length > sw:
            raise NotImplementedError(
                f"SparseKHFCache: layer {layer_idx} is a sliding-window layer (window {sw}) and the "
                f"context ({self.cumulative_length}) exceeds it; use a DynamicCache"
            )
        packing = _analyse_mask(attention_mask, True, sw) if attention_mask is not None else None
        if self.sparse is None:
            self.sparse = SparseKCache(
                B, Hkv, D, scorer.topk, scorer.window, value_dim=Dv,
                capacity=self.capacity, dtype=key.dtype, device=key.device,
            )
        valid = None
        if packing is not None:
            # the real new tokens: bottom-right aligned queries whose own key is real
            valid = torch.zeros(B * M, dtype=torch.bool, device=query.device)
            valid[packing.q_idx] = True
            valid = valid.view(B, M)
        # Positions in each sequence (sinks are its first real tokens): the tokens of that
        # sequence already in the cache plus the running index among its valid new tokens
        # (padding gets a position too, but is never stored).
        seen = self.sparse.lens.to(key.device)[:, None]  # [B, 1], before this step
        if valid is None:
            positions = seen + torch.arange(M, device=key.device)[None, :]
        else:
            positions = seen + valid.long().cumsum(1) - 1
        with torch.no_grad():
            scores = scorer(value, positions, sinks=not sw)  # [B, M, Hkv]
        q = query.transpose(1, 2).unflatten(2, (Hkv, R))  # [B, M, Hkv, R, D]
        out = self.sparse.update_and_attend(
            q, key.transpose(1, 2), value.transpose(1, 2), scores, scale=scaling, valid=valid
        )
        return out.reshape(B, M, H, Dv)

    def _caches(self):
        return [] if self.sparse is None else [self.sparse]


class SparseKHFCache(Cache):
    """transformers ``Cache`` with a constant-memory :class:`SparseKCache` per layer.

    Args:
        config: the model config (optional; sizes the layer list up front).
        capacity: ``SparseKCache`` capacity of the fractional-score list (default ``4*topk``).

    ``model.generate(ids, past_key_values=SparseKHFCache(model.config))`` after
    ``add_scorers(model, topk, window)``.  ``kv_bytes()`` is the memory held, constant once
    the layers are created (after the first step).
    """

    def __init__(self, config=None, capacity: Optional[int] = None):
        self.capacity = capacity
        if config is not None:
            cfg = config.get_text_config() if hasattr(config, "get_text_config") else config
            layers = [SparseKCacheLayer(capacity, i) for i in range(cfg.num_hidden_layers)]
            super().__init__(layers=layers)
        else:
            super().__init__(layer_class_to_replicate=self._new_layer)

    def _new_layer(self):
        return SparseKCacheLayer(self.capacity, len(self.layers))

    def kv_bytes(self) -> int:
        """Bytes of K/V, scores and positions held by all layers."""
        return sum(layer.kv_bytes() for layer in self.layers)

    def overflow_count(self) -> int:
        """Fractional keys dropped because a layer's capacity was full (0 = exact)."""
        return sum(c.overflow_count for layer in self.layers for c in layer._caches())
