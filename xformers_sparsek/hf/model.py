"""Attach SparseK scorers to a transformers model; save/load them with the model."""

import json
import os
import warnings
from typing import Iterable, List, Optional

from torch import nn

from ..mask import check_int
from .attention import NAME, SCORER_ATTR
from .scorer import SparseKScorer

CONFIG_KEY = "sparsek"


def _value_proj_and_head_dim(m: nn.Module):
    vp = getattr(m, "v_proj", None)
    if vp is None:
        vp = getattr(m, "value", None)  # BERT-style naming
    hd = getattr(m, "head_dim", None) or getattr(m, "attention_head_size", None)
    if isinstance(vp, nn.Linear) and isinstance(hd, int) and hd > 0 and vp.out_features % hd == 0:
        return vp, hd
    return None


def attention_modules(model: nn.Module) -> List[nn.Module]:
    """The self-attention modules of a transformers model, in model order: modules with a
    value projection (``v_proj`` or ``value``) and a head size (``head_dim`` or
    ``attention_head_size``); cross-attention modules are skipped."""
    return [
        m for m in model.modules()
        if _value_proj_and_head_dim(m) is not None and not getattr(m, "is_cross_attention", False)
    ]


def _set_attn_implementation(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:  # pragma: no cover - older transformers
        model.config._attn_implementation = name


def add_scorers(
    model: nn.Module,
    topk: Optional[int],
    window: int = 0,
    *,
    init_slope: float = 0.5,
    sinks: int = 4,
    sink_bonus: float = 1e6,
    layers: Optional[Iterable[int]] = None,
    set_attn_implementation: bool = True,
) -> nn.Module:
    """Give every attention layer (or those in ``layers``) a fresh ``SparseKScorer`` and
    switch the model to ``attn_implementation="sparsek"``.

    ``topk=None`` keeps exact attention (the scorers exist but are unused).  The settings are
    written to ``model.config.sparsek`` so ``save_pretrained`` / :func:`from_pretrained`
    round-trip them; scorer weights are ordinary parameters (``...self_attn.sparsek_scorer.*``)
    in the safetensors checkpoint.  Layers that already have a scorer keep its weights (only
    topk/window/sinks/sink_bonus are updated).  ``sinks``: the first ``sinks`` real tokens of
    each sequence are always selected with gate 1 (attention sinks; constant bonus
    ``sink_bonus``, not learned; not applied on sliding-window layers).  Returns the model.
    """
    from . import register

    register()
    check_int("topk", topk, 1, "add_scorers: ", or_none=True)
    check_int("window", window, 0, "add_scorers: ")
    check_int("sinks", sinks, 0, "add_scorers: ")
    mods = attention_modules(model)
    if not mods:
        raise ValueError("add_scorers: no attention modules (with v_proj/value and head_dim) found")
    wanted = None if layers is None else {int(i) for i in layers}
    for i, m in enumerate(mods):
        if wanted is not None and getattr(m, "layer_idx", i) not in wanted:
            continue
        old = getattr(m, SCORER_ATTR, None)
        if old is not None:
            old.topk, old.window = topk, window
            old.sinks, old.sink_bonus = sinks, float(sink_bonus)
            continue
        vp, hd = _value_proj_and_head_dim(m)
        scorer = SparseKScorer(vp.out_features // hd, hd, topk, window, init_slope,
                               sinks=sinks, sink_bonus=sink_bonus)
        setattr(m, SCORER_ATTR, scorer.to(device=vp.weight.device))
    model.config.sparsek = {
        "topk": topk,
        "window": window,
        "init_slope": init_slope,
        "sinks": sinks,
        "sink_bonus": float(sink_bonus),
        "layers": None if wanted is None else sorted(wanted),
    }
    if set_attn_implementation:
        _set_attn_implementation(model, NAME)
    return model


def remove_scorers(model: nn.Module) -> nn.Module:
    """Drop all scorers and ``config.sparsek`` (the attention stays ``sparsek``, exact mode)."""
    for m in attention_modules(model):
        if hasattr(m, SCORER_ATTR):
            delattr(m, SCORER_ATTR)
    if hasattr(model.config, CONFIG_KEY):
        delattr(model.config, CONFIG_KEY)
    return model


def scorer_parameters(model: nn.Module) -> List[nn.Parameter]:
    """All scorer parameters (for an optimizer that trains only the scorers)."""
    return [p for n, p in model.named_parameters() if f".{SCORER_ATTR}." in f".{n}"]


def _checkpoint_files(path: str) -> List[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            return sorted({os.path.join(path, v) for v in json.load(f)["weight_map"].values()})
    single = os.path.join(path, "model.safetensors")
    return [single] if os.path.isfile(single) else []


def load_scorer_weights(model: nn.Module, path: str) -> int:
    """Load ``*.sparsek_scorer.*`` tensors into ``model`` from the safetensors checkpoint in
    directory ``path``, or from the safetensors file ``path`` (e.g. one holding only the scorer
    parameters); returns how many tensors were loaded."""
    from safetensors import safe_open

    own = {n: t for n, t in model.state_dict().items() if f".{SCORER_ATTR}." in f".{n}"}
    loaded = {}
    for file in [path] if os.path.isfile(path) else _checkpoint_files(path):
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if f".{SCORER_ATTR}." not in f".{name}":
                    continue
                target = name if name in own else next((n for n in own if n.endswith(name) or name.endswith(n)), None)
                if target is not None:
                    loaded[target] = f.get_tensor(name)
    missing = sorted(set(own) - set(loaded))
    if loaded and missing:
        warnings.warn(f"sparsek: {len(missing)} scorer tensors not in the checkpoint keep fresh values, e.g. {missing[0]}")
    if loaded:
        model.load_state_dict(loaded, strict=False)
    return len(loaded)


def from_pretrained(
    path: str,
    *args,
    topk: Optional[int] = None,
    window: Optional[int] = None,
    sinks: Optional[int] = None,
    model_class=None,
    **kwargs,
):
    """``AutoModelForCausalLM.from_pretrained`` (or ``model_class``) with SparseK attention.

    A checkpoint saved after :func:`add_scorers` gets its scorers back (settings from
    ``config.sparsek``, weights from the safetensors files); a plain checkpoint gets fresh
    scorers if ``topk`` is given, else runs exact attention.  ``topk`` / ``window`` / ``sinks``
    override the saved settings.  A saved ``config.sparsek`` without ``sinks`` (saved before
    sinks existed) loads with ``sinks=0``, reproducing the saved model; fresh scorers on a plain
    checkpoint get ``sinks=4`` (the ``add_scorers`` default).
    """
    from . import register

    register()
    if model_class is None:
        from transformers import AutoModelForCausalLM as model_class
    kwargs.setdefault("attn_implementation", NAME)
    import logging as _logging

    from transformers.utils import logging as hf_logging

    # the scorer tensors are "unexpected" to the plain model class; we load them below
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity(_logging.ERROR)
    try:
        model = model_class.from_pretrained(path, *args, **kwargs)
    finally:
        hf_logging.set_verbosity(level)
    saved = getattr(model.config, CONFIG_KEY, None)
    settings = dict(saved) if isinstance(saved, dict) else {}
    if topk is not None:
        settings["topk"] = topk
    if window is not None:
        settings["window"] = window
    if sinks is not None:
        settings["sinks"] = sinks
    if not settings or ("topk" not in settings):
        return model
    add_scorers(
        model,
        settings.get("topk"),
        settings.get("window", 0) or 0,
        init_slope=settings.get("init_slope", 0.5),
        sinks=settings.get("sinks", 0 if isinstance(saved, dict) else 4),
        sink_bonus=settings.get("sink_bonus", 1e6),
        layers=settings.get("layers"),
    )
    if saved and os.path.isdir(str(path)):
        load_scorer_weights(model, str(path))
    return model
