"""TACT: task-specific activation correction (methods.md §6).

For each task t and each site, the merged model's per-channel statistics on task t's data are
moved to expert t's statistics (``y = (x − μ̂_t)/√(σ̂_t² + ε) · σ_t^e + μ_t^e``), re-estimated
in forward order so each site sees the corrections before it.  Each task keeps its expert's
head (heads are never merged).

The result is a :class:`TaskConditionedModel`: ``forward(*inputs, task=...)`` applies that
task's corrections and head.  ``save_corrections(path)`` writes the corrections as one small
safetensors file (keys ``<task>/<site>.scale`` and ``<task>/<site>.shift``);
``folded_model(task)`` / ``folded_state_dict(task)`` give a plain model per task with the
corrections folded into the layers (see :mod:`mergelab.repair.fold`).
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Iterable, Literal, Mapping, Sequence

from safetensors import safe_open
from safetensors.torch import load_file
import torch
from torch import Tensor, nn

from ..device import module_device, placed, resolve_device
from ..errors import MergelabError
from ..io.writer import save_tensors
from ..stats import distributed
from ..stats.activations import _moments_pass
from ..stats.sites import Site, channel_dim, find_head, probe_batch, resolve_sites, _inside
from .correct import Correction, affine, estimate_corrections
from .fold import fold_correction, why_not_foldable


class _HeadSwitch(nn.Module):
    """Stands where the head was; runs the head of the current task."""

    def __init__(self, heads: Mapping[str, nn.Module]):
        super().__init__()
        self.heads = nn.ModuleDict(dict(heads))
        self.task: str | None = None

    def forward(self, *args, **kwargs):
        return self.heads[self.task](*args, **kwargs)


def _set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


class _Controller:
    """The current task and the corrections, shared by the hooks of one model (a deepcopy of
    the model copies it once, so copies stay independent)."""

    def __init__(self, corrections):
        self.corrections, self.task = corrections, None


def _apply(module, site: Site, x: Tensor) -> Tensor:
    ctl = module._mergelab_tact_ctl
    if ctl.task is None:
        raise MergelabError("TaskConditionedModel: call it with task=<name>")
    a, b = ctl.corrections[ctl.task][site.name]
    return affine(x, a.to(x.device), b.to(x.device), channel_dim(site, module, x))


def _out_hook(module, args, output):
    for site in module._mergelab_tact_sites:
        if site.where == "output":
            if isinstance(output, tuple):
                output = (_apply(module, site, output[0]),) + output[1:]
            else:
                output = _apply(module, site, output)
    return output


def _in_hook(module, args):
    for site in module._mergelab_tact_sites:
        if site.where == "input":
            args = (_apply(module, site, args[0]),) + tuple(args[1:])
    return args


def _attach(model: nn.Module, sites: Sequence[Site], ctl: _Controller) -> None:
    for s in sites:
        m = model.get_submodule(s.module)
        if not hasattr(m, "_mergelab_tact_sites"):
            m._mergelab_tact_sites = []
            m.register_forward_hook(_out_hook)
            m.register_forward_pre_hook(_in_hook)
        m._mergelab_tact_sites.append(s)
        m._mergelab_tact_ctl = ctl


def _detach(model: nn.Module) -> None:
    for m in model.modules():
        if hasattr(m, "_mergelab_tact_sites"):
            for hooks, fn in ((m._forward_hooks, _out_hook), (m._forward_pre_hooks, _in_hook)):
                for k in [k for k, v in hooks.items() if v is fn]:
                    del hooks[k]
            del m._mergelab_tact_sites, m._mergelab_tact_ctl


class TaskConditionedModel(nn.Module):
    """A merged model plus per-task corrections at sites and per-task heads."""

    def __init__(self, model: nn.Module, sites: Sequence[Site],
                 corrections: Mapping[str, Mapping[str, Correction]],
                 heads: Mapping[str, nn.Module] | None = None, head: str | None = None,
                 eps: float = 1e-5):
        super().__init__()
        self.tasks = list(corrections)
        for t in self.tasks:
            if not t or "." in t or "/" in t:
                raise MergelabError(f"task name '{t}': expected a non-empty name without '.' or '/'")
        self.sites = list(sites)
        self.corrections = {t: dict(c) for t, c in corrections.items()}
        self.head, self.eps = head, eps
        self.model = model
        if heads is not None:
            if head is None:
                raise MergelabError("TaskConditionedModel: heads given without the head's module name")
            if set(heads) != set(self.tasks):
                raise MergelabError(f"heads: expected one per task {sorted(self.tasks)}, found {sorted(heads)}")
            _set_submodule(self.model, head, _HeadSwitch(heads))
        self._ctl = _Controller(self.corrections)
        _attach(self.model, self.sites, self._ctl)

    def forward(self, *args, task: str, **kwargs):
        if task not in self.corrections:
            raise MergelabError(f"task '{task}': expected one of {', '.join(self.tasks)}")
        self._ctl.task = task
        if self.head is not None and isinstance(self.model.get_submodule(self.head), _HeadSwitch):
            self.model.get_submodule(self.head).task = task
        try:
            return self.model(*args, **kwargs)
        finally:
            self._ctl.task = None

    # ---- outputs
    def corrections_state(self) -> dict[str, Tensor]:
        out = {}
        for t in self.tasks:
            for s in self.sites:
                a, b = self.corrections[t][s.name]
                out[f"{t}/{s.name}.scale"] = a.float().cpu().contiguous()
                out[f"{t}/{s.name}.shift"] = b.float().cpu().contiguous()
        return out

    def save_corrections(self, path: str | Path) -> None:
        """One safetensors file with every task's (scale, shift) per site (rank 0 writes)."""
        if not distributed.is_writer():
            return
        meta = {"mergelab_kind": "tact_corrections", "tasks": json.dumps(self.tasks),
                "sites": json.dumps([s.name for s in self.sites]), "eps": repr(self.eps),
                "head": self.head or ""}
        save_tensors(self.corrections_state(), path, metadata=meta)

    def folded_model(self, task: str) -> nn.Module:
        """A plain model for ``task``: its head, every correction folded into a layer."""
        if task not in self.corrections:
            raise MergelabError(f"task '{task}': expected one of {', '.join(self.tasks)}")
        m = copy.deepcopy(self.model)
        _detach(m)                                      # a plain model: no hooks left
        if self.head is not None and isinstance(m.get_submodule(self.head), _HeadSwitch):
            _set_submodule(m, self.head, m.get_submodule(self.head).heads[task])
        for s in self.sites:
            reason = why_not_foldable(m, s)
            if reason is not None:
                raise MergelabError(f"site '{s.name}': cannot fold the correction: {reason}; "
                                    "use the TaskConditionedModel for this task")
        for s in self.sites:
            fold_correction(m, s, *self.corrections[task][s.name])
        return m

    def folded_state_dict(self, task: str) -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in self.folded_model(task).state_dict().items()}

    def save(self, out_dir: str | Path) -> None:
        """``out_dir/corrections.safetensors`` and ``out_dir/<task>/model.safetensors`` (folded)."""
        if not distributed.is_writer():
            return
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        self.save_corrections(out / "corrections.safetensors")
        for t in self.tasks:
            (out / t).mkdir(exist_ok=True)
            sd = {k: v.contiguous() for k, v in self.folded_state_dict(t).items()}
            save_tensors(sd, str(out / t / "model.safetensors"), metadata={"mergelab_kind": "tact_folded",
                                                                         "task": t})


