"""``merge_states``: the in-memory entry point, on the same plan and driver as ``merge()``."""
from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from ..errors import MergelabError
from ..io.validate import check_states
from ..methods.registry import get_method
from .driver import Driver
from .planning import plan
from .sources import StateCheckpoint

State = Mapping[str, torch.Tensor]


def _split_params(method: str, params: dict, n: int, model_params: Sequence[dict] | None) -> tuple[dict, list[dict]]:
    """Recipe keys (``lambda_`` -> ``lambda``); a list for a per-model parameter is one value per model."""
    spec = get_method(method)
    mp = [dict(p) for p in model_params] if model_params is not None else [{} for _ in range(n)]
    if len(mp) != n:
        raise MergelabError(f"merge_states: model_params has {len(mp)} entries, expected {n} (one per state)")
    glob = {}
    for k, v in params.items():
        key = k.rstrip("_") if k.rstrip("_") in spec.params else k
        ps = spec.params.get(key)
        if ps is not None and ps.per_model and isinstance(v, (list, tuple)):
            if len(v) != n:
                raise MergelabError(f"merge_states: parameter '{key}' has {len(v)} values, expected {n} (one per state)")
            for i, x in enumerate(v):
                if key in mp[i]:
                    raise MergelabError(f"merge_states: models[{i}]: '{key}' given twice")
                mp[i][key] = x
        else:
            glob[key] = list(v) if isinstance(v, tuple) else v
    return glob, mp


def merge_states(method: str, states: Sequence[State], base: State | None = None, *,
                 model_params: Sequence[dict] | None = None, stats: Mapping[str, Sequence[Any]] | None = None,
                 names: Sequence[str] | None = None, model_names: Sequence[str] | None = None,
                 seed: int = 0, dtype: str | None = None, device: str | None = None,
                 allow_nonfinite: bool = False, **params: Any) -> dict:
    """Merge in-memory state dicts with a registered method, exactly as :func:`mergelab.merge`
    would merge the same tensors from files (same plan, same driver, same seed scheme: same
    bytes).

    ``params`` are the recipe's global parameters (``lambda_=`` or ``**{"lambda": ...}``); a
    list for a per-model parameter (``weight=[0.3, 0.7]``) gives one value per state;
    ``model_params`` one dict per state (gradients and filter rules work as in a recipe).
    ``stats`` maps a statistics kind (``"fisher"``, ``"gram"``) to one ``{name: tensor}`` per
    state (a Gram dict may carry row counts as ``stats["gram_count"]``, one ``{name: count}``
    per state).  ``names`` restricts the merge to those tensors (default: all).  ``device``:
    the math device (default: the states' device); outputs come back on the states' device
    in their dtype (or ``dtype``).  Returns ``{name: tensor}``, or ``{variant: {name: tensor}}``
    for multi-output methods.  Tensors that are not floating point are copied from the
    reference (``base``, else ``states[0]``).
    """
    if not states:
        raise MergelabError("merge_states: no states to merge")
    labels = list(model_names) if model_names is not None else [f"states[{i}]" for i in range(len(states))]
    if len(labels) != len(states):
        raise MergelabError(f"merge_states: model_names has {len(labels)} entries, expected {len(states)}")
    for i, s in enumerate(list(states) + ([base] if base is not None else [])):
        if not isinstance(s, Mapping):
            where = f"states[{i}]" if i < len(states) else "base"
            raise MergelabError(f"merge_states: {where} is a {type(s).__name__}, expected a {{name: tensor}} dict")
    glob, mp = _split_params(method, dict(params), len(states), model_params)
    stats = dict(stats or {})
    counts = stats.pop("gram_count", None)
    inputs = {}
    for kind, per in stats.items():
        if len(per) != len(states):
            raise MergelabError(f"merge_states: stats['{kind}'] has {len(per)} entries, expected {len(states)}")
        for i, s in enumerate(per):
            meta = {f"count:{k}": str(v) for k, v in counts[i].items()} if kind == "gram" and counts else {}
            label = f"stats['{kind}'][{i}]"
            inputs[label] = StateCheckpoint(s, label, meta)
            mp[i][kind] = label
    recipe = {"models": [{"model": StateCheckpoint(s, lab), "parameters": p} for s, lab, p in zip(states, labels, mp)],
              "merge_method": method, "parameters": glob, "seed": seed, "allow_nonfinite": allow_nonfinite}
    if base is not None:
        recipe["base_model"] = StateCheckpoint(base, "base")
    if dtype is not None:
        recipe["dtype"] = dtype
    p = plan(recipe, inputs=inputs, names=names)
    storage = p.ref.ckpt.device
    d = Driver(p, device=device if device is not None else storage, storage=storage, seed=seed,
               allow_nonfinite=allow_nonfinite)
    prepass = d.prepass()
    out: dict[str, dict[str, torch.Tensor]] = {}
    for n in p.names:
        if n in p.merged:
            for variant, t in d.compute(n, prepass).items():
                out.setdefault(variant, {})[n] = t
    for n in p.names:  # not merged (integer buffers): from the reference
        if n not in p.merged:
            for variant in out or {"": None}:
                out.setdefault(variant, {})[n] = p.ref.ckpt.get(n).clone()
    ordered = {v: {n: s[n] for n in p.names} for v, s in out.items()}
    return ordered if p.method.multi_output else ordered.get("", {})


def fisher_merge(states: Sequence[State], fishers: Sequence[State], weights: Sequence[float] | None = None,
                 floor: float = 1e-6, normalize: bool = False, favor_target: bool = False,
                 device: str | None = None) -> dict:
    """Fisher merging of whole state dicts (``states[0]`` is the target); see ``methods/fisher.py``."""
    check_states(states, "fisher_merge", same=True)
    check_states([f for f in fishers if isinstance(f, Mapping)], "fisher_merge: fishers")
    if len(fishers) != len(states):
        raise MergelabError(f"fisher_merge: {len(states)} states but {len(fishers)} Fisher dicts")
    extra = {"weight": list(weights)} if weights is not None else {}
    return merge_states("fisher", states, stats={"fisher": fishers}, floor=floor, normalize=normalize,
                        favor_target=favor_target, device=device, **extra)


def regmean_merge(states: Sequence[State], grams: Sequence[State], alpha: float = 0.9,
                  counts: Sequence[Mapping[str, float]] | None = None, normalize_gram: bool = False,
                  device: str | None = None) -> dict:
    """RegMean of whole state dicts; see ``methods/regmean.py``."""
    check_states(states, "regmean_merge", same=True)
    check_states([g for g in grams if isinstance(g, Mapping)], "regmean_merge: grams")
    if len(grams) != len(states):
        raise MergelabError(f"regmean_merge: {len(states)} states but {len(grams)} Gram dicts")
    stats: dict = {"gram": grams}
    if counts is not None:
        stats["gram_count"] = counts
    return merge_states("regmean", states, stats=stats, alpha=alpha, normalize_gram=normalize_gram, device=device)
