"""mergekit's remaining merge methods against independent float64 references written here from
the papers' and mergekit's documented formulas (numpy, explicit loops), plus identities."""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings, strategies as st

from mergelab.errors import MergelabError
from mergelab.methods import TensorContext, get_method
from mergelab.methods.sparsify import della_probs, della_sparsify

SETTINGS = dict(max_examples=20, deadline=None)


def run(name, tensors, base=None, g=None, m=None, ctx=None):
    spec = get_method(name)
    kw = spec.resolve(g or {}, m if m is not None else [{} for _ in tensors])
    return spec(tensors, base, ctx=ctx or TensorContext(name="layers.0.w", seed=3), **kw)


def close(ours, ref, tol=2e-5):
    ref = np.asarray(ref, dtype=np.float64)
    scale = max(1.0, float(np.abs(ref).max(initial=0.0)))
    assert ours.shape == tuple(ref.shape)
    np.testing.assert_allclose(ours.double().numpy(), ref, rtol=0, atol=tol * scale)


@st.composite
def family(draw, n_min=1, n_max=4, min_numel=4):
    """(base, [experts]) float32 tensors near each other, and the numpy seed used."""
    seed = draw(st.integers(0, 2**31 - 1))
    n = draw(st.integers(n_min, n_max))
    rows = draw(st.integers(1, 9))
    cols = draw(st.integers(max(1, -(-min_numel // rows)), 12))
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(rows, cols))
    experts = [base + rng.normal(scale=draw(st.sampled_from([0.01, 0.3, 1.0])), size=base.shape) for _ in range(n)]
    f = lambda a: torch.tensor(a, dtype=torch.float32)
    return f(base), [f(e) for e in experts]


def np64(t):
    return t.double().numpy()


# ------------------------------------------------------------------ the task-vector combination (reference)

def ref_combine(taus, w, consensus, normalize):
    W = [wi * t for wi, t in zip(w, taus)]
    if not consensus:
        acc = sum(W)
        s = sum(w)
        return acc / s if normalize and abs(s) >= 1e-8 else acc
    S = sum(W)
    out = np.zeros_like(S)
    for idx in np.ndindex(S.shape):
        maj = 1.0 if S[idx] >= 0 else -1.0
        num = den = 0.0
        for wi, x in zip(w, W):
            if np.sign(x[idx]) == maj:
                num += x[idx]
                den += wi
        out[idx] = num / (den if den != 0 else 1.0) if normalize else num
    return out


def ref_breadcrumbs_sparsify(tau, density, gamma, rescale):
    if density >= 1:
        return tau
    n = tau.size
    keep, top = int(density * n), int(gamma * n)
    bot = n - keep - top
    if bot < 0:
        top, bot = top + bot, 0
    a = np.abs(tau).ravel()
    order = np.lexsort((np.arange(n), -a))  # |τ| descending, then flat index ascending
    mask = np.zeros(n)
    mask[order[top:n - bot]] = 1
    out = tau * mask.reshape(tau.shape)
    if rescale:
        before, after = np.abs(tau).sum(), np.abs(out).sum()
        if before >= 1e-8 and after >= 1e-8:
            out = out * before / after
    return out


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@settings(**SETTINGS)
@given(fam=family(min_numel=1), data=st.data())
def test_breadcrumbs_matches_reference(method, fam, data):
    base, xs = fam
    n = len(xs)
    w = data.draw(st.lists(st.sampled_from([0.25, 0.5, 1.0, 1.5]), min_size=n, max_size=n))
    d = data.draw(st.lists(st.sampled_from([0.3, 0.5, 0.9, 1.0]), min_size=n, max_size=n))
    gm = data.draw(st.lists(st.sampled_from([0.0, 0.01, 0.1, 0.3]), min_size=n, max_size=n))
    lam = data.draw(st.sampled_from([1.0, 0.7]))
    normalize, rescale = data.draw(st.booleans()), data.draw(st.booleans())
    out = run(method, xs, base, g={"lambda": lam, "normalize": normalize, "rescale": rescale},
              m=[{"weight": a, "density": b, "gamma": c} for a, b, c in zip(w, d, gm)])
    taus = [ref_breadcrumbs_sparsify(np64(x) - np64(base), di, gi, rescale) for x, di, gi in zip(xs, d, gm)]
    ref = np64(base) + lam * ref_combine(taus, w, method == "breadcrumbs_ties", normalize)
    close(out, ref)


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("rescale", [False, True])
def test_breadcrumbs_of_a_one_entry_tensor_keeps_nothing(method, rescale):
    """⌊density·n⌋ = 0 entries kept (n = 1, density 0.5): the task vector is dropped, as the
    reference says (this used to fail with "rank 0 outside 1..1")."""
    base, xs = torch.tensor([[0.5]]), [torch.tensor([[0.75]]), torch.tensor([[0.25]])]
    out = run(method, xs, base, g={"rescale": rescale}, m=[{"density": 0.5, "gamma": 0.01}, {"density": 1.0}])
    taus = [ref_breadcrumbs_sparsify(np64(xs[0]) - np64(base), 0.5, 0.01, rescale), np64(xs[1]) - np64(base)]
    close(out, np64(base) + ref_combine(taus, [1.0, 1.0], method == "breadcrumbs_ties", False))


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
@pytest.mark.parametrize("rescale", [False, True])
def test_breadcrumbs_streams_with_ties_at_both_cuts(method, rescale):
    # few distinct magnitudes: many ties at both thresholds, consumed in flat order across blocks
    g = torch.Generator().manual_seed(7)
    base = torch.zeros(40, 9)
    xs = [torch.randint(-3, 4, (40, 9), generator=g).float() / 4 for _ in range(2)]
    m = [{"density": 0.4, "gamma": 0.1}, {"density": 0.7, "gamma": 0.05}]
    gp = {"rescale": rescale}
    whole = run(method, xs, base, g=gp, m=m)
    taus = [ref_breadcrumbs_sparsify(np64(x), d["density"], d["gamma"], rescale) for x, d in zip(xs, m)]
    close(whole, ref_combine(taus, [1.0, 1.0], method == "breadcrumbs_ties", False), tol=1e-6)
    for rows in (2, 7):
        assert torch.equal(run_blocked(method, xs, base, rows, g=gp, m=m), whole)


def test_breadcrumbs_keeps_the_documented_band():
    # 100 distinct magnitudes, density 0.9, gamma 0.01: the largest 1 and the smallest 9 go
    base = torch.zeros(100)
    x = torch.arange(1, 101, dtype=torch.float32) * torch.tensor([1.0, -1.0]).repeat(50)
    out = run("breadcrumbs", [x], base, m=[{"density": 0.9, "gamma": 0.01}])
    kept = (out != 0).nonzero().squeeze(1).tolist()
    assert kept == list(range(9, 99))


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce"])
def test_one_model_density_one_is_the_model(method):
    base, x = torch.randn(7, 5), torch.randn(7, 5)
    m = [{}] if method == "sce" else [{"density": 1.0}]
    close(run(method, [x], base, m=m), np64(x), tol=1e-6)


@pytest.mark.parametrize("method", ["breadcrumbs", "della_linear"])
def test_normalized_weights_only_count_relatively(method):
    base, xs = torch.randn(6, 6), [torch.randn(6, 6) for _ in range(3)]
    g = {"normalize": True}
    a = run(method, xs, base, g=g, m=[{"weight": w, "density": 0.6} for w in (1.0, 2.0, 3.0)])
    b = run(method, xs, base, g=g, m=[{"weight": w, "density": 0.6} for w in (0.5, 1.0, 1.5)])
    close(a, np64(b), tol=1e-6)


# ------------------------------------------------------------------ DELLA (random: statistics)

def ref_della_probs(tau, density, eps):
    x = tau.reshape(1, -1) if tau.ndim < 2 else tau
    m = x.shape[1]
    ranks = np.argsort(np.argsort(np.abs(x), axis=1, kind="stable"), axis=1, kind="stable")
    return (density - eps + 2 * eps * ranks / max(m - 1, 1)).reshape(tau.shape)


@settings(**SETTINGS)
@given(fam=family(n_min=1, n_max=1, min_numel=2), d=st.sampled_from([0.3, 0.5, 0.7]),
       e=st.sampled_from([0.05, 0.15, 0.25]))
def test_della_keep_probabilities_follow_rank(fam, d, e):
    base, (x,) = fam
    tau = x - base
    close(della_probs(tau, d, e), ref_della_probs(np64(tau), d, e), tol=1e-6)


@settings(**SETTINGS)
@given(shape=st.sampled_from([(7,), (5, 9), (3, 4, 6), (2, 3, 2, 5), (1, 2049)]), data=st.data())
def test_della_row_ranks_break_ties_by_index(shape, data):
    """The CPU rank path (a NumPy sort of unique keys) equals torch's stable sort: ties (a small
    pool of values, +0.0 and -0.0 among them) ranked by index, rows along dim 1 of any rank."""
    from mergelab.methods.sparsify import _row_ranks

    n = math.prod(shape)
    pool = data.draw(st.lists(st.sampled_from([0.0, -0.0, 1e-45, 0.5, -0.5, 3.0, 1e30]), min_size=1, max_size=4))
    vals = data.draw(st.lists(st.sampled_from(pool) | st.floats(-4, 4, width=32), min_size=n, max_size=n))
    tau = torch.tensor(vals, dtype=torch.float32).reshape(shape)
    x = tau.reshape(1, -1) if tau.dim() < 2 else tau.movedim(1, -1)
    order = torch.sort(x.abs(), dim=-1, stable=True).indices
    want = torch.empty_like(order).scatter_(-1, order, torch.arange(x.shape[-1]).expand_as(order))
    assert torch.equal(_row_ranks(x.abs()), want.float())


def test_della_rescaled_drop_keeps_the_expectation_and_the_density():
    tau = torch.ones(200, 200)  # equal magnitudes: ranks by index, mean probability = density
    d, e = 0.4, 0.15
    out = della_sparsify(tau, d, e, rescale=True, seed=11)
    p = ref_della_probs(np64(tau), d, e)
    kept = (out != 0).double().numpy()
    n = kept.size
    sd_keep = math.sqrt((p * (1 - p)).sum()) / n
    assert abs(kept.mean() - d) < 5 * sd_keep
    sd_mean = math.sqrt(((1 - p) / p).sum()) / n  # Var(keep/p) = (1-p)/p per entry
    assert abs(float(out.double().mean()) - 1.0) < 5 * sd_mean
    # the larger |τ| of a row, the likelier it survives: last vs first column halves
    x = torch.linspace(0.01, 1, 400).repeat(300, 1)
    k = (della_sparsify(x, d, e, rescale=False, seed=5) != 0).double()
    assert k[:, 200:].mean() > k[:, :200].mean() + 0.1


@settings(**SETTINGS)
@given(fam=family(n_min=1, n_max=3), lam=st.sampled_from([1.0, 0.5]))
def test_della_linear_kept_entries_are_rescaled_to_the_l1_norm(fam, lam):
    # mergekit 0.1.5 (sparsify.rescaled_masked_tensor): kept entries times ‖τ‖₁ / ‖m ⊙ τ‖₁ of the
    # whole tensor (not 1/p per entry, the paper's rule: that gives a 3-6 % smaller spread)
    base, xs = fam
    d, e = 0.5, 0.2
    out = run("della_linear", xs[:1], base, g={"lambda": lam}, m=[{"density": d, "epsilon": e}])
    tau = np64(xs[0]) - np64(base)
    kept = np64(out) != np64(base)
    before, after = np.abs(tau).sum(), np.abs(np.where(kept, tau, 0.0)).sum()
    c = before / after if before >= 1e-7 and after >= 1e-7 else 1.0
    close(out, np64(base) + lam * np.where(kept, tau * c, 0.0), tol=2e-5)


def test_della_is_deterministic_per_seed_and_name():
    base, xs = torch.zeros(30, 30), [torch.randn(30, 30), torch.randn(30, 30)]
    m = [{"density": 0.5}, {"density": 0.5}]
    a = run("della", xs, base, m=m, ctx=TensorContext(name="a", seed=1))
    assert torch.equal(a, run("della", xs, base, m=m, ctx=TensorContext(name="a", seed=1)))
    assert not torch.equal(a, run("della", xs, base, m=m, ctx=TensorContext(name="a", seed=2)))
    assert not torch.equal(a, run("della", xs, base, m=m, ctx=TensorContext(name="b", seed=1)))


def test_della_epsilon_must_leave_room():
    with pytest.raises(MergelabError, match="epsilon"):
        run("della", [torch.randn(4, 4)], torch.zeros(4, 4), m=[{"density": 0.1, "epsilon": 0.15}])


# ------------------------------------------------------------------ SCE

def ref_sce(base, xs, topk, var=None):
    D = np.stack([x - base for x in xs])
    if topk < 1:
        var = D.var(axis=0) if var is None else var
        k = int(topk * np.count_nonzero(var))
        mask = np.zeros(var.size)
        if k > 0:
            mask[np.argsort(-var.ravel(), kind="stable")[:k]] = 1
        D = D * mask.reshape(var.shape)
    ms = np.array([(d ** 2).mean() for d in D])
    c = np.full(len(D), 1 / len(D)) if ms.sum() == 0 else ms / ms.sum()
    maj = np.where(D.sum(0) >= 0, 1.0, -1.0)
    num = np.zeros_like(base)
    den = np.zeros_like(base)
    for ci, d in zip(c, D):
        m = np.sign(d) == maj
        num += ci * d * m
        den += ci * m
    return base + num / np.where(den == 0, 1.0, den)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("shape", [(1 << 16,), (96, 33), (4, 5, 6)])
def test_sce_variance_equals_torch_var_bit_for_bit(n, shape):
    from mergelab.methods.select import _sce_var

    g = torch.Generator().manual_seed(n)
    for scale in (1e-3, 1.0, 1e3):
        d = ((torch.randn((n,) + shape, generator=g) * scale).to(torch.bfloat16).float()
             - (torch.randn((n,) + shape, generator=g) * scale).to(torch.bfloat16).float())
        d[..., :3] = 0.0  # equal entries: zero variance
        assert torch.equal(_sce_var(d), d.var(dim=0, unbiased=False))


@settings(**SETTINGS)
@given(fam=family(n_min=1, n_max=4), topk=st.sampled_from([1.0, 0.5, 0.2]))
def test_sce_matches_reference(fam, topk):
    base, xs = fam
    out = run("sce", xs, base, g={"select_topk": topk})
    close(out, ref_sce(np64(base), [np64(x) for x in xs], topk))


@pytest.mark.parametrize("topk", [1.0, 0.3, 0.01])
def test_sce_streams_with_ties_at_the_cut(topk):
    g = torch.Generator().manual_seed(3)
    base = torch.zeros(30, 7)
    xs = [torch.randint(-2, 3, (30, 7), generator=g).float() / 2 for _ in range(3)]  # tied variances
    whole = run("sce", xs, base, g={"select_topk": topk})
    var = torch.stack(xs).var(0, unbiased=False).double().numpy()  # the variances as ranked (float32)
    close(whole, ref_sce(np64(base), [np64(x) for x in xs], topk, var=var), tol=1e-6)
    for rows in (2, 9):
        assert torch.equal(run_blocked("sce", xs, base, rows, g={"select_topk": topk}), whole)


# ------------------------------------------------------------------ model stock

def ref_model_stock(base, xs, filter_wise):
    rows = base.reshape(-1, base.shape[-1]) if (filter_wise and base.ndim >= 2) else base.reshape(1, -1)
    ws = [x.reshape(rows.shape) for x in xs]
    out = np.empty_like(rows)
    n = len(ws)
    for r in range(rows.shape[0]):
        d = [w[r] - rows[r] for w in ws]
        cs = [np.clip(d[i] @ d[j] / max(np.linalg.norm(d[i]) * np.linalg.norm(d[j]), 1e-6), -1, 1)
              for i in range(n) for j in range(i + 1, n)]
        c = np.mean(cs)
        t = 0.0 if abs(1 + (n - 1) * c) < 1e-6 else n * c / (1 + (n - 1) * c)
        out[r] = t * np.mean([w[r] for w in ws], axis=0) + (1 - t) * rows[r]
    return out.reshape(base.shape)


@settings(**SETTINGS)
@given(fam=family(n_min=2, n_max=4), fw=st.booleans())
def test_model_stock_matches_reference(fam, fw):
    base, xs = fam
    # offsets with a positive common part so that 1 + (N-1) cos stays away from 0
    common = torch.randn(base.shape, generator=torch.Generator().manual_seed(0))
    xs = [x + common for x in xs]
    out = run("model_stock", xs, base, g={"filter_wise": fw})
    close(out, ref_model_stock(np64(base), [np64(x) for x in xs], fw), tol=1e-4)


def test_model_stock_two_orthogonal_models_gives_the_base_plus_nothing():
    base = torch.zeros(4)
    out = run("model_stock", [torch.tensor([1.0, 0, 0, 0]), torch.tensor([0, 1.0, 0, 0])], base)
    assert torch.equal(out, base)  # cos = 0 -> t = 0


@pytest.mark.parametrize("fw", [False, True])
def test_model_stock_opposing_offsets_keep_the_base(fw):
    # N = 2 with d_2 = -d_1: cos = -1, 1 + (N-1) cos = 0: no finite t, the base is kept (mergekit)
    base = torch.randn(3, 5, generator=torch.Generator().manual_seed(1))
    d = torch.randn(3, 5, generator=torch.Generator().manual_seed(2))
    out = run("model_stock", [base + d, base - d], base, g={"filter_wise": fw})
    assert torch.isfinite(out).all()
    close(out, np64(base), tol=1e-6)


# ------------------------------------------------------------------ nuslerp / slerp family

def ref_slerp(t, a, b):
    na, nb = max(np.linalg.norm(a), 1e-7), max(np.linalg.norm(b), 1e-7)
    cos = np.clip((a / na) @ (b / nb), -1, 1)
    th = np.arccos(cos)
    if abs(np.sin(th)) < 1e-8:
        return (1 - t) * a + t * b
    return (np.sin((1 - t) * th) * a + np.sin(t * th) * b) / np.sin(th)


@settings(**SETTINGS)
@given(fam=family(n_min=2, n_max=2), w=st.tuples(st.sampled_from([0.2, 1.0, 3.0]), st.sampled_from([0.0, 0.5, 1.0])),
       flatten=st.booleans(), row_wise=st.booleans(), with_base=st.booleans())
def test_nuslerp_matches_reference(fam, w, flatten, row_wise, with_base):
    base, (x0, x1) = fam
    b = base if with_base else None
    out = run("nuslerp", [x0, x1], b, g={"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise},
              m=[{"weight": w[0]}, {"weight": w[1]}])
    t = w[1] / (w[0] + w[1])
    a0, a1 = np64(x0), np64(x1)
    if with_base:
        a0, a1 = a0 - np64(base), a1 - np64(base)
    if flatten:
        ref = ref_slerp(t, a0.ravel(), a1.ravel()).reshape(a0.shape)
    elif row_wise:
        ref = np.stack([ref_slerp(t, a0[:, j], a1[:, j]) for j in range(a0.shape[1])], axis=1)
    else:
        ref = np.stack([ref_slerp(t, a0[i], a1[i]) for i in range(a0.shape[0])])
    if with_base:
        ref = ref + np64(base)
    close(out, ref)


def test_nuslerp_endpoints_and_slerp_agreement():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(5, 7, generator=g), torch.randn(5, 7, generator=g)
    close(run("nuslerp", [a, b], m=[{"weight": 1.0}, {"weight": 0.0}]), np64(a), tol=1e-6)
    close(run("nuslerp", [a, b], m=[{"weight": 0.0}, {"weight": 1.0}]), np64(b), tol=1e-6)
    # weights (1 - t, t) without a base reproduce slerp at t
    close(run("nuslerp", [a, b], m=[{"weight": 0.7}, {"weight": 0.3}]),
          np64(run("slerp", [a, b], g={"t": 0.3}, m=[{}, {}])), tol=1e-5)


# ------------------------------------------------------------------ multislerp

def ref_multislerp(xs, w, base, normalize, eps=1e-8):
    X = [x - base if base is not None else x for x in xs]
    w = np.array(w, dtype=np.float64)
    if normalize:
        w = w / w.sum()
    norms = [np.linalg.norm(x) for x in X]
    U = [x / (n + eps) for x, n in zip(X, norms)]
    mean = sum(wi * u for wi, u in zip(w, U))
    mean = mean / np.linalg.norm(mean)
    tang = sum(wi * (u - np.sum(u * mean) * mean) for wi, u in zip(w, U))
    tn = np.linalg.norm(tang) + eps
    res = (np.cos(tn) * mean + np.sin(tn) / tn * tang) * sum(n * wi for n, wi in zip(norms, w))
    return res + base if base is not None else res


@settings(**SETTINGS)
@given(fam=family(n_min=2, n_max=4), data=st.data())
def test_multislerp_matches_reference(fam, data):
    base, xs = fam
    n = len(xs)
    w = data.draw(st.lists(st.sampled_from([0.5, 1.0, 2.0]), min_size=n, max_size=n))
    with_base, normalize = data.draw(st.booleans()), data.draw(st.booleans())
    b = base if with_base else None
    out = run("multislerp", xs, b, g={"normalize_weights": normalize}, m=[{"weight": x} for x in w])
    close(out, ref_multislerp([np64(x) for x in xs], w, np64(base) if with_base else None, normalize), tol=1e-4)


@pytest.mark.parametrize("method", ["multislerp", "karcher", "nuslerp", "passthrough"])
def test_one_model_is_itself(method):
    x = torch.randn(6, 3)
    assert torch.equal(run(method, [x]), x)


@pytest.mark.parametrize("method", ["multislerp", "karcher"])
def test_identical_models_give_that_model(method):
    x = torch.randn(6, 3)
    close(run(method, [x, x.clone(), x.clone()]), np64(x), tol=1e-6)


# ------------------------------------------------------------------ karcher

def ref_karcher(xs, max_iter=10, tol=1e-5):
    n = len(xs)
    norms = [np.linalg.norm(x) for x in xs]
    units = [x / nm for x, nm in zip(xs, norms)]
    a = [1 / n] * n
    u = sum(ai * ui for ai, ui in zip(a, units))
    u = u / np.linalg.norm(u)
    for _ in range(max_iter):
        T = np.zeros_like(u)
        for ai, ui in zip(a, units):
            dot = np.clip(np.sum(u * ui), -1, 1)
            th = np.arccos(dot)
            if th < tol:
                continue
            T += ai * th / np.sin(th) * (ui - dot * u)
        tn = np.linalg.norm(T)
        if tn < tol:
            break
        u = np.cos(tn) * u + np.sin(tn) * T / tn
        u = u / np.linalg.norm(u)
    return sum(ai * nm for ai, nm in zip(a, norms)) * u


@settings(**SETTINGS)
@given(fam=family(n_min=2, n_max=4))
def test_karcher_matches_reference(fam):
    _, xs = fam
    close(run("karcher", xs), ref_karcher([np64(x) for x in xs]), tol=1e-4)


def test_karcher_of_two_is_the_geodesic_midpoint_times_the_mean_norm():
    a, b = torch.tensor([3.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0])
    out = run("karcher", [a, b])
    close(out, np.array([1, 1, 0]) / math.sqrt(2) * 2.0, tol=1e-6)


# ------------------------------------------------------------------ nearswap / arcee fusion / ram / passthrough

@settings(**SETTINGS)
@given(fam=family(n_min=1, n_max=1), t=st.sampled_from([1e-4, 0.01, 0.5, 10.0]))
def test_nearswap_matches_reference(fam, t):
    base, (x,) = fam
    x = torch.where(torch.rand(x.shape) < 0.2, base, x)  # some equal entries
    b, v = np64(base), np64(x)
    with np.errstate(divide="ignore"):
        w = np.clip(np.where(b == v, 1.0, t / np.abs(b - v)), 0, 1)
    close(run("nearswap", [x], base, g={"t": t}), w * v + (1 - w) * b)


def test_nearswap_needs_positive_t():
    with pytest.raises(MergelabError, match="'t'"):
        run("nearswap", [torch.ones(2)], torch.zeros(2), g={"t": 0.0})


def ref_arcee_fusion(base, x):
    def softmax(a):
        e = np.exp(a - a.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(x) + 1e-8, softmax(base) + 1e-8
    kl = (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    imp = np.abs(x - base) * kl
    flat = np.sort(imp.ravel())
    # mergekit 0.1.5: order statistics at index floor(q (n - 1)), no interpolation
    q1, median, q3 = (flat[int(q * (flat.size - 1))] for q in (0.25, 0.5, 0.75))
    return base + (x - base) * (imp >= median + 1.5 * (q3 - q1))


@pytest.mark.parametrize("n", [4, 5, 7, 10, 101, 1000])
def test_arcee_fusion_quantiles_are_order_statistics(n):
    # mergekit's quantile is sorted[floor(q (n - 1))]: linear interpolation (torch.quantile) would
    # give 2.25 for Q1 of 0..9, mergekit gives 2
    from mergelab.methods.select import fusion_quantile

    x = torch.randperm(n, generator=torch.Generator().manual_seed(n)).float()
    for q in (0.25, 0.5, 0.75):
        assert fusion_quantile(x, q) == float(math.floor(q * (n - 1)))


@settings(**SETTINGS)
@given(fam=family(n_min=1, n_max=1, min_numel=4))
def test_arcee_fusion_matches_reference(fam):
    base, (x,) = fam
    ours = run("arcee_fusion", [x], base)
    ref = ref_arcee_fusion(np64(base), np64(x))
    # entries whose importance sits within float rounding of the threshold may flip
    agree = np.isclose(np64(ours), ref, atol=1e-5).mean()
    assert agree >= 1 - 2 / ref.size


def ref_ram(base, xs, eps, plus=False, r=0.1, alpha=0.2):
    T = [x - base for x in xs]
    nz = [np.abs(t) > eps for t in T]
    cnt = sum(m.astype(int) for m in nz)
    out = base.copy()
    lam = []
    for m in nz:
        shared, unique = int((m & (cnt > 1)).sum()), int((m & (cnt == 1)).sum())
        rho = shared / max(unique, eps)
        lam.append(1 + r * min(max(rho, 0), alpha) if plus else 1.0)
    for idx in np.ndindex(base.shape):
        c = cnt[idx]
        for i, (t, m) in enumerate(zip(T, nz)):
            if m[idx]:
                out[idx] += t[idx] * lam[i] if c == 1 else t[idx] / c
    return out


@pytest.mark.parametrize("method", ["ram", "ramplus_tl"])
@settings(**SETTINGS)
@given(fam=family(n_min=1, n_max=4), eps=st.sampled_from([1e-5, 0.05, 0.5]))
def test_ram_matches_reference(method, fam, eps):
    base, xs = fam
    # sparse task vectors, so that unique and shared changes both occur
    g = torch.Generator().manual_seed(len(xs))
    xs = [torch.where(torch.rand(base.shape, generator=g) < 0.5, base, x) for x in xs]
    ref = ref_ram(np64(base), [np64(x) for x in xs], eps, plus=(method == "ramplus_tl"))
    close(run(method, xs, base, g={"epsilon": eps}), ref)


def test_passthrough_scale():
    x = torch.randn(3, 4)
    close(run("passthrough", [x], m=[{"scale": 0.5}]), np64(x) * 0.5, tol=0)
    with pytest.raises(MergelabError, match="at most 1|exactly 1|1 to 1"):
        run("passthrough", [x, x])


@pytest.mark.parametrize("method", ["nearswap", "ram", "passthrough", "ramplus_tl"])
def test_elementwise_methods_give_the_same_result_on_row_blocks(method):
    g = torch.Generator().manual_seed(9)
    base = torch.randn(10, 6, generator=g)
    xs = [torch.where(torch.rand(10, 6, generator=g) < 0.5, base, base + 0.1 * torch.randn(10, 6, generator=g))
          for _ in range(1 if method in ("nearswap", "passthrough") else 3)]
    gp = {"t": 0.05} if method == "nearswap" else {}
    b = None if method == "passthrough" else base
    whole = run(method, xs, b, g=gp)
    spec = get_method(method)
    assert spec.elementwise
    assert torch.equal(run_blocked(method, xs, b, 3, g=gp), whole)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "model_stock",
                                    "nuslerp", "multislerp", "karcher", "nearswap", "arcee_fusion", "ram",
                                    "ramplus_tl", "passthrough"])
def test_methods_run_on_cuda_like_on_cpu(method):
    g = torch.Generator().manual_seed(2)
    base = torch.randn(64, 48, generator=g)
    n = {"nearswap": 1, "arcee_fusion": 1, "passthrough": 1, "nuslerp": 2}.get(method, 3)
    xs = [base + 0.1 * torch.randn(64, 48, generator=g) for _ in range(n)]
    gp = {"t": 0.05} if method == "nearswap" else {}
    mp = [{"density": 0.5} for _ in xs] if method in ("breadcrumbs", "breadcrumbs_ties", "della", "della_linear") else None
    b = None if method in ("passthrough", "karcher") else base
    cpu = run(method, xs, b, g=gp, m=mp)
    gpu = run(method, [x.cuda() for x in xs], None if b is None else b.cuda(), g=gp, m=mp)
    assert gpu.device.type == "cuda"
    close(gpu.cpu(), np64(cpu), tol=1e-5)


# ------------------------------------------------------------------ streaming of the geometric methods

def run_blocked(name, tensors, base, rows, g=None, m=None):
    """The engine's protocol for elementwise methods with a tensor_prepass, on row blocks."""
    spec = get_method(name)
    kw = spec.resolve(g or {}, m if m is not None else [{} for _ in tensors])
    n0 = tensors[0].shape[0]
    numel = tensors[0].numel()
    per_row = numel // n0

    def blocks():
        for a in range(0, n0, rows):
            yield (TensorContext(name="layers.0.w", seed=3, offset=a * per_row, numel=numel),
                   None if base is None else base[a:a + rows], [t[a:a + rows] for t in tensors])

    state = spec.tensor_prepass(kw, blocks) if spec.tensor_prepass else None
    outs = []
    for ctx, b, ts in blocks():
        ctx.tensor_state = state
        outs.append(spec(ts, b, ctx=ctx, **kw))
    return torch.cat(outs)


@pytest.mark.parametrize("method,g,with_base,exact", [
    ("karcher", {}, False, True),
    ("multislerp", {}, True, True),
    ("multislerp", {"normalize_weights": False}, False, True),
    ("model_stock", {}, True, True),
    ("model_stock", {"filter_wise": True}, True, True),
    ("nuslerp", {}, True, True),
    ("nuslerp", {"nuslerp_flatten": False}, False, True),
    ("nuslerp", {"nuslerp_flatten": False, "nuslerp_row_wise": True}, True, False),
])
@pytest.mark.parametrize("shape", [(37, 11), (300,), (9, 4, 3)])
def test_geometric_methods_stream_in_row_blocks(method, g, with_base, exact, shape):
    gen = torch.Generator().manual_seed(len(shape))
    base = torch.randn(shape, generator=gen)
    n = 2 if method == "nuslerp" else 3
    xs = [base + 0.3 * torch.randn(shape, generator=gen) + 0.2 for _ in range(n)]
    b = base if with_base else None
    spec = get_method(method)
    assert spec.elementwise and spec.tensor_prepass is not None
    whole = run(method, xs, b, g=g)
    for rows in (1, 4, 16):
        got = run_blocked(method, xs, b, rows, g=g)
        if exact:
            assert torch.equal(got, whole), (method, g, shape, rows)
        else:
            close(got, np64(whole), tol=1e-6)


@pytest.mark.parametrize("method", ["della", "della_linear"])
@pytest.mark.parametrize("shape", [(37, 11), (300,), (9, 4, 3)])
def test_della_streams_in_row_blocks(method, shape):
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(shape, generator=gen)
    xs = [base + 0.3 * torch.randn(shape, generator=gen) for _ in range(2)]
    m = [{"density": 0.5, "epsilon": 0.2}, {"density": 0.7, "epsilon": 0.1}]
    whole = run(method, xs, base, m=m)
    assert get_method(method).elementwise
    for rows in (1, 5):
        assert torch.equal(run_blocked(method, xs, base, rows, m=m), whole)


# ------------------------------------------------------------------ tie_break: argsort (mergekit's own order)

def _tied(shape, seed):
    """Task vectors with many equal magnitudes (small integers), as bf16 checkpoints give."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, shape, generator=g).float()


@pytest.mark.parametrize("shape", [(40, 25), (999,)])
def test_breadcrumbs_argsort_keeps_mergekits_sorted_band(shape):
    # mergekit 0.1.5: mask[torch.sort(|τ|).indices[n_bot : n_bot + ⌊d·n⌋]] = 1, the unstable sort's
    # own order among equal magnitudes (torch is deterministic on one build)
    base = torch.zeros(shape)
    xs = [_tied(shape, 1), _tied(shape, 2)]
    d, gamma = [0.5, 0.3], 0.05
    m = [{"density": di} for di in d]
    out = run("breadcrumbs", xs, base, g={"gamma": gamma, "tie_break": "argsort"}, m=m)
    ref = torch.zeros(shape)
    for x, di in zip(xs, d):
        n = x.numel()
        keep, top = int(di * n), int(gamma * n)
        bot = max(0, n - keep - top)
        mask = torch.zeros(n)
        mask[torch.sort(x.abs().reshape(-1), descending=False).indices[bot:bot + keep]] = 1
        ref += x * mask.reshape(shape)
    assert torch.equal(out, ref)
    index = run("breadcrumbs", xs, base, g={"gamma": gamma}, m=m)
    assert not torch.equal(index, ref)  # the ties are real: the two orders differ here
    assert torch.equal(run_blocked("breadcrumbs", xs, base, 7, g={"gamma": gamma, "tie_break": "argsort"}, m=m), out)


def test_sce_argsort_selects_mergekits_topk():
    shape = (30, 20)
    base = torch.zeros(shape)
    xs = [_tied(shape, 3), _tied(shape, 4), _tied(shape, 5)]
    out = run("sce", xs, base, g={"select_topk": 0.3, "tie_break": "argsort"})
    D = torch.stack(xs)
    var = D.var(dim=0, unbiased=False)
    k = int(0.3 * int(torch.count_nonzero(var)))
    mask = torch.zeros(var.numel())
    mask[torch.topk(var.abs().reshape(-1), k=k, largest=True).indices] = 1
    assert not torch.equal(run("sce", xs, base, g={"select_topk": 0.3}), out)  # the ties are real
    Dm = np64(D) * mask.reshape(shape).double().numpy()  # SCE's formula on mergekit's top-k selection
    ms = np.array([(x ** 2).mean() for x in Dm])
    c = ms / ms.sum()
    maj = np.where(Dm.sum(0) >= 0, 1.0, -1.0)
    num = sum(ci * x * (np.sign(x) == maj) for ci, x in zip(c, Dm))
    den = sum(ci * (np.sign(x) == maj) for ci, x in zip(c, Dm))
    close(out, num / np.where(den == 0, 1.0, den), tol=1e-6)
    assert torch.equal(run_blocked("sce", xs, base, 7, g={"select_topk": 0.3, "tie_break": "argsort"}), out)