def load_corrections(path: str | Path) -> tuple[dict[str, dict[str, Correction]], dict[str, str]]:
    """Read a corrections file: ``({task: {site: (scale, shift)}}, metadata)``."""
    with safe_open(str(path), "pt") as f:
        meta = f.metadata() or {}
    if meta.get("mergelab_kind") != "tact_corrections":
        raise MergelabError(f"{path}: expected mergelab_kind 'tact_corrections', found "
                            f"'{meta.get('mergelab_kind')}'")
    t = load_file(str(path))
    out: dict[str, dict[str, Correction]] = {}
    for task in json.loads(meta["tasks"]):
        out[task] = {s: (t[f"{task}/{s}.scale"], t[f"{task}/{s}.shift"]) for s in json.loads(meta["sites"])}
    return out, meta


def tact(merged_model: nn.Module, experts: Mapping[str, nn.Module], data: Mapping[str, Iterable[Any]],
         n_batches: int | None = None, *, sites: Sequence[str | Site] | None = None,
         head: str | None = "auto", mode: Literal["joint", "sequential"] = "joint", eps: float = 1e-5,
         shard: bool = True, progress: bool = True,
         device: str | torch.device | None = None) -> TaskConditionedModel:
    """Per-task rescale-and-shift of ``merged_model`` towards each expert's statistics.

    ``experts`` and ``data`` are keyed by task; ``data[t]`` is task t's calibration loader
    (the first ``n_batches`` batches are used, all by default).  ``head`` names the head
    module (``"auto"``: the last nn.Linear; ``None``: no per-task head); sites default to
    :func:`mergelab.stats.discover_sites` (the head's input included, outside the head).
    ``mode`` is ``"joint"`` (one pass, the reference procedure) or ``"sequential"`` (exact,
    one pass per site); see :mod:`mergelab.repair.correct`.  ``merged_model`` is not modified.
    ``device``: where the passes run (each model moves there for its pass and back after;
    default: where ``merged_model`` is); the result is on ``merged_model``'s device."""
    if not experts:
        raise MergelabError("tact: expected at least one expert, found none")
    if set(experts) != set(data):
        raise MergelabError(f"tact: experts and data must name the same tasks, found "
                            f"{sorted(experts)} and {sorted(data)}")
    head_name = find_head(merged_model, head)
    probe = probe_batch(merged_model, data[next(iter(data))])[0] if sites is None else None
    site_list = resolve_sites(merged_model, sites, head_name, probe)
    for s in site_list:
        if _inside(s.module, head_name) and s.where == "output":
            raise MergelabError(f"site '{s.name}': is inside the head '{head_name}', heads are per task")
    dev = resolve_device(device, "tact device")
    home = module_device(merged_model)
    base = copy.deepcopy(merged_model)
    corrections: dict[str, dict[str, Correction]] = {}
    with placed(base, home if dev is None else dev):
        for task, expert in experts.items():
            with placed(expert, dev):
                st = _moments_pass(expert, data[task], site_list, n_batches, shard, progress)
            corr = estimate_corrections(base, site_list, st.mean, st.std, data[task],
                                        n_batches=n_batches, mode=mode, eps=eps, shard=shard,
                                        progress=progress)
            corrections[task] = {k: (a.to(home), b.to(home)) for k, (a, b) in corr.items()}
    heads = None
    if head_name is not None:
        heads = {}
        for t, e in experts.items():
            if head_name not in dict(e.named_modules()):
                raise MergelabError(f"expert '{t}': has no head module named '{head_name}'")
            heads[t] = copy.deepcopy(e.get_submodule(head_name))
    return TaskConditionedModel(base, site_list, corrections, heads, head_name, eps)
