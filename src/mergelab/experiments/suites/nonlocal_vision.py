"""``nonlocal-vision``: the non-local merging paper's study on 28x28 real data.

Six 5-class tasks: Fashion-MNIST, MNIST-10k and Animal-MNIST, each split into classes 0-4
and 5-9. Foundations are pre-trained on the disjoint ``pretrain`` split of all three sets
(30 classes). Settings:

* ``local``: every expert fine-tuned from foundation A; merge point A.
* ``two-foundations``: foundations A and B from different seeds; the even tasks from A, the
  odd ones from B. B is aligned to A and the same permutation is applied to B's experts;
  merge point ½(A + π(B)).
* ``no-foundation``: every expert trained from its own random init; each expert is aligned
  to expert 0 and its init permuted the same way; merge point = mean of the aligned inits.

Methods (through the registry): task arithmetic, TIES, TIES+TALL, Fisher, RegMean; each
x alignment {none, weight, activation} x correction {none, REPAIR, TACT}. Coefficients are
chosen on the validation split. Heads are never merged: task t is evaluated with its own
expert's head.

Library pieces (a failure raises; nothing is skipped): ``mergelab.align`` (spec traced on the
reference model; weight matching with the heads zeroed, as the paper matches its foundations
with zeroed classifiers; activation matching on pre-training images), ``mergelab.repair``
(REPAIR: one shared correction towards the mean of the experts' means and stds on a pooled
batch of every task; TACT: per task towards its own expert's statistics on that task's
training images, its own expert head, folded into a plain model), ``mergelab.stats`` (diagonal
Fisher, "expected" mode, of each expert once, permuted with its alignment; Gram matrices of
the aligned experts' dense layers; activation stds for the variance-collapse plot). Sites: every
conv->LayerNorm output and hidden dense output (before the ReLU) and, for TACT, the head's input.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn
from ...progress import progress

from .. import data as D
from .. import train as T
from .. import zoo
from ..seeds import seed_base
from .common import Timer, choose, data_free_bodies, interpolate, merge_state, versions

TASKS = [f"{ds}-{lo}-{lo + 4}" for ds in ("fmnist", "mnist", "animal") for lo in (0, 5)]
_POOL = {"fmnist": "fashion-mnist", "mnist": "mnist", "animal": "animal-mnist"}
SETTINGS = ("local", "two-foundations", "no-foundation")
METHODS = ("task_arithmetic", "ties", "ties_tall", "fisher", "regmean")
ALIGNMENTS = ("none", "weight", "activation")
CORRECTIONS = ("none", "repair", "tact")

_SMALL_VGG = {"arch": "vgg", "cfg": ("M", 8, "M", 16), "dense": (16,), "norm": "ln"}  # plumbing only
PROFILES: dict[str, dict[str, Any]] = {
    "smoke": dict(model=_SMALL_VGG, pre_steps=30, probe_steps=5, ft_steps=15, scratch_steps=25,
                  batch=32, lr=0.05, ft_lr=0.02, train_limit=3000, val_limit=200, test_limit=300,
                  stat_batches=2, stat_batch=64, fisher_examples=64, calib_examples=128, repair_per_task=32,
                  settings=list(SETTINGS), methods=list(METHODS), alignments=list(ALIGNMENTS),
                  corrections=list(CORRECTIONS), grid_ta=[0.3, 1.0], grid_ties=[0.7, 1.0], ties_density=0.5,
                  barrier_points=5),
    # quick: <= 15 CPU-min for 3 seeds (5 min a seed). The first 3-seed quick (VGG 32/64/64,
    # steps 500 / 30+150 / 300, 400 test images) measured 1278 CPU s: ~60 % training, ~25 %
    # evaluation (test + validation grids), ~12 % TACT + REPAIR. A conv width of 24 (0.71x a
    # training step, 0.66x an evaluated image, measured), 0.85x the steps, 250 test / 200
    # validation images per task and half the calibration images: ~0.55x; seed 0 of that
    # measured 311.7 CPU s (3 seeds ~15.6 min), so foundations 450 -> 400 and from-scratch
    # experts 250 -> 200 steps (training -11 %) (docs/reproduce.md has the measurements)
    "quick": dict(model={"arch": "vgg", "cfg": ("M", 24, "M", 48, 48), "dense": (48,), "norm": "ln"},
                  pre_steps=400, probe_steps=25, ft_steps=125, scratch_steps=200,
                  batch=128, lr=0.05, ft_lr=0.02, train_limit=None, val_limit=200, test_limit=250,
                  stat_batches=4, stat_batch=128, fisher_examples=128, calib_examples=128,
                  repair_per_task=16,
                  settings=list(SETTINGS), methods=list(METHODS), alignments=list(ALIGNMENTS),
                  corrections=list(CORRECTIONS), grid_ta=[0.1, 0.17, 0.25, 0.4],
                  grid_ties=[0.3, 0.45, 0.65, 0.9], ties_density=0.5, barrier_points=11),
    # full: the four full suites with 3 seeds <= 90 CPU-min, this one 41. The 1-seed full
    # measured 1803 CPU s (55 % training); widths 40/80 instead of 48/96 (0.69x a step), 0.83x
    # the steps, half the calibration and test images: 3 seeds then measured 2906 CPU s (48.4
    # min; a seed: training 575, merges 370, TACT 67, REPAIR 58). Now foundations 700, experts
    # 40 + 210, from-scratch experts 430 steps (0.86x the training), 384 calibration images for
    # TACT and 48 a task for REPAIR (0.75x): 819 / 824 / 810 CPU s a seed measured (40.9 min)
    "full": dict(model={"arch": "vgg", "cfg": ("M", 40, "M", 80, 80), "dense": (80,), "norm": "ln"},
                 pre_steps=700, probe_steps=40, ft_steps=210, scratch_steps=430,
                 batch=128, lr=0.05, ft_lr=0.02, train_limit=None, val_limit=400, test_limit=800,
                 stat_batches=6, stat_batch=128, fisher_examples=256, calib_examples=384,
                 repair_per_task=48,
                 settings=list(SETTINGS), methods=list(METHODS), alignments=list(ALIGNMENTS),
                 corrections=list(CORRECTIONS), grid_ta=[0.1, 0.15, 0.25, 0.4],
                 grid_ties=[0.4, 0.6, 0.9, 1.3], ties_density=0.5, barrier_points=11),
}


# ----------------------------------------------------------------------------- data

class TaskData:
    def __init__(self, profile: dict):
        self.p = profile
        self.pools = {k: D.image_pool(v) for k, v in _POOL.items()}
        self.cache: dict[tuple, tuple[np.ndarray, np.ndarray]] = {}

    def get(self, task: str, split: str):
        key = (task, split)
        if key not in self.cache:
            ds, lo, _ = task.split("-")
            lim = {"train": self.p["train_limit"], "val": self.p["val_limit"], "test": self.p["test_limit"]}[split]
            self.cache[key] = self.pools[ds].part(split, tuple(range(int(lo), int(lo) + 5)), limit=lim)
        return self.cache[key]

    def pretrain(self, split: str = "pretrain"):
        """All three sets' pretrain (or val) split, 30 classes (set index x 10 + label)."""
        key = ("pretrain", split)
        if key not in self.cache:
            xs, ys = [], []
            for i, ds in enumerate(_POOL):
                x, y = self.pools[ds].part(split, limit=None if split == "pretrain" else self.p["val_limit"])
                xs.append(x)
                ys.append(y + 10 * i)
            self.cache[key] = (np.concatenate(xs), np.concatenate(ys))
        return self.cache[key]

    def loader(self, task: str, split: str, batch: int = 128, n_batches: int | None = None):
        x, y = self.get(task, split) if task != "pretrain" else self.pretrain(split)
        out = list(T.batches(x, y, batch))
        return out[:n_batches] if n_batches else out

    def split_hashes(self) -> dict[str, str]:
        return {k: p.split_hash() for k, p in self.pools.items()}


