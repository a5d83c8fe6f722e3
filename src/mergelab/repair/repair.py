"""REPAIR (Jordan et al., ICLR 2023) for N merged models.

Targets per site and channel, with merge weights ``w`` normalised to sum to 1:

    μ* = Σ_i w_i μ_i          σ* = Σ_i w_i σ_i   (an average of standard deviations)

The reference tact-merge code combines variances with ``reduce(lambda x, y: sqrt(x) +
sqrt(y), vars)``, which takes the square root of the running sum again at every step (8 equal
variances of 4 give a target of 0.25); :func:`repair_target` takes each √var first.
"""
from __future__ import annotations

import copy
from typing import Any, Iterable, Literal, Sequence

import torch
from torch import Tensor, nn

from ..device import module_device, placed, resolve_device
from ..errors import MergelabError
from ..stats.activations import _moments_pass
from ..stats.sites import Site, find_head, probe_batch, resolve_sites
from .correct import apply_hooks, estimate_corrections
from .fold import can_fold, fold_correction


def _weights(weights: Sequence[float] | None, n: int) -> list[float]:
    if weights is None:
        return [1.0 / n] * n
    w = [float(x) for x in weights]
    if len(w) != n:
        raise MergelabError(f"repair weights: has {len(w)} values, expected {n} (one per model)")
    if any(x < 0 for x in w) or sum(w) <= 0:
        raise MergelabError(f"repair weights: expected non-negative numbers with a positive sum, found {w}")
    total = sum(w)
    return [x / total for x in w]


def repair_target(means: Sequence[Tensor], stds: Sequence[Tensor],
                  weights: Sequence[float] | None = None) -> tuple[Tensor, Tensor]:
    """``(Σ w_i μ_i, Σ w_i σ_i)`` with ``w`` normalised to sum to 1 (default 1/N)."""
    if not means or len(means) != len(stds):
        raise MergelabError(f"repair target: expected as many means as stds (>= 1), found "
                            f"{len(means)} and {len(stds)}")
    w = _weights(weights, len(means))
    mean = sum(wi * m.double() for wi, m in zip(w, means))
    std = sum(wi * s.double() for wi, s in zip(w, stds))
    return mean, std


def repair(merged_model: nn.Module, experts: Sequence[nn.Module], data: Iterable[Any],
           weights: Sequence[float] | None = None, *, sites: Sequence[str | Site] | None = None,
           head: str | None = "auto", n_batches: int | None = None,
           mode: Literal["joint", "sequential"] = "joint", eps: float = 1e-5, fold: bool = True,
           shard: bool = True, progress: bool = True,
           device: str | torch.device | None = None) -> nn.Module:
    """A repaired copy of ``merged_model`` (the input is not modified).

    Measures each expert's per-channel statistics at the sites on ``data``, forms the N-model
    targets (:func:`repair_target`), re-estimates the merged model's statistics site by site
    (``mode``, see :mod:`mergelab.repair.correct`) and folds each correction into the layer
    that directly produces (or consumes) the site.  A site that cannot be folded keeps its
    correction as a forward hook on the returned model; their names are in
    ``model.mergelab_unfolded``.  Default sites: :func:`mergelab.stats.discover_sites` minus
    the head's input (as in the paper, pre-activation sites: a channel that a ReLU made
    constant in the merge cannot be rescaled, only shifted).

    ``device``: where every pass and the folding run (each model moves there for its pass
    and back after; default: where ``merged_model`` is); the returned model is on
    ``merged_model``'s device."""
    if not experts:
        raise MergelabError("repair: expected at least one expert model, found none")
    dev = resolve_device(device, "repair device")
    home = module_device(merged_model)
    dev = home if dev is None else dev
    head_name = find_head(merged_model, head)
    probe = probe_batch(merged_model, data)[0] if sites is None else None
    site_list = resolve_sites(merged_model, sites, head_name, probe)
    if sites is None:   # REPAIR corrects pre-activation sites only (not the post-ReLU head input)
        site_list = [s for s in site_list if not (s.module == head_name and s.where == "input")]
    stats = []
    for e in experts:
        with placed(e, dev):
            stats.append(_moments_pass(e, data, site_list, n_batches, shard, progress))
    tmean, tstd = {}, {}
    for s in site_list:
        tmean[s.name], tstd[s.name] = repair_target([st.mean[s.name] for st in stats],
                                                    [st.std[s.name] for st in stats], weights)
    model = copy.deepcopy(merged_model).to(dev)
    corr = estimate_corrections(model, site_list, tmean, tstd, data, n_batches=n_batches, mode=mode,
                                eps=eps, shard=shard, progress=progress)
    unfolded = [s for s in site_list if not (fold and can_fold(model, s))]
    for s in site_list:
        if s not in unfolded:
            fold_correction(model, s, *corr[s.name])
    model.to(home)
    apply_hooks(model, unfolded, {s.name: tuple(t.to(home) for t in corr[s.name]) for s in unfolded})
    model.mergelab_unfolded = [s.name for s in unfolded]
    return model
