"""``fisher``: the Fisher-merging paper's two claims at small scale (Matena & Raffel 2022).

A foundation MLP is pre-trained on the ``pretrain`` split of MNIST-10k and Animal-MNIST
(20 classes); everything else is fine-tuned from it, so every merge here is local.

* ``ensembling``: ``n_members`` fine-tunes of Fashion-MNIST (10 classes) from the foundation,
  differing only in their seed (head init, data order). Compared on the test split: the
  members alone (the "expert" row is their mean), the plain parameter average, the Fisher
  merge (uniform weights, diagonal Fisher of each member on its training data) and the output
  ensemble (the average of the members' predicted probabilities, which costs n forwards).
  Heads are merged too: the members solve the same task.
* ``transfer``: a low-resource target (Fashion-MNIST classes 5-9 from ``target_n`` labelled
  examples) and a donor (classes 0-4, the full training split), both fine-tuned from the
  foundation. Bodies are merged with weights ``(λ, 1 − λ)``, the target keeps its head; λ
  is chosen on the target's validation split over a ``grid``-point grid (51 in the paper) by
  :func:`mergelab.methods.search.coefficient_search`, for the average and the Fisher merge
  alike (and for the Fisher merge with each Fisher divided by its norm, the reference code's
  ``normalize`` option). Compared with the target alone; one target per run seed (a different
  labelled subset each time); ``run_suite`` reports the mean and interval over seeds.

  The target's Fisher is estimated on ``target_fisher_n`` *unlabelled* images of the target's
  training pool (drawn with the seed; their labels are never read): the Fisher of a classifier
  is an expectation over the model's own predictive distribution, so it needs inputs, not
  labels, and a low-resource task is short of labels, not of inputs. Validation and test
  images are never used for it. Estimated on the 20 labelled examples instead (the row
  ``fisher_labelled_only``, the suite's first protocol) it is 3-4 orders of magnitude smaller
  than the donor's - the target fits those examples, so p(y|x) is nearly one-hot and the
  expected squared score vanishes - and the merge is the donor unless λ_target = 1
  (``docs/experiments.md``).

Fisher merges use :func:`mergelab.methods.fisher.fisher_merge`; Fisher estimates come from
:func:`mergelab.stats.diagonal_fisher`: the exact expectation over labels (``expected``, the
Fisher-merging paper's choice) in every profile; with the closed-form per-example gradients of
its ``hooks`` backend, the expected Fisher of a 0.67M-parameter 10-class MLP costs about a
second per 1000 examples (with vmap it was ~0.2 s per example, which is why earlier runs
used ``sampled``).
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import data as D
from .. import train as T
from .. import zoo
from ..seeds import seed_base
from .common import Timer, versions

PROFILES: dict[str, dict[str, Any]] = {
    "smoke": dict(widths=(64, 64), pre_steps=100, ft_steps=60, n_members=2, batch=64, lr=0.05, ft_lr=0.05,
                  train_limit=3000, val_limit=300, test_limit=500, fisher_examples=128, fisher_mode="expected",
                  target_n=20, target_steps=40, donor_steps=60, grid=11, target_fisher_n=128),
    "quick": dict(widths=(256, 256), pre_steps=1500, ft_steps=500, n_members=4, batch=128, lr=0.05, ft_lr=0.05,
                  train_limit=None, val_limit=1000, test_limit=None, fisher_examples=1024, fisher_mode="expected",
                  target_n=20, target_steps=100, donor_steps=800, grid=51, target_fisher_n=1024,
                  robust=dict(task="rt-sentiment", heldout="20newsgroups", max_len=64, first_trainable=4,
                              probe_steps=20, probe_lr=3e-3, steps=60, lr=2e-4, batch=32,
                              train_limit=1500, val_limit=150, test_limit=400, heldout_train=600,
                              heldout_test=400, fisher_examples=128, stat_batch=32,
                              lambdas=[0.0, 0.25, 0.5, 0.75, 1.0])),
    # full: ~8 CPU-min for 3 seeds (the 1-seed full measured 219 CPU s, foundation and members
    # 35, ensembling 66, transfer 108; every seed now trains its own foundation, members and
    # donor): 2/3 of the pre-training, 4 members, 2/3 of the donor steps
    "full": dict(widths=(512, 512), pre_steps=2000, ft_steps=1000, n_members=4, batch=128, lr=0.05, ft_lr=0.05,
                 train_limit=None, val_limit=None, test_limit=None, fisher_examples=2048, fisher_mode="expected",
                 target_n=20, target_steps=100, donor_steps=1000, grid=51,
                 target_fisher_n=1024),
}

ENSEMBLE_TASK = "fmnist"
DONOR_TASK = "fmnist-0-4"
TARGET_TASK = "fmnist-5-9-lowres"
TASKS = [ENSEMBLE_TASK, TARGET_TASK]


class Unavailable(Exception):
    """A library piece this run needs is missing (recorded as a note, the run goes on)."""


def _norm(fisher: dict, names) -> float:
    """‖F‖₂ over the merged (body) entries."""
    return float(sum(float(fisher[k].double().square().sum()) for k in names if k in fisher) ** 0.5)


def _fisher(model: nn.Module, data: list, n: int | None, mode: str) -> dict[str, torch.Tensor]:
    try:
        from ...stats import diagonal_fisher
    except ImportError as e:
        raise Unavailable(f"mergelab.stats.diagonal_fisher is not available ({e})") from None
    return dict(diagonal_fisher(model, data, mode=mode, n_examples=n, seed=0, progress=False))


class OutputEnsemble(nn.Module):
    """Log of the members' mean predicted probabilities (argmax / cross-entropy work on it)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x):
        p = torch.stack([torch.softmax(m(x), -1) for m in self.members]).mean(0)
        return p.clamp_min(1e-12).log()


