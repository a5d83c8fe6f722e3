"""Suites: CLI errors, the merge helper against a brute-force formula, smoke end to end (slow)."""
import json
import subprocess
import sys

import pytest
import torch

from mergelab.experiments.suites.common import choose
from suite_helpers import ensure_data, reproduce_smoke, results_digest

# Every accuracy of `mergelab reproduce nonlocal-vision --profile smoke` (seed 0) under torch
# 2.13.0 with the pinned AVX2 kernels and one thread (experiments/determinism.py). Another
# machine giving another digest does not reproduce the numbers: compare its results.json.
NLV_SMOKE_DIGEST = "51e003adf0abcb7815370886a2eef4036d4dee7979408e6766bf8db94924bc2b"


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "mergelab", *args], capture_output=True, text=True)


def test_reproduce_unknown_suite_is_one_line_error():
    r = _cli("reproduce", "nope")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: unknown suite 'nope' (known: nonlocal-vision, local-text, fisher, pretrained-vision)"]


def test_choose_picks_best_first_on_ties():
    best, scores = choose([0.1, 0.2, 0.3, 0.4], lambda c: {0.1: 0.5, 0.2: 0.7, 0.3: 0.7, 0.4: 0.6}[c])
    assert best == 0.2 and scores == {"0.1": 0.5, "0.2": 0.7, "0.3": 0.7, "0.4": 0.6}


def test_merge_state_task_arithmetic_matches_formula():
    from mergelab.experiments.suites.common import merge_state
    base = {"a.weight": torch.randn(3, 4), "head.weight": torch.randn(2, 3)}
    ex = [{k: v + torch.randn_like(v) for k, v in base.items()} for _ in range(3)]
    out = merge_state("task_arithmetic", base, ex, {"lambda": 0.4})
    assert set(out) == {"a.weight"}
    ref = base["a.weight"] + 0.4 * sum(e["a.weight"] - base["a.weight"] for e in ex)
    torch.testing.assert_close(out["a.weight"], ref)


@pytest.mark.slow
def test_nonlocal_vision_smoke_end_to_end(tmp_path, monkeypatch):
    ensure_data()
    out = tmp_path / "out"
    res = reproduce_smoke("nonlocal-vision", out)
    assert set(res["experts"]) == {"local", "two-foundations", "no-foundation"}
    assert all(0 <= a <= 1 for s in res["experts"].values() for a in s.values())
    for run in res["runs"]:
        assert set(run["acc"]) == set(res["tasks"])
    # every setting x method x alignment x correction of the profile ran (nothing skipped)
    cfg = res["config"]
    want = {(s, m, a, c) for s in cfg["settings"] for m in cfg["methods"]
            for a in (["none"] if s == "local" else cfg["alignments"]) for c in cfg["corrections"]}
    assert {(r["setting"], r["method"], r["alignment"], r["correction"]) for r in res["runs"]} == want
    assert res["notes"] == []
    assert {b["alignment"] for b in res["barrier"]} == {"none", *cfg["alignments"]}
    assert all(set(v["ratios"]) == set(cfg["corrections"]) for v in res["variance_collapse"])
    # a second run hits the expert cache (no training)
    r2 = _cli("reproduce", "nonlocal-vision", "--profile", "smoke", "--out", str(out), "--quiet")
    assert r2.returncode == 0, r2.stderr
    res2 = json.loads((out / "results.json").read_text())
    assert res2["cache"]["misses"] == 0 and res2["cache"]["hits"] > 0
    assert res2["experts"] == res["experts"]
    assert results_digest(res2) == results_digest(res)
    if torch.__version__.split("+")[0] == "2.13.0":
        assert res["versions"]["cpu_capability"] == "AVX2"
        assert results_digest(res) == NLV_SMOKE_DIGEST


def test_timer_records_wall_and_cpu_seconds_per_phase():
    import time

    from mergelab.experiments.suites.common import Timer
    t = Timer()
    with t("sleep"):
        time.sleep(0.2)  # wall time, almost no CPU
    with t("sleep"):
        time.sleep(0.1)
    assert set(t.t) == set(t.cpu) == {"sleep"}
    assert t.t["sleep"] >= 0.29 and t.cpu["sleep"] < 0.1
