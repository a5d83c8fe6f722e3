"""Suite reports: ``results.json``, ``report.md`` and PNG plots (matplotlib, Agg backend).

A suite produces one results dict::

    {
      "suite": "nonlocal-vision", "profile": "quick",
      "config": {...}, "seeds": [...], "versions": {...}, "splits": {name: hash},
      "tasks": ["fmnist-0-4", ...],
      "experts": {setting: {task: test acc}},            # the unmerged experts, per setting
      "runs": [{"setting", "method", "alignment", "correction",
                "coef": {...}, "acc": {task: test acc}, "val_acc": {task: val acc}}, ...],
      "variance_collapse": [{"setting", "label", "sites": [...],
                             "ratios": {"merged": [...], "repair": [...], "tact": [...]}}],
      "barrier": [{"setting", "label", "alignment", "alphas": [...], "loss": [...], "acc": [...]}],
      "timings": {...}, "notes": [...]
    }

Normalised accuracy of a run = mean over tasks of (merged acc / expert acc), the expert
being the same setting's expert for that task.
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


def run_label(run: dict) -> str:
    parts = [run["method"]]
    if run.get("alignment", "none") != "none":
        parts.append(run["alignment"])
    if run.get("correction", "none") != "none":
        parts.append(run["correction"])
    return " + ".join(parts)


def summary_rows(results: dict) -> list[dict]:
    """One row per run: setting, method, alignment, correction, mean acc, mean normalised acc."""
    rows = []
    for r in results.get("runs", []):
        exp = results["experts"].get(r["setting"], {})
        rows.append({"setting": r["setting"], "method": r["method"],
                     "alignment": r.get("alignment", "none"), "correction": r.get("correction", "none"),
                     "mean_acc": _mean(r["acc"].values()), "mean_norm": mean_normalized(r["acc"], exp)})
    return rows


def _fmt(x: Any, pct: bool = False) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:.3f}"


def headline(results: dict) -> str:
    """Markdown table: mean normalised accuracy, rows = method + alignment, columns =
    setting x correction."""
    rows = summary_rows(results)
    if not rows:
        return "(no merge runs)"
    cols = sorted({(r["setting"], r["correction"]) for r in rows},
                  key=lambda c: (list(results["experts"]).index(c[0]) if c[0] in results["experts"] else 99,
                                 ["none", "repair", "tact"].index(c[1]) if c[1] in ("none", "repair", "tact") else 9))
    keys = []
    for r in rows:
        k = (r["method"], r["alignment"])
        if k not in keys:
            keys.append(k)
    val = {(r["method"], r["alignment"], r["setting"], r["correction"]): r["mean_norm"] for r in rows}
    head = "| method | alignment | " + " | ".join(f"{s} / {c}" for s, c in cols) + " |"
    out = [head, "|" + "---|" * (2 + len(cols))]
    for m, a in keys:
        out.append(f"| {m} | {a} | " + " | ".join(_fmt(val.get((m, a, s, c))) for s, c in cols) + " |")
    return "\n".join(out)


def _task_table(results: dict, setting: str) -> str:
    tasks = results["tasks"]
    exp = results["experts"].get(setting, {})
    out = ["| run | " + " | ".join(tasks) + " | mean acc | mean norm. |",
           "|" + "---|" * (len(tasks) + 3)]
    out.append("| expert | " + " | ".join(_fmt(exp.get(t), True) for t in tasks)
               + f" | {_fmt(_mean(exp[t] for t in tasks if t in exp), True)} | 1.000 |")
    for r in results.get("runs", []):
        if r["setting"] != setting:
            continue
        out.append(f"| {run_label(r)} | " + " | ".join(_fmt(r["acc"].get(t), True) for t in tasks)
                   + f" | {_fmt(_mean(r['acc'].values()), True)} | {_fmt(mean_normalized(r['acc'], exp))} |")
    return "\n".join(out)


# ----------------------------------------------------------------------------- plots

def plot_accuracy(results: dict, path: Path) -> bool:
    rows = summary_rows(results)
    if not rows:
        return False
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    labels = list(dict.fromkeys(run_label(r) for r in results["runs"]))
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(labels) * len(settings) + 2), 4.5))
    width = 0.8 / max(1, len(settings))
    for i, s in enumerate(settings):
        vals = {run_label(r): m["mean_norm"] for r, m in zip(results["runs"], rows) if r["setting"] == s}
        xs = [j + i * width for j in range(len(labels))]
        ax.bar(xs, [vals.get(lab, float("nan")) for lab in labels], width, label=s)
    ax.set_xticks([j + width * (len(settings) - 1) / 2 for j in range(len(labels))])
    ax.set_xticklabels(labels, rotation=60, ha="right", fontsize=7)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_ylabel("mean normalised accuracy (merged / expert)")
    ax.set_title(f"{results['suite']} ({results.get('profile', '')}): accuracy by method and setting")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_variance_collapse(results: dict, path: Path) -> bool:
    vc = results.get("variance_collapse") or []
    if not vc:
        return False
    fig, axes = plt.subplots(1, len(vc), figsize=(5 * len(vc), 3.8), squeeze=False)
    for ax, entry in zip(axes[0], vc):
        x = range(len(entry["sites"]))
        for lab, ys in entry["ratios"].items():
            ax.plot(list(x), ys, marker="o", ms=3, label=lab)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(list(x))
        ax.set_xticklabels(entry["sites"], rotation=60, ha="right", fontsize=7)
        ax.set_ylabel("std(merged) / std(expert)")
        ax.set_title(f"{entry['setting']}: {entry.get('label', '')}", fontsize=9)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_barrier(results: dict, path: Path) -> bool:
    bs = results.get("barrier") or []
    if not bs:
        return False
    fig, ax = plt.subplots(figsize=(6, 4))
    for b in bs:
        ax.plot(b["alphas"], b["loss"], marker="o", ms=3,
                label=f"{b['setting']}: {b.get('label', '')} ({b['alignment']})")
    ax.set_xlabel("interpolation weight α  (θ = (1-α)·θ_A + α·θ_B)")
    ax.set_ylabel("test loss")
    ax.set_title("loss along linear interpolation, with and without alignment")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


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


def write_report(results: dict, out: str | os.PathLike) -> dict[str, Path]:
    """Write results.json, report.md and the plots into ``out``; return their paths."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    results = _clean(results)
    p = out / "results.json"
    tmp = p.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1, sort_keys=False, allow_nan=False))
    os.replace(tmp, p)
    paths["results"] = p
    plots = {"accuracy": plot_accuracy, "variance_collapse": plot_variance_collapse, "barrier": plot_barrier}
    for name, fn in plots.items():
        pp = out / f"{name}.png"
        if fn(results, pp):
            paths[name] = pp

    md = [f"# mergelab reproduce: {results['suite']} (profile `{results.get('profile', '')}`)", ""]
    md += ["Accuracies are on each task's held-out test split; merge coefficients were chosen on the"
           " validation split. Normalised accuracy = merged / expert (same setting's expert).", ""]
    md += ["## Mean normalised accuracy", "", headline(results), ""]
    for s in results.get("experts", {}):
        md += [f"## Setting `{s}`: per-task test accuracy (%)", "", _task_table(results, s), ""]
    for r in results.get("runs", []):
        if r.get("coef"):
            md.append(f"- {r['setting']} / {run_label(r)}: coefficients chosen on validation: "
                      + ", ".join(f"{k}={v}" for k, v in r["coef"].items()))
    md.append("")
    if "variance_collapse" in paths:
        md += ["## Variance collapse", "", "![variance collapse](variance_collapse.png)", ""]
        for e in results["variance_collapse"]:
            md.append(f"- {e['setting']} / {e.get('label', '')}: mean std ratio "
                      + ", ".join(f"{k} {_fmt(_mean(v))}" for k, v in e["ratios"].items()))
        md.append("")
    if "barrier" in paths:
        md += ["## Loss barrier along linear interpolation", "", "![barrier](barrier.png)", ""]
        for b in results["barrier"]:
            ends = 0.5 * (b["loss"][0] + b["loss"][-1])
            md.append(f"- {b['setting']} / {b.get('label', '')} ({b['alignment']}): max loss "
                      f"{_fmt(max(b['loss']))}, barrier (max − mean of ends) {_fmt(max(b['loss']) - ends)}")
        md.append("")
    if "accuracy" in paths:
        md += ["## Accuracy by method and setting", "", "![accuracy](accuracy.png)", ""]
    if results.get("notes"):
        md += ["## Notes", ""] + [f"- {n}" for n in results["notes"]] + [""]
    md += ["## Run", "", f"- seeds: {results.get('seeds')}",
           f"- versions: {json.dumps(results.get('versions', {}), sort_keys=True)}",
           f"- split hashes: {json.dumps(results.get('splits', {}), sort_keys=True)}",
           f"- timings (wall s): {json.dumps(results.get('timings', {}), sort_keys=True)}",
           f"- timings (CPU s of this process; on a shared machine, about what a 1-thread run takes alone): "
           f"{json.dumps(results.get('timings_cpu', {}), sort_keys=True)}",
           f"- config: `{json.dumps(results.get('config', {}), sort_keys=True)}`", ""]
    p = out / "report.md"
    p.write_text("\n".join(md))
    paths["report"] = p
    return paths