def parameter_average(states: list[dict], weights: list[float] | None = None) -> dict[str, torch.Tensor]:
    """Σ w_i θ_i / Σ w_i through the registered ``linear`` method (every floating tensor)."""
    from .common import merge_state

    w = list(weights) if weights is not None else [1.0] * len(states)
    return merge_state("linear", None, states, {"weight": w}, names=list(states[0]))


class Data:
    def __init__(self, p: dict):
        self.p = p
        self.fm = D.image_pool("fashion-mnist")
        self.pre = [D.image_pool("mnist"), D.image_pool("animal-mnist")]

    def lim(self, split):
        return {"train": self.p["train_limit"], "val": self.p["val_limit"], "test": self.p["test_limit"]}[split]

    def task(self, task: str, split: str):
        classes = {ENSEMBLE_TASK: None, DONOR_TASK: (0, 1, 2, 3, 4), TARGET_TASK: (5, 6, 7, 8, 9)}[task]
        return self.fm.part(split, classes, limit=self.lim(split))

    def target_subset(self, seed: int):
        """``target_n`` labelled training examples of the target, drawn with ``seed``."""
        x, y = self.fm.part("train", (5, 6, 7, 8, 9))
        idx = np.random.default_rng(seed).permutation(len(y))[: self.p["target_n"]]
        return x[idx], y[idx]

    def target_unlabelled(self, seed: int) -> np.ndarray:
        """``target_fisher_n`` images of the target's training pool, without their labels."""
        x, _ = self.fm.part("train", (5, 6, 7, 8, 9))
        idx = np.random.default_rng(10_000 + seed).permutation(len(x))[: self.p["target_fisher_n"]]
        return x[idx]

    def pretrain(self, split: str = "pretrain"):
        xs, ys = [], []
        for i, pool in enumerate(self.pre):
            x, y = pool.part(split, limit=None if split == "pretrain" else self.p["val_limit"])
            xs.append(x)
            ys.append(y + 10 * i)
        return np.concatenate(xs), np.concatenate(ys)

    def split_hashes(self) -> dict[str, str]:
        return {"fashion-mnist": self.fm.split_hash(), **{p.name: p.split_hash() for p in self.pre}}


def _loader(xy, batch: int = 256) -> list:
    return list(T.batches(xy[0], xy[1], batch))


