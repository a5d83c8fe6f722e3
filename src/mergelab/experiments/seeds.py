"""Several seeds per reproduction, and every number as a mean with a 95 % interval over them.

A suite run with seed ``s`` offsets every seed it uses (foundations, experts, data order, head
inits, subsets) by :func:`seed_base` ``(s) = 10000·s``, so seed 0 is the single-seed run of
earlier versions (its cached experts stay valid) and two seeds never share an expert. The data
splits are fixed (``data.SPLIT_SEED``): the interval is over training randomness, not over
which images are held out.

:func:`aggregate` turns the per-seed results dicts into one: every accuracy becomes the mean
over seeds, with its per-seed values (``*_seeds``) and the half-width of a two-sided 95 %
Student-t interval with n-1 degrees of freedom (``*_ci``; ``None`` for a single seed):
``mean ± t_{0.975, n-1} · s / sqrt(n)``, ``s`` the sample standard deviation (ddof 1).
Normalised accuracies are computed per seed (merged / that seed's expert) before averaging.
"""
from __future__ import annotations

import copy
import math
from typing import Any, Sequence

from ..errors import MergelabError

INTERVAL = "95% Student-t interval over seeds (n-1 degrees of freedom): mean ± t(0.975, n-1)·s/√n"


def seed_base(seed: int) -> int:
    """The offset added to every seed a suite uses in the run with ``seed``."""
    return 10_000 * int(seed)


def default_seeds(profile: str) -> list[int]:
    return [0] if profile == "smoke" else [0, 1, 2]


