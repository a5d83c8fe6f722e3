"""fisher suite, robust fine-tuning part: nearest-centroid accuracy against brute force, the
paired Fisher − average table against a hand computation, a tiny end-to-end path (slow)."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from mergelab.experiments.report import robust_table
from mergelab.experiments.suites.fisher_robust import nearest_centroid_accuracy, run_robust


class _Identity(nn.Module):
    def features(self, x):
        return x


def test_nearest_centroid_matches_brute_force():
    rng = np.random.default_rng(0)
    xtr = rng.normal(size=(60, 5)).astype(np.float32)
    ytr = rng.integers(0, 3, 60)
    xte = rng.normal(size=(25, 5)).astype(np.float32)
    yte = rng.integers(0, 3, 25)
    unit = lambda a: a / np.linalg.norm(a, axis=-1, keepdims=True)  # noqa: E731
    cent = np.stack([unit(unit(xtr)[ytr == c].mean(0)) for c in range(3)])
    pred = np.argmax(unit(xte) @ cent.T, 1)
    ref = float((pred == yte).mean())
    batches = lambda x, y: [(torch.tensor(x[i:i + 7]), torch.tensor(y[i:i + 7])) for i in range(0, len(y), 7)]  # noqa: E731
    got = nearest_centroid_accuracy(_Identity(), batches(xtr, ytr), batches(xte, yte))
    assert got == pytest.approx(ref, abs=1e-7)


def test_robust_table_pairs_seeds():
    def row(avg, fis):
        return [{"lambdas": [0.0, 0.5], "pretrained": {"a": 0.5}, "finetuned": {"a": 0.9},
                 "average": [{"a": 0.5}, {"a": avg}], "fisher": [{"a": 0.5}, {"a": fis}]}]
    res = {"seeds": {"list": [0, 1, 2], "n": 3, "interval": "x", "per_seed": []},
           "per_seed": {"robust_seeds": [row(0.70, 0.72), row(0.80, 0.81), row(0.60, 0.66)]}}
    table = robust_table(res)
    d = [0.02, 0.01, 0.06]
    m = sum(d) / 3
    s = math.sqrt(sum((x - m) ** 2 for x in d) / 2)
    h = 4.302652729911275 * s / math.sqrt(3)   # t(0.975, 2)
    last = table.splitlines()[-1]
    assert last.startswith("| 0.5 |")
    assert f"{100 * m:.1f} ± {100 * h:.1f}" in last
    assert "70.0 ± " in last and "73.0 ± " in last  # the means of the average and Fisher columns


@pytest.mark.slow
def test_robust_path_ends_are_the_two_models(tmp_path):
    from suite_helpers import ensure_data

    from mergelab.experiments import train as T
    from mergelab.experiments.suites.common import Timer

    ensure_data(["rotten-tomatoes", "orange-text"])
    rp = dict(task="rt-sentiment", heldout="20newsgroups", max_len=16, first_trainable=5,
              probe_steps=3, probe_lr=3e-3, steps=4, lr=2e-4, batch=8,
              train_limit=48, val_limit=16, test_limit=24, heldout_train=40, heldout_test=20,
              fisher_examples=8, stat_batch=8, lambdas=[0.0, 0.5, 1.0])
    res = {"experts": {}, "runs": [], "n_classes": {}}
    run_robust(res, rp, True, 0, T.ExpertCache(tmp_path), Timer())
    row = res["robust_seeds"][0]
    assert row["average"][0] == row["fisher"][0] == row["pretrained"]
    assert row["average"][-1] == row["fisher"][-1] == row["finetuned"]
    assert res["experts"]["robust"] == {"rt-sentiment": row["finetuned"]["rt-sentiment"],
                                        "20newsgroups-nc": row["pretrained"]["20newsgroups-nc"]}
    assert [r["method"] for r in res["runs"]] == ["pretrained", "finetuned", "average λ=0.5", "fisher λ=0.5"]
    assert res["n_classes"] == {"rt-sentiment": 2, "20newsgroups-nc": 20}
    assert all(v > 0 for v in row["fisher_norm"].values())
