"""Seeds and intervals: the t-interval against a hand computation, the aggregation of per-seed
results, the --seeds parsing, the report's figures (panel counts, page size), progress output
without carriage returns, and expert weights independent of the thread count (slow)."""
import io
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from mergelab.errors import MergelabError
from mergelab.experiments import report as R
from mergelab.experiments import seeds as S
from mergelab.progress import LineProgress, progress

HERE = Path(__file__).parent


def test_t_interval_matches_hand_computation():
    # n = 3: mean 0.8333..., s = sqrt(((-1/30)^2 + (1/150)^2 + (2/75)^2) / 2) = 0.0305505,
    # t(0.975, 2) = 4.302653 (printed tables), half-width = 4.302653 * 0.0305505 / sqrt(3)
    m, h = S.interval([0.80, 0.84, 0.86])
    assert m == pytest.approx(2.5 / 3)
    assert h == pytest.approx(4.302653 * 0.0305505 / math.sqrt(3), rel=1e-5)
    assert h == pytest.approx(0.0758917, abs=1e-6)
    # n = 2: s = 0.1414214, t(0.975, 1) = 12.706205, half-width = 12.706205 * 0.1
    m, h = S.interval([0.5, 0.7])
    assert m == pytest.approx(0.6) and h == pytest.approx(1.2706205, rel=1e-6)
    # n = 5 against the table value t(0.975, 4) = 2.776445
    xs = [1.0, 2.0, 3.0, 4.0, 5.0]
    assert S.interval(xs)[1] == pytest.approx(2.776445 * math.sqrt(2.5) / math.sqrt(5), rel=1e-6)
    # one seed: no interval; equal values: zero width; a missing value: no number
    assert S.interval([0.7]) == (0.7, None)
    assert S.interval([0.3, 0.3, 0.3]) == (pytest.approx(0.3), 0.0)
    assert math.isnan(S.interval([0.3, None])[0])


def _seed_results(seed, accs, expert, coef):
    tasks = ["t1", "t2"]
    runs = [{"setting": "local", "method": "ties", "alignment": "none", "correction": c,
             "coef": {"lambda": coef}, "acc": dict(zip(tasks, a))} for c, a in accs.items()]
    return {"suite": "fake", "profile": "quick", "config": {}, "seeds": {"run": seed}, "tasks": tasks,
            "n_classes": {"t1": 5, "t2": 10},
            "experts": {"local": dict(zip(tasks, expert))}, "runs": runs,
            "variance_collapse": [{"setting": "local", "label": "ties", "sites": ["a", "b"],
                                   "ratios": {"none": [0.5 + seed / 10, 0.4], "tact": [1.0, 1.0]}}],
            "barrier": [], "timings": {"train": 10.0}, "timings_cpu": {"train": 9.0}, "notes": ["n"],
            "cache": {"hits": seed}}