def parse_seeds(text: str | None, profile: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``; ``None`` -> the profile's default."""
    if text is None or text == "":
        return default_seeds(profile)
    try:
        seeds = [int(s) for s in text.split(",") if s.strip() != ""]
    except ValueError:
        raise MergelabError(f"--seeds: expected comma-separated non-negative integers like 0,1,2, found '{text}'") from None
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise MergelabError(f"--seeds: expected distinct non-negative integers like 0,1,2, found '{text}'")
    return seeds


def t_quantile(df: int, level: float = 0.95) -> float:
    from scipy.stats import t

    return float(t.ppf(0.5 + level / 2, df))


def interval(xs: Sequence[float | None], level: float = 0.95) -> tuple[float, float | None]:
    """``(mean, half-width)`` of the Student-t interval; half-width ``None`` for fewer than 2
    values; ``(nan, None)`` when a value is missing."""
    if not xs or any(x is None or (isinstance(x, float) and math.isnan(x)) for x in xs):
        return float("nan"), None
    n = len(xs)
    m = sum(xs) / n
    if n < 2:
        return m, None
    s = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, t_quantile(n - 1, level) * s / math.sqrt(n)


def _normalized_mean(acc: dict, expert: dict) -> float:
    r = [acc[t] / expert[t] for t in acc if t in expert and expert[t] and acc[t] is not None]
    return sum(r) / len(r) if r else float("nan")


def _run_key(r: dict) -> tuple:
    return (r["setting"], r["method"], r.get("alignment", "none"), r.get("correction", "none"))


def aggregate(per_seed: Sequence[dict], seeds: Sequence[int]) -> dict:
    """One results dict from the per-seed ones (same suite, profile and config)."""
    if len(per_seed) != len(seeds) or not per_seed:
        raise ValueError("one results dict per seed")
    first = per_seed[0]
    out: dict[str, Any] = {k: copy.deepcopy(v) for k, v in first.items()
                           if k not in ("runs", "experts", "variance_collapse", "barrier", "timings",
                                        "timings_cpu", "notes", "seeds", "paths")}
    n = len(seeds)
    out["seeds"] = {"list": list(seeds), "n": n, "interval": INTERVAL if n > 1 else "one seed: no interval",
                    "offset": "every seed the suite uses + 10000·seed", "per_seed": [r.get("seeds") for r in per_seed]}

    # experts: {setting: {task: mean}}, per-seed values and intervals beside
    out["experts"], out["experts_seeds"], out["experts_ci"] = {}, {}, {}
    for setting, tasks in first.get("experts", {}).items():
        out["experts"][setting], out["experts_seeds"][setting], out["experts_ci"][setting] = {}, {}, {}
        for t in tasks:
            vals = [r["experts"][setting][t] for r in per_seed]
            m, h = interval(vals)
            out["experts"][setting][t], out["experts_seeds"][setting][t], out["experts_ci"][setting][t] = m, vals, h

    runs_by_seed = [{_run_key(r): r for r in res.get("runs", [])} for res in per_seed]
    out["runs"] = []
    for r0 in first.get("runs", []):
        key = _run_key(r0)
        rs = [by[key] for by in runs_by_seed if key in by]
        if len(rs) != n:
            raise ValueError(f"run {key} is missing for some seeds")
        run = {k: v for k, v in r0.items() if k not in ("acc", "coef", "val_acc")}
        run["acc"], run["acc_seeds"], run["acc_ci"] = {}, {}, {}
        for t in r0["acc"]:
            vals = [r["acc"][t] for r in rs]
            run["acc"][t], run["acc_ci"][t] = interval(vals)
            run["acc_seeds"][t] = vals
        mean_acc = [sum(r["acc"].values()) / len(r["acc"]) for r in rs]
        run["mean_acc"], run["mean_acc_ci"] = interval(mean_acc)
        run["mean_acc_seeds"] = mean_acc
        norm = [_normalized_mean(r["acc"], res["experts"].get(r["setting"], {})) for r, res in zip(rs, per_seed)]
        run["norm"], run["norm_ci"] = interval(norm)
        run["norm_seeds"] = norm
        if any(r.get("coef") for r in rs):
            run["coef_seeds"] = [r.get("coef") for r in rs]
        out["runs"].append(run)

    out["variance_collapse"] = []
    for i, e0 in enumerate(first.get("variance_collapse", [])):
        es = [res["variance_collapse"][i] for res in per_seed]
        e = {k: v for k, v in e0.items() if k != "ratios"}
        e["ratios"] = {c: [sum(x["ratios"][c][j] for x in es) / n for j in range(len(e0["ratios"][c]))]
                       for c in e0["ratios"]}
        e["ratios_ci"] = {c: [interval([x["ratios"][c][j] for x in es])[1] for j in range(len(e0["ratios"][c]))]
                          for c in e0["ratios"]}
        e["ratios_seeds"] = [x["ratios"] for x in es]
        out["variance_collapse"].append(e)

    out["barrier"] = []
    for i, b0 in enumerate(first.get("barrier", [])):
        bs = [res["barrier"][i] for res in per_seed]
        b = {k: v for k, v in b0.items() if k not in ("loss", "acc")}
        for k in ("loss", "acc"):
            if k in b0:
                b[k] = [sum(x[k][j] for x in bs) / n for j in range(len(b0[k]))]
                b[k + "_ci"] = [interval([x[k][j] for x in bs])[1] for j in range(len(b0[k]))]
                b[k + "_seeds"] = [x[k] for x in bs]
        out["barrier"].append(b)

    for k in ("timings", "timings_cpu"):
        tot: dict[str, float] = {}
        for res in per_seed:
            for phase, v in res.get(k, {}).items():
                tot[phase] = round(tot.get(phase, 0.0) + v, 2)
        out[k] = tot
        out[k + "_per_seed"] = [res.get(k, {}) for res in per_seed]
    out["notes"] = list(dict.fromkeys(n for res in per_seed for n in res.get("notes", [])))
    # everything else a suite records (foundation accuracies, alignment spreads, cache counts,
    # transfer rows...): seed 0's value above, every seed's here
    extra = [k for k in first if k not in out or k in ("foundations", "expert_val", "alignment", "members",
                                                      "transfer_seeds", "robust_seeds", "cache")]
    out["per_seed"] = {k: [res.get(k) for res in per_seed] for k in extra if k not in ("paths", "seeds")}
    return out
