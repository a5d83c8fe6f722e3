"""Report writer: normalised-accuracy arithmetic, files exist and parse."""
import json
import math

import pytest

from mergelab.experiments import report as R


def test_normalized_accuracy_arithmetic():
    acc = {"a": 0.45, "b": 0.80, "c": 0.30}
    exp = {"a": 0.90, "b": 0.80, "c": 0.60}
    assert R.normalized(acc, exp) == pytest.approx({"a": 0.5, "b": 1.0, "c": 0.5})
    assert R.mean_normalized(acc, exp) == pytest.approx(2.0 / 3.0)
    # a mean of ratios, not a ratio of means
    assert R.mean_normalized(acc, exp) != pytest.approx(sum(acc.values()) / sum(exp.values()))
    # the paper's table: per-task TACT/expert from the VGG rows reproduces its 0.881 within rounding
    expert = [96.9, 96.9, 98.5, 86.5, 93.2, 82.4, 85.0, 95.1]
    tact = [87.0, 92.6, 92.3, 72.2, 74.4, 68.2, 72.9, 89.1]
    m = R.mean_normalized(dict(enumerate(tact)), dict(enumerate(expert)))
    assert abs(m - 0.881) < 0.0015
    assert math.isnan(R.mean_normalized({}, {}))
    assert R.normalized({"a": 0.5}, {"a": 0.0}) == {}


def _fake():
    tasks = ["t1", "t2"]
    runs = []
    for setting in ("local", "two-foundations"):
        for method in ("task_arithmetic", "ties"):
            for corr, f in (("none", 0.5), ("tact", 0.9)):
                runs.append({"setting": setting, "method": method, "alignment": "weight", "correction": corr,
                             "coef": {"lambda": 0.4}, "acc": {"t1": 0.8 * f, "t2": 0.6 * f},
                             "val_acc": {"t1": 0.8 * f, "t2": 0.6 * f}})
    return {
        "suite": "fake", "profile": "smoke", "config": {"x": 1}, "seeds": [0, 1],
        "versions": {"mergelab": "0"}, "splits": {"t1": "abc"}, "tasks": tasks,
        "experts": {"local": {"t1": 0.8, "t2": 0.6}, "two-foundations": {"t1": 0.8, "t2": 0.6}},
        "runs": runs,
        "variance_collapse": [{"setting": "two-foundations", "label": "ties", "sites": ["s1", "s2", "s3"],
                               "ratios": {"merged": [0.9, 0.6, 0.4], "tact": [1.0, 1.0, 0.99]}}],
        "barrier": [{"setting": "no-foundation", "label": "t1", "alignment": a, "alphas": [0, 0.5, 1],
                     "loss": [0.3, l, 0.32], "acc": [0.9, 0.5, 0.9]} for a, l in (("none", 2.0), ("weight", 0.6))],
        "timings": {"total": 1.0}, "notes": ["fake"], "nan_value": float("nan"),
    }


def test_report_files_exist_and_parse(tmp_path):
    paths = R.write_report(_fake(), tmp_path)
    assert set(paths) == {"results", "report", "accuracy", "variance_collapse", "barrier"}
    back = json.loads((tmp_path / "results.json").read_text())
    assert back["nan_value"] is None and back["runs"][0]["acc"]["t1"] == pytest.approx(0.4)
    for k in ("accuracy", "variance_collapse", "barrier"):
        assert paths[k].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "report.md").read_text()
    assert "## Mean normalised accuracy" in md and "two-foundations / tact" in md
    # task_arithmetic + tact row: normalised 0.9 in both settings
    row = [ln for ln in md.splitlines() if ln.startswith("| task_arithmetic | weight |")][0]
    assert row.count("0.900") == 2 and row.count("0.500") == 2
    assert "barrier (max − mean of ends) 1.690" in md


def test_report_without_optional_sections(tmp_path):
    res = _fake()
    del res["variance_collapse"], res["barrier"]
    paths = R.write_report(res, tmp_path)
    assert "barrier" not in paths and not (tmp_path / "barrier.png").exists()
    assert "results" in paths and "report" in paths
