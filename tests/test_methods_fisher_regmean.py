"""Fisher merging and RegMean against brute-force references, plus the coefficient search."""
import math

import numpy as np
import pytest
import torch

from mergelab.errors import MergelabError
from mergelab.methods import TensorContext, get_method
from mergelab.methods.fisher import fisher_merge, fisher_prepass
from mergelab.methods.regmean import regmean_merge
from mergelab.methods.search import coefficient_search, dirichlet_samples, pairwise_grid


def states_and_fishers(n_models=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    shapes = {"enc.weight": (6, 4), "enc.bias": (6,), "head.weight": (2, 6)}
    states = [{k: torch.randn(s, generator=g) for k, s in shapes.items()} for _ in range(n_models)]
    fishers = [{k: torch.rand(s, generator=g) ** 2 for k, s in shapes.items()} for _ in range(n_models)]
    return states, fishers


# ------------------------------------------------------------------ Fisher

def test_fisher_equal_fishers_is_linear():
    states, fishers = states_and_fishers()
    same = [fishers[0]] * 3
    ws = [0.2, 0.3, 0.5]
    out = fisher_merge(states, same, weights=ws)
    lin = get_method("linear")
    for k in states[0]:
        ref = lin([s[k] for s in states], None, **lin.resolve({}, [{"weight": w} for w in ws]))
        torch.testing.assert_close(out[k], ref, rtol=1e-5, atol=1e-6)


def test_fisher_one_model_returns_it():
    states, fishers = states_and_fishers(1)
    out = fisher_merge(states, fishers)
    for k in states[0]:
        torch.testing.assert_close(out[k], states[0][k], rtol=1e-6, atol=0)


def test_fisher_floor_keeps_all_zero_fishers_finite():
    states, fishers = states_and_fishers(2)
    zeros = [{k: torch.zeros_like(v) for k, v in f.items()} for f in fishers]
    out = fisher_merge(states, zeros)
    for k in states[0]:
        assert torch.isfinite(out[k]).all()
        torch.testing.assert_close(out[k], (states[0][k] + states[1][k]) / 2)


def test_fisher_favor_target():
    states, fishers = states_and_fishers(2)
    k = "enc.weight"
    fishers[0][k][0, 0] = 0.0
    fishers[1][k][0, 0] = 0.0  # no information anywhere: the target's value
    fishers[0][k][0, 1] = 0.0  # only the donor knows: (nearly) the donor's value
    out = fisher_merge(states, fishers, favor_target=True)
    assert out[k][0, 0] == states[0][k][0, 0]
    torch.testing.assert_close(out[k][0, 1], states[1][k][0, 1], rtol=1e-4, atol=1e-4)
    # without favor_target every model is floored: all-zero entries are averaged
    out = fisher_merge(states, fishers)
    torch.testing.assert_close(out[k][0, 0], (states[0][k][0, 0] + states[1][k][0, 0]) / 2)


@pytest.mark.parametrize("normalize", [False, True])
def test_fisher_matches_elementwise_brute_force(normalize):
    states, fishers = states_and_fishers(3, seed=4)
    ws, floor = [0.5, 1.0, 2.0], 1e-3
    out = fisher_merge(states, fishers, weights=ws, floor=floor, normalize=normalize)
    coeffs = list(ws)
    if normalize:  # λ_i / ‖F_i‖₂ over all merged entries, before flooring
        norms = [math.sqrt(sum(float(v) ** 2 for t in f.values() for v in t.flatten())) for f in fishers]
        coeffs = [w / n for w, n in zip(ws, norms)]
    for k in states[0]:
        flat = [s[k].flatten().tolist() for s in states]
        fl = [f[k].flatten().tolist() for f in fishers]
        ref = []
        for j in range(len(flat[0])):
            num = sum(c * max(fl[i][j], floor) * flat[i][j] for i, c in enumerate(coeffs))
            den = sum(c * max(fl[i][j], floor) for i, c in enumerate(coeffs))
            ref.append(num / den)
        torch.testing.assert_close(out[k].flatten(), torch.tensor(ref), rtol=1e-5, atol=1e-6)


def test_fisher_method_through_registry_and_prepass():
    states, fishers = states_and_fishers(2, seed=2)
    spec = get_method("fisher")
    kw = spec.resolve({"normalize": True}, [{"fisher": "a.safetensors"}, {"fisher": "b.safetensors"}])
    stream = [(TensorContext(name=k, stats={"fisher": [f[k] for f in fishers]}), None, [s[k] for s in states])
              for k in states[0]]
    norms = fisher_prepass(kw, stream)
    for i in range(2):
        assert norms[i] == pytest.approx(math.sqrt(sum(float((f ** 2).sum()) for f in fishers[i].values())))
    ref = fisher_merge(states, fishers, normalize=True)
    for k in states[0]:
        ctx = TensorContext(name=k, prepass=norms, stats={"fisher": [f[k] for f in fishers]})
        torch.testing.assert_close(spec([s[k] for s in states], None, ctx=ctx, **kw), ref[k])
    # a name with no Fisher in some file (a buffer) is averaged with the weights
    kw = spec.resolve({}, [{"weight": 1.0, "fisher": "a"}, {"weight": 3.0, "fisher": "b"}])
    ctx = TensorContext(name="buf", stats={"fisher": [None, None]})
    out = spec([torch.zeros(3), torch.ones(3) * 4], None, ctx=ctx, **kw)
    torch.testing.assert_close(out, torch.full((3,), 3.0))
    # the stats key is required per model, and the prepass reads nothing without normalize
    with pytest.raises(MergelabError, match="needs a 'fisher' statistics file"):
        spec.resolve({}, [{}])
    assert fisher_prepass({"normalize": False}, None) is None


def test_fisher_state_merge_copies_integer_buffers_and_keeps_dtype():
    states, fishers = states_and_fishers(2)
    for s in states:
        s["pos_ids"] = torch.arange(5)
        s["half"] = torch.randn(3).half()
    out = fisher_merge(states, fishers)
    assert torch.equal(out["pos_ids"], torch.arange(5)) and out["half"].dtype == torch.float16


def test_fisher_errors():
    states, fishers = states_and_fishers(2)
    with pytest.raises(MergelabError, match="2 states but 1 Fisher"):
        fisher_merge(states, fishers[:1])
    with pytest.raises(MergelabError, match="at least one positive weight"):
        fisher_merge(states, fishers, weights=[0.0, 0.0])
    with pytest.raises(MergelabError, match=r"must be in \(0, inf\)"):
        fisher_merge(states, fishers, floor=0.0)


# ------------------------------------------------------------------ RegMean

def random_layer_data(n_models=3, d_in=5, d_out=4, seed=0):
    rng = np.random.default_rng(seed)
    ws = [rng.normal(size=(d_out, d_in)) for _ in range(n_models)]
    xs = [rng.normal(size=(20 + 7 * i, d_in)) @ rng.normal(size=(d_in, d_in)) for i in range(n_models)]
    return ws, xs


def test_regmean_identical_grams_alpha_one_is_average():
    ws, xs = random_layer_data()
    g = torch.tensor(xs[0].T @ xs[0])
    states = [{"l.weight": torch.tensor(w, dtype=torch.float32)} for w in ws]
    out = regmean_merge(states, [{"l.weight": g}] * 3, alpha=1.0)
    torch.testing.assert_close(out["l.weight"], sum(s["l.weight"] for s in states) / 3, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("alpha", [1.0, 0.9, 0.3])
def test_regmean_matches_least_squares(alpha):
    """min_W Σ_i ‖X_i Wᵀ − X_i W_iᵀ‖²  (plus, for α < 1, the shrinkage rows) solved by lstsq."""
    ws, xs = random_layer_data(seed=1)
    rows, targets = [], []
    for w, x in zip(ws, xs):
        gdiag = np.diag(x.T @ x)
        rows.append(math.sqrt(alpha) * x)
        targets.append(math.sqrt(alpha) * x @ w.T)
        # G̃ = αXᵀX + (1−α)diag(XᵀX) = X̃ᵀX̃ with the extra rows sqrt((1−α) G_jj) e_j
        d = np.diag(np.sqrt((1 - alpha) * gdiag))
        rows.append(d)
        targets.append(d @ w.T)
    sol, *_ = np.linalg.lstsq(np.vstack(rows), np.vstack(targets), rcond=None)
    states = [{"l.weight": torch.tensor(w, dtype=torch.float32), "l.bias": torch.full((4,), float(i))}
              for i, w in enumerate(ws)]
    grams = [{"l.weight": torch.tensor(x.T @ x)} for x in xs]
    out = regmean_merge(states, grams, alpha=alpha)
    torch.testing.assert_close(out["l.weight"], torch.tensor(sol.T, dtype=torch.float32), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(out["l.bias"], torch.full((4,), 1.0))  # no Gram: averaged


def test_regmean_dead_input_features_take_the_average_column():
    ws, xs = random_layer_data(seed=2)
    xs = [x.copy() for x in xs]
    for x in xs:
        x[:, 2] = 0.0
    states = [{"l.weight": torch.tensor(w, dtype=torch.float32)} for w in ws]
    out = regmean_merge(states, [{"l.weight": torch.tensor(x.T @ x)} for x in xs])
    assert torch.isfinite(out["l.weight"]).all()
    torch.testing.assert_close(out["l.weight"][:, 2], sum(s["l.weight"][:, 2] for s in states) / 3)


def test_regmean_method_normalize_gram_and_conv_weights():
    ws, xs = random_layer_data(n_models=2, d_in=12, seed=3)
    spec = get_method("regmean")
    grams = [torch.tensor(x.T @ x) for x in xs]
    counts = [float(x.shape[0]) for x in xs]
    conv = [torch.tensor(w, dtype=torch.float32).reshape(4, 3, 2, 2) for w in ws]
    kw = spec.resolve({"normalize_gram": True}, [{"gram": "a"}, {"gram": "b"}])
    ctx = TensorContext(name="conv.weight", stats={"gram": grams, "gram_count": counts})
    out = spec(conv, None, ctx=ctx, **kw)
    ref = regmean_merge([{"w": torch.tensor(w, dtype=torch.float32)} for w in ws],
                        [{"w": g / c} for g, c in zip(grams, counts)])["w"]
    assert out.shape == (4, 3, 2, 2)
    torch.testing.assert_close(out.reshape(4, 12), ref)
    with pytest.raises(MergelabError, match="normalize_gram needs the row count"):
        spec(conv, None, ctx=TensorContext(name="c", stats={"gram": grams}), **kw)
    with pytest.raises(MergelabError, match=r"Gram of model 0 has shape \(12, 12\), expected \(5, 5\)"):
        spec([torch.zeros(4, 5)] * 2, None, ctx=TensorContext(name="c", stats={"gram": grams}),
             **spec.resolve({}, [{"gram": "a"}, {"gram": "b"}]))


# ------------------------------------------------------------------ coefficient search

def test_pairwise_grid_is_the_51_pairs():
    grid = pairwise_grid()
    assert len(grid) == 51 and grid[0] == (1.0, 0.0) and grid[-1] == (0.0, 1.0)
    assert all(abs(a + b - 1) < 1e-12 for a, b in grid)
    assert sorted(round(a, 10) for a, _ in grid) == [round(i * 0.02, 10) for i in range(51)]


def test_coefficient_search_two_models_finds_the_best_pair():
    a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    target = torch.tensor([0.3, 0.7])
    res = coefficient_search(lambda c: c[0] * a + c[1] * b, 2, lambda m: -float((m - target).norm()))
    assert len(res.table) == 51
    assert res.best_coefficients == pytest.approx((0.3, 0.7))
    scores = [s for _, s in res.table]
    assert scores == sorted(scores, reverse=True)


def test_coefficient_search_dirichlet_for_more_models():
    calls = []
    res = coefficient_search(lambda c: calls.append(c) or c, 3, lambda c: c[2], n_samples=20, seed=3)
    assert len(res.table) == 20 and len(calls) == 20
    assert all(abs(sum(c) - 1) < 1e-9 and min(c) >= 0 for c, _ in res.table)
    assert res.best_score == max(c[2] for c in calls)
    assert dirichlet_samples(3, 20, seed=3) == calls  # deterministic given the seed
    res = coefficient_search(lambda c: c, 3, lambda c: c[0], grid=[(1, 0, 0), (0, 1, 0)], maximize=False)
    assert res.best_coefficients == (0.0, 1.0, 0.0)
    with pytest.raises(MergelabError, match="has 2 values, expected 3"):
        coefficient_search(lambda c: c, 3, lambda c: 0.0, grid=[(0.5, 0.5)])