def test_aggregate_means_intervals_and_per_seed_values():
    per = [_seed_results(0, {"none": (0.4, 0.6), "tact": (0.8, 0.9)}, (0.8, 0.9), 0.3),
           _seed_results(1, {"none": (0.5, 0.6), "tact": (0.7, 0.9)}, (1.0, 0.9), 0.5),
           _seed_results(2, {"none": (0.3, 0.3), "tact": (0.8, 0.6)}, (0.6, 0.6), 0.3)]
    agg = S.aggregate(per, [0, 1, 2])
    assert agg["seeds"]["list"] == [0, 1, 2] and agg["seeds"]["n"] == 3 and "Student-t" in agg["seeds"]["interval"]
    none = agg["runs"][0]
    assert none["acc_seeds"]["t1"] == [0.4, 0.5, 0.3] and none["acc"]["t1"] == pytest.approx(0.4)
    # normalised per seed with that seed's experts: (0.4/0.8 + 0.6/0.9)/2, (0.5/1 + 0.6/0.9)/2, (0.5 + 0.5)/2
    want = [(0.5 + 2 / 3) / 2, (0.5 + 2 / 3) / 2, 0.5]
    assert none["norm_seeds"] == pytest.approx(want)
    m = sum(want) / 3
    s = math.sqrt(sum((w - m) ** 2 for w in want) / 2)
    assert none["norm"] == pytest.approx(m) and none["norm_ci"] == pytest.approx(4.302653 * s / math.sqrt(3), rel=1e-5)
    assert none["coef_seeds"] == [{"lambda": 0.3}, {"lambda": 0.5}, {"lambda": 0.3}]
    assert agg["experts"]["local"]["t1"] == pytest.approx(0.8) and agg["experts_seeds"]["local"]["t1"] == [0.8, 1.0, 0.6]
    assert agg["variance_collapse"][0]["ratios"]["none"] == pytest.approx([0.6, 0.4])
    assert agg["timings_cpu"] == {"train": 27.0} and len(agg["timings_cpu_per_seed"]) == 3
    assert agg["notes"] == ["n"] and agg["per_seed"]["cache"] == [{"hits": 0}, {"hits": 1}, {"hits": 2}]
    # the headline shows mean ± half-width
    row = [ln for ln in R.headline(agg).splitlines() if ln.startswith("| ties |")][0]
    assert f"{m:.3f} ± {none['norm_ci']:.3f}" in row


def test_parse_seeds():
    assert S.parse_seeds(None, "smoke") == [0] and S.parse_seeds(None, "quick") == [0, 1, 2]
    assert S.parse_seeds("3, 5", "full") == [3, 5]
    for bad in ("a", "1,1", "-1", ","):
        with pytest.raises(MergelabError, match="--seeds"):
            S.parse_seeds(bad, "quick")


def test_cli_bad_seeds_is_one_line_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "mergelab", "reproduce", "fisher", "--seeds", "0,x",
                        "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("error: --seeds") and r.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()


def _png_size(path: Path) -> tuple[int, int]:
    return struct.unpack(">II", path.read_bytes()[16:24])


def _grid_results():
    tasks = ["t1", "t2"]
    per = []
    for seed in (0, 1):
        runs = [{"setting": s, "method": m, "alignment": a, "correction": c, "coef": {"lambda": 0.4},
                 "acc": {"t1": 0.5 + 0.1 * seed, "t2": 0.6}}
                for s in ("local", "two-foundations", "no-foundation")
                for m in ("task_arithmetic", "ties") for a in (["none"] if s == "local" else ["none", "weight"])
                for c in ("none", "repair", "tact")]
        per.append({"suite": "fake", "profile": "quick", "config": {}, "seeds": {"run": seed}, "tasks": tasks,
                    "n_classes": {"t1": 5, "t2": 5},
                    "experts": {s: {"t1": 0.9, "t2": 0.8} for s in ("local", "two-foundations", "no-foundation")},
                    "runs": runs,
                    "variance_collapse": [{"setting": s, "label": "ties", "sites": ["a", "b"],
                                           "ratios": {"none": [0.5, 0.3], "tact": [1.0, 1.0]}}
                                          for s in ("two-foundations", "no-foundation")],
                    "barrier": [{"setting": "two-foundations", "label": "A ↔ B", "split": "pre-training validation split",
                                 "alignment": a, "alphas": [0, 0.5, 1], "loss": [0.3, 1.0 + seed, 0.3]}
                                for a in ("none", "weight")],
                    "timings": {}, "timings_cpu": {}, "notes": []})
    return S.aggregate(per, [0, 1])