# ----------------------------------------------------------------------------- training

def _model(profile, seed: int, n_classes: int) -> zoo.Classifier:
    m = dict(profile["model"])
    return zoo.build(m.pop("arch"), seed=seed, n_classes=n_classes, **m)


class Trainer:
    def __init__(self, profile: dict, data: TaskData, cache: T.ExpertCache, quiet: bool):
        self.p, self.data, self.cache, self.quiet = profile, data, cache, quiet
        self.base_cfg = {"suite": "nonlocal-vision", "model": profile["model"], "batch": profile["batch"],
                         "splits": data.split_hashes(), "train_limit": profile["train_limit"]}

    def foundation(self, seed: int) -> nn.Module:
        cfg = {**self.base_cfg, "kind": "foundation", "seed": seed, "steps": self.p["pre_steps"], "lr": self.p["lr"]}

        def fit(m):
            x, y = self.data.pretrain()
            T.train(m, T.array_sampler(x, y), steps=self.p["pre_steps"], batch_size=self.p["batch"],
                    lr=self.p["lr"], warmup=min(100, self.p["pre_steps"] // 10), seed=seed,
                    quiet=self.quiet, desc=f"foundation {seed}")
            return {"val": T.evaluate(m, self.data.loader("pretrain", "val"))}
        return self.cache.get_or_train(cfg, lambda: _model(self.p, seed, 30), fit)[0]

    def random_init(self, seed: int) -> nn.Module:
        return _model(self.p, seed, 5)

    def expert(self, task: str, init: str, seed: int, init_model: nn.Module | None) -> tuple[nn.Module, dict]:
        """Fine-tune (``init_model`` given: linear probe, then all layers) or train from scratch."""
        scratch = init_model is None
        steps = self.p["scratch_steps"] if scratch else self.p["ft_steps"]
        cfg = {**self.base_cfg, "kind": "expert", "task": task, "init": init, "seed": seed, "steps": steps,
               "probe": 0 if scratch else self.p["probe_steps"], "lr": self.p["lr"] if scratch else self.p["ft_lr"]}

        def build():
            if scratch:
                return self.random_init(seed)
            return zoo.replace_head(copy.deepcopy(init_model), 5, seed=seed)

        def fit(m):
            x, y = self.data.get(task, "train")
            s = T.array_sampler(x, y)
            if not scratch and self.p["probe_steps"]:
                T.train(m, s, steps=self.p["probe_steps"], batch_size=self.p["batch"], lr=self.p["lr"],
                        seed=seed, trainable=lambda n: n.startswith("head."), quiet=self.quiet,
                        desc=f"probe {task}")
            T.train(m, s, steps=steps, batch_size=self.p["batch"], lr=cfg["lr"],
                    warmup=min(50, steps // 10), seed=seed + 1, quiet=self.quiet, desc=f"expert {task}")
            return {"val": T.evaluate(m, self.data.loader(task, "val"))}
        return self.cache.get_or_train(cfg, build, fit)


# ----------------------------------------------------------------------------- library seams
# Every library piece is called through its public API; a failure raises (nothing is skipped).

HEAD = "head"          # the zoo's head module: never merged, per task
# TACT / REPAIR estimate their corrections on ONE calibration batch per call (``calib_examples``
# images of the task; REPAIR: ``repair_per_task`` images of every task pooled). With one batch the
# reference's joint pass is exact (every site sees exactly the corrected inputs the final model
# gives it), the same corrections as "sequential" at a fraction of the cost (tested).
CORRECTION_MODE = "joint"


def _spec(model: nn.Module, data: list):
    from ...align import permutation_spec

    return permutation_spec(model, data[0][0][:4])


def _no_head(state: dict) -> dict:
    """The state with zeroed head weights: heads are per task, so weight matching ignores them
    (the non-local paper matches its foundations with zeroed classifiers)."""
    return {k: torch.zeros_like(v) if k.startswith(HEAD + ".") else v for k, v in state.items()}


def _align_perm(kind: str, spec, ref: nn.Module, other: nn.Module, data: list) -> Callable[[dict], dict]:
    """Permutation aligning ``other`` to ``ref`` (``mergelab.align``); returns a state mapper."""
    from ...align import activation_matching, permute, weight_matching

    if kind == "weight":
        perm = weight_matching(spec, _no_head(ref.state_dict()), _no_head(other.state_dict()))
    elif kind == "activation":
        perm = activation_matching(spec, ref, other, data)
    else:
        raise ValueError(f"unknown alignment {kind!r}")
    return lambda state: dict(permute(spec, state, perm))


def _sites(model: nn.Module, head_input: bool = True) -> list:
    """The paper's correction sites: every conv->norm block output and every hidden dense
    output (before the ReLU), and (``head_input``) the features entering the head. Channel
    axes are explicit (1 for NCHW norm outputs), so no shape guess can pick a spatial axis."""
    from ...stats import Site

    sites = [Site(n, "output", channel_dim=1) for n in model.norm_sites()]
    sites += [Site(n, "output", channel_dim=-1) for n, m in model.named_modules()
              if isinstance(m, nn.Linear) and n != HEAD]
    if head_input:
        sites.append(Site(HEAD, "input", channel_dim=-1))
    return sites


def _repair(merged: nn.Module, experts: list[nn.Module], data: list) -> nn.Module:
    """REPAIR (``mergelab.repair.repair``): one shared correction towards the mean expert
    statistics, at the pre-activation sites (not the head input, as REPAIR's default)."""
    from ...repair import repair

    return repair(merged, experts, data, sites=_sites(merged, head_input=False), head=HEAD,
                  mode=CORRECTION_MODE, progress=False)


def _tact(merged: nn.Module, experts: dict[str, nn.Module], data: dict[str, list]) -> dict[str, nn.Module]:
    """TACT (``mergelab.repair.tact``) for the tasks sharing the body ``merged``: each task's
    corrections towards its own expert's statistics, its own expert head; returned as plain
    per-task models with the corrections folded in (``TaskConditionedModel.folded_model``)."""
    from ...repair import tact

    tcm = tact(merged, experts, data, sites=_sites(merged), head=HEAD, mode=CORRECTION_MODE, progress=False)
    return {t: tcm.folded_model(t).eval() for t in experts}


def _site_std(model, data: list, sites: list) -> dict[str, torch.Tensor]:
    from ...stats import activation_stats

    st = activation_stats(model, data, sites=sites, head=HEAD, progress=False)
    return {s.name: st.std[s.name] for s in sites}


def _fisher(model: nn.Module, data: list, n: int) -> dict[str, torch.Tensor]:
    from ...stats import diagonal_fisher

    return dict(diagonal_fisher(model, data, mode="expected", n_examples=n, progress=False))


def _grams(model: nn.Module, data: list) -> dict[str, torch.Tensor]:
    from ...stats import gram_matrices

    return dict(gram_matrices(model, data, exclude_head=HEAD, progress=False))


# ----------------------------------------------------------------------------- the suite

def _with_state(template: nn.Module, body: dict, head_from: nn.Module) -> nn.Module:
    m = copy.deepcopy(template)
    sd = {**head_from.state_dict(), **body}
    m.load_state_dict(sd)
    return m.eval()


def run(profile_name: str = "smoke", quiet: bool = False, cache_root: str | Path | None = None,
        seed: int = 0) -> dict:
    """One seed's results (``run_suite`` aggregates seeds and writes the report); every seed
    used below is offset by ``seed_base(seed)``."""
    p = PROFILES[profile_name]
    base_seed = seed_base(seed)
    torch.manual_seed(base_seed)
    timer = Timer()
    t_start = time.perf_counter()
    notes: list[str] = []
    with timer("data"):
        data = TaskData(p)
    cache = T.ExpertCache(Path(cache_root) if cache_root else D.cache_dir() / "experts")
    tr = Trainer(p, data, cache, quiet)
    results: dict[str, Any] = {
        "suite": "nonlocal-vision", "profile": profile_name, "config": p, "seeds": {},
        "versions": versions(), "splits": data.split_hashes(), "tasks": TASKS,
        "n_classes": {t: 5 for t in TASKS}, "experts": {},
        "runs": [], "variance_collapse": [], "barrier": [], "alignment": [], "timings": timer.t,
        "timings_cpu": timer.cpu, "notes": notes}

    with timer("train"):
        fa = tr.foundation(base_seed)
        fb = tr.foundation(base_seed + 1) if "two-foundations" in p["settings"] else None
    results["seeds"] = {"run": seed, "foundation_A": base_seed, "foundation_B": base_seed + 1,
                        "experts": f"{base_seed} + task index (+100 no-foundation)"}
    results["foundations"] = {"A": T.evaluate(fa, data.loader("pretrain", "val"))["acc"]}
    if fb is not None:
        results["foundations"]["B"] = T.evaluate(fb, data.loader("pretrain", "val"))["acc"]

    for setting in p["settings"]:
        with timer("train"):
            experts, inits = {}, {}
            for i, t in enumerate(TASKS):
                if setting == "no-foundation":
                    experts[t], _ = tr.expert(t, "scratch", base_seed + 100 + i, None)
                    inits[t] = tr.random_init(base_seed + 100 + i)
                else:
                    f, name = (fa, "A") if setting == "local" or i % 2 == 0 else (fb, "B")
                    experts[t], _ = tr.expert(t, name, base_seed + i, f)
                    inits[t] = f
        results["experts"][setting] = {t: T.evaluate(experts[t], data.loader(t, "test"))["acc"] for t in TASKS}
        alignments = ["none"] if setting == "local" else p["alignments"]
        mappers: dict[str, Callable[[dict], dict]] = {}
        fishers: dict[str, dict] = {}   # per expert, unaligned: an aligned expert's Fisher is its permutation
        for alignment in progress(alignments, desc=f"{setting}: alignments", disable=quiet):
            with timer("align"):
                states, init_states, maps = _aligned(setting, alignment, experts, inits, fa, fb, data, p, mappers)
            results["alignment"].append({"setting": setting, "alignment": alignment,
                                         "expert_l2_to_ref": _spread(states)})
            base = {k: torch.stack([s[k].float() for s in init_states.values()]).mean(0)
                    if torch.is_floating_point(s0) else s0 for k, s0 in next(iter(init_states.values())).items()}
            for method in progress(p["methods"], desc=f"{setting}/{alignment}: methods", disable=quiet):
                with timer("merge"):
                    _run_method(results, setting, alignment, method, states, base, experts, data, p, timer,
                                {"maps": maps, "fishers": fishers})
        if setting == "two-foundations":
            with timer("barrier"):
                _barrier(results, fa, fb, data, p, mappers)
    timer.t["total"] = round(time.perf_counter() - t_start, 2)
    results["cache"] = {"hits": cache.hits, "misses": cache.misses, "root": str(cache.root)}
    return results


def _spread(states: dict[str, dict]) -> float:
    """Mean L2 distance of the experts' bodies to expert 0's (smaller after a good alignment)."""
    order = list(states)
    ref = states[order[0]]
    names = [k for k in ref if not k.startswith(HEAD + ".") and torch.is_floating_point(ref[k])]
    d = [float(torch.sqrt(sum(((states[t][k].float() - ref[k].float()) ** 2).sum() for k in names)))
         for t in order[1:]]
    return float(np.mean(d)) if d else 0.0


def _aligned(setting, alignment, experts, inits, fa, fb, data, p, mappers):
    """(aligned expert states, aligned init states, {task: state mapper or None}) for a setting
    and alignment; the two-foundations mapper (B -> A) is kept in ``mappers[alignment]``."""
    states = {t: dict(m.state_dict()) for t, m in experts.items()}
    init_states = {t: dict(m.state_dict()) for t, m in inits.items()}
    maps: dict[str, Callable[[dict], dict] | None] = {t: None for t in TASKS}
    if alignment == "none" or setting == "local":
        if setting == "local":
            init_states = {"A": dict(fa.state_dict())}
        elif setting == "two-foundations":
            init_states = {"A": dict(fa.state_dict()), "B": dict(fb.state_dict())}
        return states, init_states, maps
    stat_data = data.loader("pretrain", "pretrain", p["stat_batch"], p["stat_batches"])
    if setting == "two-foundations":
        # the paper's pipeline: match foundation B to A, apply that permutation to B's experts
        mapper = _align_perm(alignment, _spec(fa, stat_data), fa, fb, stat_data)
        mappers[alignment] = mapper
        for i, t in enumerate(TASKS):
            if i % 2 == 1:
                states[t] = mapper(states[t])
                maps[t] = mapper
        return states, {"A": dict(fa.state_dict()), "B": mapper(dict(fb.state_dict()))}, maps
    # no foundation: every expert matched to expert 0, its init permuted the same way
    ref = TASKS[0]
    spec = _spec(experts[ref], stat_data)
    for t in TASKS[1:]:
        mapper = _align_perm(alignment, spec, experts[ref], experts[t], stat_data)
        states[t] = mapper(states[t])
        init_states[t] = mapper(init_states[t])
        maps[t] = mapper
    return states, init_states, maps


def _merged_bodies(method: str, coef: float, states, base, experts, data, p, cache: dict,
                   shared: dict) -> dict[str, dict]:
    """{task: merged body state} (one shared body, or one per task for TALL)."""
    order = list(states)
    bodies = data_free_bodies(method, coef, base, states, order, p["ties_density"])
    if bodies is not None:
        return bodies
    es = [states[t] for t in order]
    if method in ("fisher", "regmean"):
        if method not in cache:
            per_model = []
            for t in order:
                if method == "fisher":
                    # Fisher of the unaligned expert (once per setting), permuted like the expert
                    if t not in shared["fishers"]:
                        n_b = -(-p["fisher_examples"] // p["stat_batch"])
                        shared["fishers"][t] = _fisher(experts[t], data.loader(t, "train", p["stat_batch"], n_b),
                                                       p["fisher_examples"])
                    f, m = shared["fishers"][t], shared["maps"][t]
                    per_model.append(f if m is None else m(f))
                else:
                    mdl = _with_state(experts[t], states[t], experts[t])
                    per_model.append(_grams(mdl, data.loader(t, "train", p["stat_batch"], p["stat_batches"])))
            cache[method] = {"fisher" if method == "fisher" else "gram": per_model}
        params = {} if method == "fisher" else {"alpha": coef}
        m = merge_state(method, None, es, params, stats=cache[method])
    else:
        raise ValueError(method)
    return {t: m for t in order}


def _grid(method: str, p: dict) -> list:
    return {"task_arithmetic": p["grid_ta"], "ties": p["grid_ties"], "ties_tall": [1.0],
            "fisher": [None], "regmean": [0.9]}[method]


def _groups(bodies: dict[str, dict]) -> list[list[str]]:
    """Tasks grouped by shared merged body (one group for a single merge, singletons for TALL)."""
    out: dict[int, list[str]] = {}
    for t, b in bodies.items():
        out.setdefault(id(b), []).append(t)
    return list(out.values())


def _run_method(results, setting, alignment, method, states, base, experts, data, p, timer, shared):
    """Merge ``states`` (``{task: body state}``, the tasks in order) with ``method`` at the
    coefficient chosen on validation, correct (REPAIR / TACT) and evaluate every task."""
    tasks = list(states)
    stat_cache: dict = {}
    aligned = {t: _with_state(experts[t], states[t], experts[t]) for t in tasks}

    def models_for(bodies):
        # every task: the merged body with the (aligned) expert's own head and buffers
        return {t: _with_state(experts[t], {**states[t], **bodies[t]}, experts[t]) for t in tasks}

    def val_score(coef):
        ms = models_for(_merged_bodies(method, coef, states, base, experts, data, p, stat_cache, shared))
        return float(np.mean([T.evaluate(ms[t], data.loader(t, "val", 512))["acc"] for t in tasks]))

    coef, scores = choose(_grid(method, p), val_score)
    bodies = _merged_bodies(method, coef, states, base, experts, data, p, stat_cache, shared)
    merged = models_for(bodies)
    coef_rec = {"coef": coef, "val_scores": scores}
    corrected: dict[str, dict[str, Any]] = {"none": merged}
    for corr in p["corrections"]:
        if corr == "none":
            continue
        with timer(corr):
            corrected[corr] = {}
            for group in _groups(bodies):
                if corr == "repair":
                    # one shared correction per body, measured on one pooled batch of every task
                    xs, ys = zip(*[data.loader(t, "train", p["repair_per_task"], 1)[0] for t in tasks])
                    pooled = [(torch.cat(xs), torch.cat(ys))]
                    fixed = _repair(merged[group[0]], [aligned[t] for t in tasks], pooled)
                    for t in group:
                        m = copy.deepcopy(fixed)
                        m.head = copy.deepcopy(aligned[t].head)   # heads are never merged
                        corrected[corr][t] = m.eval()
                else:
                    corrected[corr].update(_tact(
                        merged[group[0]], {t: aligned[t] for t in group},
                        {t: data.loader(t, "train", p["calib_examples"], 1) for t in group}))
    for corr, ms in corrected.items():
        acc = {t: T.evaluate(ms[t], data.loader(t, "test", 512))["acc"] for t in tasks}
        results["runs"].append({"setting": setting, "method": method, "alignment": alignment, "correction": corr,
                                "coef": coef_rec, "acc": acc})
    vc_method = "ties_tall" if "ties_tall" in p["methods"] else p["methods"][0]
    if method == vc_method:
        _variance_collapse(results, setting, alignment, method, corrected, aligned, data, p, tasks)


def _variance_collapse(results, setting, alignment, method, corrected, aligned, data, p, tasks):
    """Per correction site: the merged model's activation std summed over channels / the expert's
    (a ratio of channel sums, so channels a ReLU left dead in the expert cannot blow it up), on
    each task's validation images (one batch), averaged over tasks."""
    sites = _sites(aligned[tasks[0]])
    ratios: dict[str, list[float]] = {}
    for corr, ms in corrected.items():
        per_task = []
        for t in tasks:
            dl = data.loader(t, "val", p["calib_examples"], 1)
            ex = _site_std(aligned[t], dl, sites)
            mg = _site_std(ms[t], dl, sites)
            per_task.append([float(mg[s.name].sum() / ex[s.name].sum().clamp_min(1e-12)) for s in sites])
        ratios[corr] = np.mean(per_task, axis=0).tolist()
    results["variance_collapse"].append({"setting": setting, "label": f"{method} / {alignment}",
                                         "sites": [s.name for s in sites], "ratios": ratios})


def _barrier(results, fa, fb, data, p, mappers):
    """Loss of (1-α)A + α·π(B) on the pre-training task's validation split."""
    val = data.loader("pretrain", "val", 512)
    alphas = np.linspace(0, 1, p["barrier_points"]).tolist()
    for alignment in ["none"] + [a for a in p["alignments"] if a != "none"]:
        sb = dict(fb.state_dict()) if alignment == "none" else mappers[alignment](dict(fb.state_dict()))
        losses, accs = [], []
        for a in alphas:
            m = copy.deepcopy(fa)
            m.load_state_dict(interpolate(dict(fa.state_dict()), sb, a))
            r = T.evaluate(m, val)
            losses.append(r["loss"])
            accs.append(r["acc"])
        results["barrier"].append({"setting": "two-foundations", "label": "foundation A ↔ B",
                                   "split": "pre-training task's validation split (30 classes)",
                                   "alignment": alignment, "alphas": alphas, "loss": losses, "acc": accs})
