"""fisher suite: the output ensemble and parameter average against brute force; smoke end to end (slow)."""

import pytest
import torch

from mergelab.experiments import zoo
from mergelab.experiments.suites.fisher import OutputEnsemble, parameter_average
from suite_helpers import ensure_data, reproduce_smoke


def _members(n=3):
    return [zoo.build("mlp", seed=i, in_dim=6, widths=(5,), n_classes=4).eval() for i in range(n)]


def test_output_ensemble_is_log_of_mean_probabilities():
    ms = _members()
    x = torch.randn(7, 6)
    ref = sum(torch.softmax(m(x), -1) for m in ms) / len(ms)
    got = OutputEnsemble(ms)(x)
    torch.testing.assert_close(got.exp(), ref)
    torch.testing.assert_close(got.exp().sum(-1), torch.ones(7))
    # its argmax is the ensemble's vote by mean probability
    assert torch.equal(got.argmax(-1), ref.argmax(-1))


def test_parameter_average_matches_formula_on_every_tensor():
    states = [dict(m.state_dict()) for m in _members()]
    avg = parameter_average(states)
    assert set(avg) == set(states[0])  # heads too: the members solve one task
    for k in avg:
        torch.testing.assert_close(avg[k], sum(s[k] for s in states) / 3)
    w = parameter_average(states[:2], [0.25, 0.75])
    for k in w:
        torch.testing.assert_close(w[k], 0.25 * states[0][k] + 0.75 * states[1][k])


@pytest.mark.slow
def test_fisher_smoke_end_to_end(tmp_path):
    ensure_data(["fashion-mnist", "mnist10k", "animal-mnist"])
    res = reproduce_smoke("fisher", tmp_path / "out")
    assert set(res["experts"]) == {"ensembling", "transfer"}
    methods = {(x["setting"], x["method"]) for x in res["runs"]}
    assert {("ensembling", "average"), ("ensembling", "output_ensemble"), ("transfer", "average"),
            ("transfer", "target_alone")} <= methods
    for x in res["runs"]:
        assert all(0 <= a <= 1 for a in x["acc"].values())
    assert "unlabelled" in res["transfer_protocol"]["target_fisher"]
    for row in res["transfer_seeds"]:
        # the target's Fisher on unlabelled inputs and on its labelled examples, both recorded
        assert set(row["fisher_norm"]) == {"donor", "target_unlabelled", "target_labelled_only"}
        for m in ("average", "fisher", "fisher_normalized", "fisher_labelled_only"):
            if m in row:  # λ chosen on validation: the best of the grid's validation scores
                assert row[m]["val"] == max(row[m]["val_grid"].values())
                assert len(row[m]["val_grid"]) == res["config"]["grid"]
