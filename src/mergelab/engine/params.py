"""Per-tensor keyword arguments of a method, from recipe-style parameters.

As in mergekit, every list is a depth gradient or a list of filter rules, wherever it is
(see :mod:`mergelab.recipe`); static parameters (scalars only) are resolved once.
"""
from __future__ import annotations

from typing import Any, Iterable, Sequence

from ..errors import MergelabError
from ..methods.registry import MethodSpec
from ..recipe import is_static, layer_index, layer_t, tensor_params


def num_layers(ckpt: Any) -> int | None:
    """The depth for layer gradients: config.json's layer count, checked against the layer
    indices the weights hold (a count that contradicts them is an error naming the config);
    without a count in the config, one more than the largest layer index."""
    label = str(getattr(ckpt, "path", None) or "model")
    cfg = getattr(ckpt, "config", None) or {}
    idx = [layer_index(n) for n in ckpt.keys()]
    idx = [i for i in idx if i is not None]
    found = max(idx) + 1 if idx else None
    if not isinstance(cfg, dict):
        raise MergelabError(f"{label}: config.json: expected a JSON object, found {type(cfg).__name__}")
    for k in ("num_hidden_layers", "n_layer", "num_layers"):
        if k in cfg:
            L = cfg[k]
            if type(L) is not int or L < 1:
                raise MergelabError(f"{label}/config.json: '{k}' is {L!r}, expected a positive integer")
            if found is not None and found > L:
                raise MergelabError(f"{label}/config.json: '{k}' is {L}, but the weights have layers up to"
                                    f" index {found - 1}; a depth gradient needs the true layer count")
            return L
    return found


def resolve_kwargs(method: MethodSpec, glob: dict, model_params: Sequence[dict], names: Iterable[str],
                   ref_ckpt: Any) -> dict[str, dict]:
    """``{name: kwargs}`` for every name in ``names`` (validated by ``method.resolve``)."""
    names = list(names)
    if is_static(glob) and all(is_static(p) for p in model_params):
        kw = method.resolve(glob, model_params, where="recipe")
        return {n: kw for n in names}
    L = num_layers(ref_ckpt)
    cache: dict[tuple, dict] = {}
    out: dict[str, dict] = {}
    for n in names:
        t = layer_t(n, L)
        g = tensor_params(glob, n, t)
        mp = [tensor_params(p, n, t) for p in model_params]
        key = (repr(sorted(g.items())), repr([sorted(x.items()) for x in mp]))
        if key not in cache:
            cache[key] = method.resolve(g, mp, where=f"recipe (tensor '{n}')")
        out[n] = cache[key]
    return out
