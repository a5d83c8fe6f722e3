"""Suite reports: ``results.json``, ``report.md`` and PNG plots (matplotlib, Agg backend).

A suite's ``run`` produces one results dict per seed::

    {
      "suite": "nonlocal-vision", "profile": "quick",
      "config": {...}, "seeds": {...}, "versions": {...}, "splits": {name: hash},
      "tasks": ["fmnist-0-4", ...], "n_classes": {task: classes},
      "experts": {setting: {task: test acc}},            # the unmerged experts, per setting
      "runs": [{"setting", "method", "alignment", "correction",
                "coef": {...}, "acc": {task: test acc}}, ...],
      "variance_collapse": [{"setting", "label", "sites": [...],
                             "ratios": {"none": [...], "repair": [...], "tact": [...]}}],
      "barrier": [{"setting", "label", "split", "alignment", "alphas": [...], "loss": [...], "acc": [...]}],
      "timings": {...}, "notes": [...]
    }

:func:`mergelab.experiments.seeds.aggregate` turns the per-seed dicts into one whose numbers are
means over seeds with per-seed values (``*_seeds``) and 95 % interval half-widths (``*_ci``);
:func:`write_report` writes that (a single per-seed dict is aggregated as one seed).

Normalised accuracy of a run = mean over tasks of (merged acc / expert acc), the expert
being the same setting's expert for that task (per seed, then averaged over seeds).
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CORRECTIONS = ("none", "repair", "tact")
_CORR_LABEL = {"none": "no correction", "repair": "REPAIR", "tact": "TACT"}
_SHORT = {"task_arithmetic": "TA", "ties": "TIES", "ties_tall": "TIES+TALL", "fisher": "Fisher", "regmean": "RegMean",
          "output_ensemble": "ensemble", "average": "average", "target_alone": "target", "weight": "weight m.",
          "activation": "activ. m.", "fisher_normalized": "Fisher norm.", "fisher_labelled_only": "Fisher lab."}
PAGE_WIDTH = 7.5   # inches: figures fit a printed page at 100 %
DPI = 120


def normalized(acc: dict[str, float], expert: dict[str, float]) -> dict[str, float]:
    """Per-task merged / expert accuracy (tasks whose expert has accuracy 0 are skipped)."""
    return {t: acc[t] / expert[t] for t in acc if t in expert and expert[t] > 0}


def mean_normalized(acc: dict[str, float], expert: dict[str, float]) -> float:
    """Mean over tasks of merged / expert accuracy."""
    r = normalized(acc, expert)
    return sum(r.values()) / len(r) if r else float("nan")


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def is_aggregated(results: dict) -> bool:
    return isinstance(results.get("seeds"), dict) and "n" in results["seeds"]


def aggregated(results: dict) -> dict:
    """``results`` as :func:`seeds.aggregate` gives it (a single seed's dict becomes one seed)."""
    if is_aggregated(results):
        return results
    from .seeds import aggregate

    seed = results.get("seeds", {}).get("run", 0) if isinstance(results.get("seeds"), dict) else 0
    return aggregate([results], [seed])


def run_label(run: dict) -> str:
    parts = [run["method"]]
    if run.get("alignment", "none") != "none":
        parts.append(run["alignment"])
    if run.get("correction", "none") != "none":
        parts.append(run["correction"])
    return " + ".join(parts)


def summary_rows(results: dict) -> list[dict]:
    """One row per run: setting, method, alignment, correction, mean acc, mean normalised acc
    (means over seeds) and their 95 % interval half-widths (``None`` for one seed)."""
    results = aggregated(results)
    return [{"setting": r["setting"], "method": r["method"], "alignment": r.get("alignment", "none"),
             "correction": r.get("correction", "none"), "mean_acc": r["mean_acc"], "mean_acc_ci": r["mean_acc_ci"],
             "mean_norm": r["norm"], "mean_norm_ci": r["norm_ci"]} for r in results.get("runs", [])]


def _fmt(x: Any, pct: bool = False, ci: float | None = None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    s = f"{100 * x:.1f}" if pct else f"{x:.3f}"
    if ci is not None and not (isinstance(ci, float) and math.isnan(ci)):
        s += f" ± {100 * ci:.1f}" if pct else f" ± {ci:.3f}"
    return s


def _settings(results: dict) -> list[str]:
    return list(dict.fromkeys([*results.get("experts", {}), *(r["setting"] for r in results.get("runs", []))]))


def headline(results: dict) -> str:
    """Markdown table: mean normalised accuracy (± 95 % interval over seeds), rows = method +
    alignment, columns = setting x correction."""
    rows = summary_rows(results)
    if not rows:
        return "(no merge runs)"
    order = _settings(results)
    cols = sorted({(r["setting"], r["correction"]) for r in rows},
                  key=lambda c: (order.index(c[0]), CORRECTIONS.index(c[1]) if c[1] in CORRECTIONS else 9))
    keys = list(dict.fromkeys((r["method"], r["alignment"]) for r in rows))
    val = {(r["method"], r["alignment"], r["setting"], r["correction"]): r for r in rows}
    head = "| method | alignment | " + " | ".join(f"{s} / {c}" for s, c in cols) + " |"
    out = [head, "|" + "---|" * (2 + len(cols))]
    for m, a in keys:
        cells = []
        for s, c in cols:
            r = val.get((m, a, s, c))
            cells.append(_fmt(r["mean_norm"], ci=r["mean_norm_ci"]) if r else "–")
        out.append(f"| {m} | {a} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def _task_table(results: dict, setting: str) -> str:
    tasks = [t for t in results["tasks"] if t in results["experts"].get(setting, {})
             or any(t in r["acc"] for r in results["runs"] if r["setting"] == setting)]
    exp = results["experts"].get(setting, {})
    exp_ci = results.get("experts_ci", {}).get(setting, {})
    out = ["| run | " + " | ".join(tasks) + " | mean acc | mean norm. |",
           "|" + "---|" * (len(tasks) + 3)]
    out.append("| expert | " + " | ".join(_fmt(exp.get(t), True, exp_ci.get(t)) for t in tasks)
               + f" | {_fmt(_mean(exp[t] for t in tasks if t in exp), True)} | 1.000 |")
    for r in results.get("runs", []):
        if r["setting"] != setting:
            continue
        out.append(f"| {run_label(r)} | " + " | ".join(_fmt(r["acc"].get(t), True, r["acc_ci"].get(t)) for t in tasks)
                   + f" | {_fmt(r['mean_acc'], True, r['mean_acc_ci'])} | {_fmt(r['norm'], ci=r['norm_ci'])} |")
    return "\n".join(out)


def _coef_str(c: Any) -> str:
    if isinstance(c, dict):
        return ", ".join(f"{k}={_coef_str(v)}" for k, v in c.items() if k != "val_scores")
    if isinstance(c, float):
        return f"{c:g}"
    if isinstance(c, list):
        return "[" + ", ".join(_coef_str(v) for v in c) + "]"
    return str(c)


def coefficient_table(results: dict) -> str:
    """One row per (setting, method, alignment): the coefficients chosen on validation, per
    seed (the corrections reuse the uncorrected merge's choice, so they are not repeated)."""
    rows: dict[tuple, list] = {}
    for r in results.get("runs", []):
        if r.get("coef_seeds") and any(r["coef_seeds"]):
            rows.setdefault((r["setting"], r["method"], r.get("alignment", "none")), r["coef_seeds"])
    if not rows:
        return ""
    out = ["| setting | method | alignment | chosen on validation (per seed) |", "|---|---|---|---|"]
    for (s, m, a), cs in rows.items():
        out.append(f"| {s} | {m} | {a} | " + "; ".join(_coef_str(c) for c in cs) + " |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- plots

def chance_norm(results: dict, setting: str) -> float | None:
    """Chance level in normalised units: mean over tasks of (1 / classes) / expert accuracy."""
    nc, exp = results.get("n_classes") or {}, results.get("experts", {}).get(setting, {})
    r = [(1.0 / nc[t]) / exp[t] for t in exp if t in nc and exp[t]]
    return sum(r) / len(r) if r else None


def accuracy_figure(results: dict):
    """A grid: one panel per setting (stacked, shared y), method (+ alignment) on the x axis,
    one bar per correction with its 95 % interval over seeds, the chance level dashed."""
    rows = summary_rows(results)
    if not rows:
        return None
    settings = [s for s in _settings(results) if any(r["setting"] == s for r in rows)]
    corrs = [c for c in CORRECTIONS if any(r["correction"] == c for r in rows)] + \
        list(dict.fromkeys(r["correction"] for r in rows if r["correction"] not in CORRECTIONS))
    fig, axes = plt.subplots(len(settings), 1, figsize=(PAGE_WIDTH, 1.0 + 2.3 * len(settings)), sharey=True,
                             squeeze=False)
    width = 0.8 / len(corrs)
    colors = {"none": "#9e9e9e", "repair": "#4c72b0", "tact": "#dd8452"}
    n_seeds = aggregated(results)["seeds"]["n"]
    for ax, s in zip(axes[:, 0], settings):
        srows = [r for r in rows if r["setting"] == s]
        groups = list(dict.fromkeys((r["method"], r["alignment"]) for r in srows))
        by = {(r["method"], r["alignment"], r["correction"]): r for r in srows}
        for i, c in enumerate(corrs):
            xs, ys, es = [], [], []
            for j, g in enumerate(groups):
                r = by.get((*g, c))
                if r is None:
                    continue
                xs.append(j + (i - (len(corrs) - 1) / 2) * width)
                ys.append(r["mean_norm"])
                es.append(r["mean_norm_ci"] or 0.0)
            ax.bar(xs, ys, width, yerr=es if n_seeds > 1 else None, capsize=2, label=_CORR_LABEL.get(c, c),
                   color=colors.get(c))
        ax.axhline(1.0, color="k", lw=0.8, label="expert")
        ch = chance_norm(results, s)
        if ch is not None:
            ax.axhline(ch, color="r", lw=0.8, ls="--", label="chance")
        ax.set_xticks(range(len(groups)))
        ax.set_xticklabels([_SHORT.get(m, m) if a == "none" else f"{_SHORT.get(m, m)}\n{_SHORT.get(a, a)}"
                            for m, a in groups], fontsize=6.5)
        ax.set_title(f"setting: {s}", fontsize=9)
        ax.set_ylabel("merged / expert", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    top = max([1.0] + [r["mean_norm"] + (r["mean_norm_ci"] or 0.0) for r in rows
                       if r["mean_norm"] == r["mean_norm"]])
    axes[0, 0].set_ylim(0, max(1.1, top + 0.05))
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, fontsize=7, ncol=len(labels), loc="lower center")
    fig.suptitle(f"{results['suite']} ({results.get('profile', '')}): mean normalised test accuracy"
                 + (f", mean ± 95% interval over {n_seeds} seeds" if n_seeds > 1 else ", one seed"), fontsize=9)
    fig.tight_layout(rect=(0, 0.035, 1, 1))
    return fig


def variance_collapse_figure(results: dict):
    """One panel per entry (up to 3 a row), every panel on the same y axis."""
    vc = results.get("variance_collapse") or []
    if not vc:
        return None
    cols = min(3, len(vc))
    nrows = -(-len(vc) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(PAGE_WIDTH, 0.6 + 2.6 * nrows), sharey=True, squeeze=False)
    for ax, entry in zip(axes.flat, vc):
        x = list(range(len(entry["sites"])))
        for lab, ys in entry["ratios"].items():
            ci = (entry.get("ratios_ci") or {}).get(lab)
            line = ax.plot(x, ys, marker="o", ms=2.5, lw=1, label=_CORR_LABEL.get(lab, lab))[0]
            if ci and all(c is not None for c in ci):
                ax.fill_between(x, [y - c for y, c in zip(ys, ci)], [y + c for y, c in zip(ys, ci)],
                                color=line.get_color(), alpha=0.2, lw=0)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(x)
        ax.set_xticklabels(entry["sites"], rotation=60, ha="right", fontsize=5.5)
        ax.set_title(f"{entry['setting']}: {entry.get('label', '')}", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel("std(merged) / std(expert)", fontsize=7)
    for ax in list(axes.flat)[len(vc):]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("variance collapse per correction site (validation images; shared y axis)", fontsize=9)
    fig.tight_layout()
    return fig


def barrier_figure(results: dict):
    bs = results.get("barrier") or []
    if not bs:
        return None
    split = bs[0].get("split", "validation split")
    fig, ax = plt.subplots(figsize=(PAGE_WIDTH * 0.7, 3.2))
    for b in bs:
        line = ax.plot(b["alphas"], b["loss"], marker="o", ms=3, label=f"{b.get('label', '')} ({b['alignment']})")[0]
        ci = b.get("loss_ci")
        if ci and all(c is not None for c in ci):
            ax.fill_between(b["alphas"], [y - c for y, c in zip(b["loss"], ci)], [y + c for y, c in zip(b["loss"], ci)],
                            color=line.get_color(), alpha=0.2, lw=0)
    ax.set_xlabel("interpolation weight α  (θ = (1-α)·θ_A + α·θ_B)", fontsize=8)
    ax.set_ylabel(f"cross-entropy on the {split}", fontsize=8)
    ax.set_title(f"{bs[0]['setting']}: loss along linear interpolation, with and without alignment", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def _save(fig, path: Path) -> bool:
    if fig is None:
        return False
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return True


def plot_accuracy(results: dict, path: Path) -> bool:
    return _save(accuracy_figure(results), path)


def plot_variance_collapse(results: dict, path: Path) -> bool:
    return _save(variance_collapse_figure(results), path)


def plot_barrier(results: dict, path: Path) -> bool:
    return _save(barrier_figure(results), path)


# ----------------------------------------------------------------------------- writer

def _clean(obj):
    """JSON-safe copy: NaN -> None, numpy scalars -> Python, tuples -> lists."""
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    if hasattr(obj, "item") and not isinstance(obj, (str, bytes)):
        try:
            obj = obj.item()
        except (ValueError, TypeError):
            return str(obj)
    if isinstance(obj, float) and (math.isnan(obj) or math.isinf(obj)):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def robust_table(results: dict) -> str:
    """The fisher suite's robust fine-tuning path: per λ (weight on the fine-tuned model), the
    average's and the Fisher merge's test accuracy on the fine-tuning task and the held-out
    task, and the paired difference Fisher − average (per seed, then mean ± interval)."""
    from .seeds import interval

    rows = [r[0] for r in (results.get("per_seed", {}).get("robust_seeds") or []) if r]
    if not rows:
        return ""
    tasks = list(rows[0]["pretrained"])
    head = "| λ (fine-tuned) | " + " | ".join(f"{t}: average | {t}: Fisher | {t}: Fisher − average" for t in tasks)
    out = [head + " |", "|" + "---|" * (1 + 3 * len(tasks))]
    for i, lam in enumerate(rows[0]["lambdas"]):
        cells = []
        for t in tasks:
            avg = [r["average"][i][t] for r in rows]
            fis = [r["fisher"][i][t] for r in rows]
            cells += [_fmt(interval(avg)[0], True, interval(avg)[1]),
                      _fmt(interval(fis)[0], True, interval(fis)[1])]
            d = interval([f - a for f, a in zip(fis, avg)])
            cells.append(_fmt(d[0], True, d[1]))
        out.append(f"| {lam:g} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def write_report(results: dict, out: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, report.md and the plots into ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    results = aggregated(results)
    p = out / "results.json"
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(_clean(results), indent=1, sort_keys=False, allow_nan=False))
    os.replace(tmp, p)
    paths["results"] = p
    plots = {"accuracy": plot_accuracy, "variance_collapse": plot_variance_collapse, "barrier": plot_barrier}
    for name, fn in plots.items():
        pp = out / f"{name}.png"
        if fn(results, pp):
            paths[name] = pp

    seeds = results["seeds"]
    md = [f"# mergelab reproduce: {results['suite']} (profile `{results.get('profile', '')}`)", ""]
    md += ["Accuracies are on each task's held-out test split; merge coefficients were chosen on the"
           " validation split. Normalised accuracy = merged / expert (same setting's expert, same seed).",
           "", f"Seeds: {seeds['list']}. Every number is the mean over seeds"
           + (f" ± the half-width of a {seeds['interval']}." if seeds["n"] > 1 else " (one seed: no interval).")
           + " Per-seed values are in results.json (`*_seeds`).", ""]
    md += ["## Mean normalised accuracy", "", headline(results), ""]
    if "accuracy" in paths:
        md += ["![accuracy](accuracy.png)", ""]
    for s in results.get("experts", {}):
        md += [f"## Setting `{s}`: per-task test accuracy (%)", "", _task_table(results, s), ""]
    rt = robust_table(results)
    if rt:
        md += ["## Robust fine-tuning: Fisher merge vs average along λ (test accuracy, %)", "",
               "λ weighs the fine-tuned model, 1 − λ the pre-trained one (λ = 0: pre-trained with its probe "
               "head, λ = 1: fine-tuned). The held-out task (`-nc`) is nearest-centroid accuracy on the "
               "model's features. Fisher − average is paired per seed.", "", rt, ""]
    ct = coefficient_table(results)
    if ct:
        md += ["## Coefficients chosen on validation", "", ct, ""]
    if "variance_collapse" in paths:
        md += ["## Variance collapse", "", "![variance collapse](variance_collapse.png)", ""]
        for e in results["variance_collapse"]:
            md.append(f"- {e['setting']} / {e.get('label', '')}: mean std ratio over sites "
                      + ", ".join(f"{_CORR_LABEL.get(k, k)} {_fmt(_mean(v))}" for k, v in e["ratios"].items()))
        md.append("")
    if "barrier" in paths:
        md += ["## Loss barrier along linear interpolation", "", "![barrier](barrier.png)", ""]
        for b in results["barrier"]:
            ends = 0.5 * (b["loss"][0] + b["loss"][-1])
            md.append(f"- {b['setting']} / {b.get('label', '')} ({b['alignment']}), loss on the "
                      f"{b.get('split', 'validation split')}: max {_fmt(max(b['loss']))}, "
                      f"barrier (max − mean of ends) {_fmt(max(b['loss']) - ends)}")
        md.append("")
    if results.get("notes"):
        md += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    md += ["## Run", "", f"- seeds: {json.dumps(_clean(seeds['per_seed']))}",
           f"- versions: {json.dumps(results.get('versions', {}), sort_keys=True)}",
           f"- split hashes (sha256 of the data bytes, labels and split indices): "
           f"{json.dumps(results.get('splits', {}), sort_keys=True)}",
           f"- timings, all seeds (wall s): {json.dumps(results.get('timings', {}), sort_keys=True)}",
           f"- timings, all seeds (CPU s of this process; on a shared machine, about what a 1-thread run takes "
           f"alone): {json.dumps(results.get('timings_cpu', {}), sort_keys=True)}",
           f"- config: `{json.dumps(_clean(results.get('config', {})), sort_keys=True)}`", ""]
    p = out / "report.md"
    p.write_text("\n".join(md))
    paths["report"] = p
    return paths