def run(profile_name: str = "smoke", quiet: bool = False, cache_root: str | Path | None = None,
        seed: int = 0) -> dict:
    """One seed's results (``run_suite`` aggregates seeds and writes the report): every model
    seed is offset by ``b = seed_base(seed)``; the transfer experiment draws its target subset
    with ``seed``."""
    p = PROFILES[profile_name]
    b = seed_base(seed)
    torch.manual_seed(b)
    timer = Timer()
    t_start = time.perf_counter()
    notes: list[str] = []
    with timer("data"):
        data = Data(p)
    cache = T.ExpertCache(Path(cache_root) if cache_root else D.cache_dir() / "experts")
    base_cfg = {"suite": "fisher", "widths": list(p["widths"]), "batch": p["batch"], "splits": data.split_hashes(),
                "train_limit": p["train_limit"]}
    results: dict[str, Any] = {
        "suite": "fisher", "profile": profile_name, "config": p, "versions": versions(),
        "splits": data.split_hashes(), "tasks": TASKS, "n_classes": {ENSEMBLE_TASK: 10, TARGET_TASK: 5}, "experts": {}, "runs": [], "variance_collapse": [],
        "barrier": [], "members": {}, "transfer_seeds": [], "timings": timer.t, "timings_cpu": timer.cpu,
        "notes": notes,
        "transfer_protocol": {
            "target": f"{p['target_n']} labelled Fashion-MNIST 5-9 training examples, {p['target_steps']} steps",
            "donor": f"Fashion-MNIST 0-4, full training split, {p['donor_steps']} steps; same foundation as the target",
            "donor_fisher": f"{p['fisher_mode']}, {p['fisher_examples']} donor training images",
            "target_fisher": f"{p['fisher_mode']}, {p['target_fisher_n']} unlabelled images of the target's training "
                             "pool (labels never read; no validation or test image)",
            "target_fisher_labelled_only": f"{p['fisher_mode']}, the {p['target_n']} labelled examples (first protocol)",
            "merged": "bodies (target keeps its head); floor 1e-6",
            "lambda": f"target weight on a {p['grid']}-point grid in [0, 1], chosen on the target's validation split"},
        "seeds": {"run": seed, "foundation": b, "members": f"{b} + 1000 + i, i < {p['n_members']}",
                  "transfer": f"target subset seed {seed}, target fine-tune seed {b + seed}, donor seed {b + 500}"}}

    def fit_fn(x, y, steps, lr, seed, desc, val):
        def fit(m):
            T.train(m, T.array_sampler(x, y), steps=steps, batch_size=p["batch"], lr=lr,
                    warmup=min(50, steps // 10), seed=seed, quiet=quiet, desc=desc)
            return {"val": T.evaluate(m, _loader(val))}
        return fit

    with timer("train"):
        fx, fy = data.pretrain()
        foundation, _ = cache.get_or_train(
            {**base_cfg, "kind": "foundation", "seed": b, "steps": p["pre_steps"], "lr": p["lr"]},
            lambda: zoo.build("mlp", seed=b, widths=tuple(p["widths"]), n_classes=20),
            fit_fn(fx, fy, p["pre_steps"], p["lr"], b, "foundation", data.pretrain("val")))

    def finetune(task, x, y, steps, seed, extra):
        cfg = {**base_cfg, "kind": "finetune", "task": task, "seed": seed, "steps": steps, "lr": p["ft_lr"], **extra}
        return cache.get_or_train(cfg, lambda: zoo.replace_head(copy.deepcopy(foundation), 10 if task == ENSEMBLE_TASK
                                                                else 5, seed=seed),
                                  fit_fn(x, y, steps, p["ft_lr"], seed + 1, f"finetune {task} {seed}",
                                         data.task(task, "val")))[0]

    with timer("ensembling"):
        _ensembling(results, data, p, finetune, notes, b)
    with timer("transfer"):
        _transfer(results, data, p, finetune, notes, seed, b)
    if p.get("robust"):
        from .fisher_robust import run_robust, task_names

        results["tasks"] = TASKS + list(task_names(p["robust"]))
        with timer("robust"):
            run_robust(results, p["robust"], quiet, b, cache, timer)
    timer.t["total"] = round(time.perf_counter() - t_start, 2)
    results["cache"] = {"hits": cache.hits, "misses": cache.misses, "root": str(cache.root)}
    return results


def _ensembling(results, data, p, finetune, notes, b):
    x, y = data.task(ENSEMBLE_TASK, "train")
    test = _loader(data.task(ENSEMBLE_TASK, "test"))
    members = [finetune(ENSEMBLE_TASK, x, y, p["ft_steps"], b + 1000 + i, {}) for i in range(p["n_members"])]
    accs = [T.evaluate(m, test)["acc"] for m in members]
    results["members"] = {"acc": accs}
    results["experts"]["ensembling"] = {ENSEMBLE_TASK: float(np.mean(accs))}
    states = [dict(m.state_dict()) for m in members]

    def record(method, model):
        results["runs"].append({"setting": "ensembling", "method": method, "alignment": "none", "correction": "none",
                                "acc": {ENSEMBLE_TASK: T.evaluate(model, test)["acc"]}})

    record("output_ensemble", OutputEnsemble(members))
    avg = copy.deepcopy(members[0])
    avg.load_state_dict(parameter_average(states))
    record("average", avg)
    try:
        from ...methods.fisher import fisher_merge
        train = _loader((x, y), 64)
        fishers = [_fisher(m, train, p["fisher_examples"], p["fisher_mode"]) for m in members]
    except Unavailable as e:
        notes.append(f"ensembling/fisher: skipped: {e}")
        return
    fm = copy.deepcopy(members[0])
    fm.load_state_dict(fisher_merge(states, fishers))
    record("fisher", fm)


def _transfer(results, data, p, finetune, notes, s, b):
    from ...methods.search import coefficient_search, pairwise_grid

    dx, dy = data.task(DONOR_TASK, "train")
    donor = finetune(DONOR_TASK, dx, dy, p["donor_steps"], b + 500, {})
    val = _loader(data.task(TARGET_TASK, "val"))
    test = _loader(data.task(TARGET_TASK, "test"))
    body = [k for k in donor.state_dict() if not k.startswith("head.")]
    donor_state = {k: v for k, v in donor.state_dict().items() if k in body}
    try:
        donor_fisher = _fisher(donor, _loader((dx, dy), 64), p["fisher_examples"], p["fisher_mode"])
    except Unavailable as e:
        notes.append(f"transfer/fisher: skipped: {e}")
        donor_fisher = None
    # one target per run seed; run_suite aggregates the seeds
    tx, ty = data.target_subset(s)
    target = finetune(TARGET_TASK, tx, ty, p["target_steps"], b + s, {"target_n": p["target_n"], "subset_seed": s})
    t_state = {k: v for k, v in target.state_dict().items() if k in body}
    row: dict[str, Any] = {"seed": s, "target_alone": T.evaluate(target, test)["acc"], "fisher_norm": {}}

    def with_body(merged_body, target=target):
        m = copy.deepcopy(target)
        m.load_state_dict({**target.state_dict(), **merged_body})
        return m.eval()

    merges = {"average": lambda c: with_body(parameter_average([t_state, donor_state], list(c)))}
    if donor_fisher is not None:
        from ...methods.fisher import fisher_merge
        ux = data.target_unlabelled(s)
        t_fisher = _fisher(target, _loader((ux, np.zeros(len(ux), dtype=np.int64)), 64), None, p["fisher_mode"])
        t_fisher_lab = _fisher(target, _loader((tx, ty), 64), None, p["fisher_mode"])
        row["fisher_norm"] = {"donor": _norm(donor_fisher, body), "target_unlabelled": _norm(t_fisher, body),
                              "target_labelled_only": _norm(t_fisher_lab, body)}
        for name, tf, norm in (("fisher", t_fisher, False), ("fisher_normalized", t_fisher, True),
                               ("fisher_labelled_only", t_fisher_lab, False)):
            merges[name] = (lambda c, tf=tf, norm=norm: with_body(fisher_merge(
                [t_state, donor_state], [tf, donor_fisher], weights=list(c), normalize=norm)))
    for method, merge_fn in merges.items():
        res = coefficient_search(merge_fn, 2, lambda m: T.evaluate(m, val)["acc"], grid=pairwise_grid(p["grid"]))
        lam = res.best_coefficients
        row[method] = {"lambda_target": lam[0], "val": res.best_score,
                       "test": T.evaluate(merge_fn(lam), test)["acc"],
                       "val_grid": {f"{c[0]:.3f}": sc for c, sc in res.table}}
    results["transfer_seeds"] = [row]
    results["experts"]["transfer"] = {TARGET_TASK: row["target_alone"]}
    results["runs"].append({"setting": "transfer", "method": "target_alone", "alignment": "none", "correction": "none",
                            "acc": {TARGET_TASK: row["target_alone"]}})
    for method in ("average", "fisher", "fisher_normalized", "fisher_labelled_only"):
        if method not in row:
            continue
        results["runs"].append({
            "setting": "transfer", "method": method, "alignment": "none", "correction": "none",
            "acc": {TARGET_TASK: row[method]["test"]}, "coef": {"lambda_target": row[method]["lambda_target"]}})