def test_report_figures_panels_labels_and_page_size(tmp_path):
    agg = _grid_results()
    fig = R.accuracy_figure(agg)
    panels = [ax for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 3   # one per setting
    assert [ax.get_title() for ax in panels] == [f"setting: {s}" for s in ("local", "two-foundations", "no-foundation")]
    assert all(ax.get_shared_y_axes().joined(panels[0], ax) for ax in panels)
    # bars: one per (method, alignment) x correction, each with an error bar; the chance level drawn
    assert len(panels[1].patches) == 4 * 3
    assert any(ln.get_label() == "chance" and ln.get_ydata()[0] == pytest.approx(0.2 / 0.85, rel=0.05)
               for ln in panels[0].get_lines())
    vc = R.variance_collapse_figure(agg)
    vpanels = [ax for ax in vc.axes if ax.get_visible()]
    assert len(vpanels) == 2 and vpanels[0].get_shared_y_axes().joined(vpanels[0], vpanels[1])
    bar = R.barrier_figure(agg)
    assert "pre-training validation split" in bar.axes[0].get_ylabel() and "test" not in bar.axes[0].get_ylabel()

    paths = R.write_report(agg, tmp_path)
    for k in ("accuracy", "variance_collapse", "barrier"):
        w, h = _png_size(paths[k])
        assert w <= 7.5 * 120 + 1 and h <= 10 * 120   # fits a page at 120 dpi
    md = (tmp_path / "report.md").read_text()
    # no repeated prose lines (tables of equal fake numbers may repeat rows)
    lines = [ln for ln in md.splitlines() if ln.strip() and not ln.startswith("|")]
    assert len(lines) == len(set(lines)), "report.md repeats lines"
    assert "coefficients chosen" not in md   # the old per-run line, once per correction
    # one coefficient row per (setting, method, alignment), with every seed's choice
    assert md.count("| local | ties | none | lambda=0.4; lambda=0.4 |") == 1
    assert "Student-t" in md and "± " in md


def test_progress_writes_one_line_per_phase_without_carriage_returns(capsys):
    for _ in progress(range(5), desc="phase a"):
        pass
    bar = progress(total=3, desc="phase b", unit="job")
    bar.update(2)
    bar.update(1)
    bar.close()
    with progress(total=2, desc="quiet", disable=True) as q:
        q.update(2)
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.splitlines()[0].startswith("phase a: 5/5 it in ")
    assert err.splitlines()[1].startswith("phase b: 3/3 job in ") and len(err.splitlines()) == 2
    assert isinstance(progress(range(2)), LineProgress)   # pytest's stderr is not a terminal


def test_progress_is_tqdm_on_a_terminal(monkeypatch):
    class Tty(io.StringIO):
        def isatty(self):
            return True
    monkeypatch.setattr(sys, "stderr", Tty())
    bar = progress(range(3), desc="x")
    assert not isinstance(bar, LineProgress)
    list(bar)


def _worker(threads, cache, *extra, hashseed="0"):
    env = {**os.environ, "PYTHONHASHSEED": hashseed, "OMP_NUM_THREADS": str(threads)}
    for k in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, str(HERE / "_determinism_worker.py"), str(threads), str(cache), *extra],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


# The smoke expert (nonlocal-vision, fmnist-0-4 fine-tuned from foundation A, seed 0) under
# torch 2.13.0 with the pinned AVX2 kernels. A machine giving another hash trains differently:
# report it with `torch.__config__.show()` and the CPU model.
# Per CPU vendor (suite_helpers.check_recorded): an AMD EPYC VM gives other last bits.
SMOKE_EXPERT_SHA256 = {"GenuineIntel": "7965344e62b60d96be1c089140664db886efc273305d06e9c3f580f812c92d16",
                       "AuthenticAMD": "5693d2713bd620e39bc8abae8b1041ef26b3ee66efb15f83b71bad1efcfe0269"}


@pytest.mark.slow
def test_expert_weights_do_not_depend_on_threads_or_hash_seed(tmp_path):
    from suite_helpers import check_recorded, ensure_data

    ensure_data(["fashion-mnist", "mnist10k", "animal-mnist"])
    h1, cap1 = _worker(1, tmp_path / "c1", hashseed="1")
    h2, cap2 = _worker(2, tmp_path / "c2", hashseed="2")
    assert cap1 == cap2 == "AVX2"
    assert h1 == h2
    import torch
    if torch.__version__.split("+")[0] == "2.13.0":
        check_recorded(h1, SMOKE_EXPERT_SHA256, "smoke expert sha256")
