"""TIES, DARE, TALL masks and consensus against elementwise brute-force references."""

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mergelab.errors import MergelabError
from mergelab.methods import TensorContext, get_method
from mergelab.methods import sparse
from mergelab.methods.sparse import global_ties_prepass, kth_largest, trim_mask


def run(name, tensors, base, g=None, m=None, ctx=None):
    spec = get_method(name)
    kw = spec.resolve(g or {}, m if m is not None else [{} for _ in tensors])
    return spec(tensors, base, ctx=ctx or TensorContext(name="layer.weight", seed=0), **kw)


def same_bytes(a, b):
    return a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


# dyadic values: every sum below is exact in float32, so references compare exactly
def dyadic_tensor(draw, n):
    return torch.tensor(draw(st.lists(st.integers(-6, 6), min_size=n, max_size=n)), dtype=torch.float32) / 4


# ------------------------------------------------------------------ identities

@pytest.mark.parametrize("method", ["ties", "dare_linear", "dare_ties"])
def test_one_model_density_one_is_base_plus_task_vector(method):
    base, x = torch.randn(33, 7), torch.randn(33, 7)
    assert same_bytes(run(method, [x], base, m=[{"density": 1.0}]), base + (x - base))


def test_ties_global_density_one_is_base_plus_task_vector():
    base, x = torch.randn(20), torch.randn(20)
    spec = get_method("ties")
    kw = spec.resolve({"scope": "global"}, [{}])
    prep = global_ties_prepass(kw, [(TensorContext(name="w"), base, [x])])
    out = spec([x], base, ctx=TensorContext(name="w", prepass=prep), **kw)
    assert same_bytes(out, base + (x - base))


# ------------------------------------------------------------------ radix select and trim

@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_kth_largest_is_exact(data):
    n = data.draw(st.integers(1, 300))
    vals = data.draw(st.lists(st.floats(0, 1e6, width=32), min_size=n, max_size=n))
    x = torch.tensor(vals, dtype=torch.float32)
    rank = data.draw(st.integers(1, n))
    chunks = lambda: iter(x.split(17))
    assert kth_largest(chunks, rank) == float(torch.kthvalue(x, n - rank + 1).values)


_EXTREMES = [0.0, 1e-45, 1.17549435e-38, 3.4028235e38, 1.0, 65504.0]  # zero, subnormal, tiny, max


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_kth_largest_many_one_pass_window_is_exact(data):
    """With the streams' lengths (the one-pass window of the first chunk's estimate, else the
    second pass): the same value and count of greater values as torch.kthvalue, on values
    with many ties, zeros, subnormals and the float32 extremes, for any chunking and any
    batch of counted bins, also when the first chunk misleads the estimate (another scale
    than the rest)."""
    S = data.draw(st.integers(1, 3))
    xs, ranks = [], []
    for _ in range(S):
        n = data.draw(st.integers(1, 400))
        pool = data.draw(st.lists(st.one_of(st.sampled_from(_EXTREMES), st.floats(0, 1e6, width=32)),
                                  min_size=1, max_size=8))   # a small pool: ties everywhere
        vals = data.draw(st.lists(st.sampled_from(pool) | st.floats(0, 10, width=32), min_size=n, max_size=n))
        x = torch.tensor(vals, dtype=torch.float32)
        if data.draw(st.booleans()):
            x[: max(1, n // 5)] *= 1e-3   # the first chunk on another scale: the window misses
        xs.append(x)
        ranks.append(data.draw(st.none() | st.integers(1, n)))
    step = data.draw(st.integers(1, 97))
    chunked = [list(x.split(step)) for x in xs]
    nchunks = max(len(c) for c in chunked)

    def chunks():
        for j in range(nchunks):
            yield [c[j] if j < len(c) else torch.empty(0) for c in chunked]

    batch = sparse.KEY_BATCH  # window bins counted every few values (the engine: every 2^20)
    sparse.KEY_BATCH = data.draw(st.integers(1, 500))
    try:
        got = sparse.kth_largest_many(chunks, ranks, [x.numel() for x in xs])
    finally:
        sparse.KEY_BATCH = batch
    two = sparse.kth_largest_many(chunks, ranks)
    for x, r, g, t in zip(xs, ranks, got, two):
        if r is None:
            assert g is None
            continue
        v = float(torch.kthvalue(x, x.numel() - r + 1).values)
        assert g == t == (v, int((x > v).sum())), (g, t, v)


@pytest.mark.parametrize("mislead", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_kth_largest_many_on_engine_sized_chunks_is_exact(seed, mislead):
    """The one-pass window on chunks of the engine's size (2^18 values and more, mixed with
    smaller ones): exact, with ties, zeros, subnormals and extremes."""
    g = torch.Generator().manual_seed(seed)
    n = 3 * (1 << 18) + 12345
    pool = torch.tensor(_EXTREMES + [0.5, 0.25, 2.0], dtype=torch.float32)
    x = torch.where(torch.rand(n, generator=g) < 0.3, pool[torch.randint(0, pool.numel(), (n,), generator=g)],
                    torch.rand(n, generator=g).to(torch.bfloat16).float())
    if mislead:
        x[: 1 << 18] *= 1e-3   # the first chunk on another scale: the window misses, second pass
    y = x[: (1 << 18) + 7].flip(0).contiguous()  # a second stream: one big chunk, then a small one
    sizes = [(1 << 18), (1 << 18) + 7, 1 << 17]

    def chunks():
        a = 0
        for k in range(6):
            step = sizes[k % 3]
            yield [x[a:a + step], y[a:a + step] if a < y.numel() else torch.empty(0)]
            a += step
        yield [x[a:], torch.empty(0)]

    for ranks in ([1, 1], [n // 2, y.numel() // 3], [n, y.numel()], [12345, 77]):
        got = sparse.kth_largest_many(chunks, ranks, [n, y.numel()])
        for v, r, (val, greater) in zip((x, y), ranks, got):
            want = float(torch.kthvalue(v, v.numel() - r + 1).values)
            assert (val, greater) == (want, int((v > want).sum()))


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_trim_keeps_exactly_floor_k_n_largest(data):
    n = data.draw(st.integers(1, 60))
    tau = dyadic_tensor(data.draw, n)
    d = data.draw(st.floats(0.01, 1.0))
    mask = trim_mask(tau, d)
    k = n if d >= 1 else max(1, int(d * n))  # mergekit keeps at least one entry
    assert int(mask.sum()) == k
    # brute force: order by (-|τ|, index) and keep the first k
    order = sorted(range(n), key=lambda j: (-abs(float(tau[j])), j))
    assert set(torch.nonzero(mask).flatten().tolist()) == set(order[:k])


# ------------------------------------------------------------------ TIES vs brute force

def ties_reference(xs, base, ws, ds, lam, normalize, majority, thresholds=None, zero_sign=1.0):
    """TIES written entry by entry."""
    n = base.numel()
    b = base.flatten().tolist()
    taus = [[float(v) for v in (x.flatten() - base.flatten())] for x in xs]
    trimmed = []
    for i, tau in enumerate(taus):
        if thresholds is not None:
            keep = set(range(n)) if thresholds[i] is None else {j for j in range(n) if abs(tau[j]) >= thresholds[i]}
        else:
            k = n if ds[i] >= 1 else max(1, int(ds[i] * n))
            keep = set(sorted(range(n), key=lambda j: (-abs(tau[j]), j))[:k])
        trimmed.append([ws[i] * tau[j] if j in keep else 0.0 for j in range(n)])
    out = []
    sgn = lambda v: (v > 0) - (v < 0)
    for j in range(n):
        col = [t[j] for t in trimmed]
        s = sum(col) if majority == "mass" else sum(sgn(v) for v in col)
        gamma = sgn(s) if s != 0 else zero_sign
        num = den = 0.0
        for i, v in enumerate(col):
            if v != 0 and sgn(v) == gamma:
                num += v
                den += ws[i]
        if normalize:
            num = num / (den if den != 0 else 1.0)
        out.append(b[j] + lam * num)
    return torch.tensor(out).reshape(base.shape)


@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_ties_matches_elementwise_reference(data):
    n_models = data.draw(st.integers(1, 4))
    n = data.draw(st.integers(1, 40))
    base = dyadic_tensor(data.draw, n)
    xs = [base + dyadic_tensor(data.draw, n) for _ in range(n_models)]
    ws = data.draw(st.lists(st.sampled_from([0.5, 1.0, 2.0, -1.0]), min_size=n_models, max_size=n_models))
    ds = data.draw(st.lists(st.sampled_from([0.1, 0.3, 0.5, 0.8, 1.0]), min_size=n_models, max_size=n_models))
    lam = data.draw(st.sampled_from([0.5, 1.0, 1.5]))
    normalize = data.draw(st.booleans())
    majority = data.draw(st.sampled_from(["mass", "frequency"]))
    out = run("ties", xs, base, g={"lambda": lam, "normalize": normalize, "majority": majority},
              m=[{"weight": w, "density": d} for w, d in zip(ws, ds)])
    ref = ties_reference(xs, base, ws, ds, lam, normalize, majority)
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=1e-6)


def test_ties_merge_key_selects_dis_mean_or_dis_sum():
    base = torch.zeros(4)
    xs = [torch.tensor([1.0, 2.0, -1.0, 0.5]), torch.tensor([3.0, -1.0, -3.0, 0.0])]
    mean = run("ties", xs, base, g={"merge": "mean", "normalize": False})
    summ = run("ties", xs, base, g={"merge": "sum", "normalize": True})
    torch.testing.assert_close(mean, torch.tensor([2.0, 2.0, -2.0, 0.5]))
    torch.testing.assert_close(summ, torch.tensor([4.0, 2.0, -4.0, 0.5]))


def fake_model(n_models, shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    bases = [torch.randn(s, generator=g) for s in shapes]
    models = [[b + torch.randn(b.shape, generator=g) * (i + 1) for b in bases] for i in range(n_models)]
    return bases, models


def stream_of(bases, models):
    return [(TensorContext(name=f"t{j}"), b, [m[j] for m in models]) for j, b in enumerate(bases)]


def test_global_threshold_is_exact_kth_magnitude_of_the_whole_model():
    shapes = [(30, 20), (7,), (3, 5, 4), (1,)]
    bases, models = fake_model(3, shapes)
    ds = [0.2, 0.5, 0.05]
    params = {"scope": "global", "density": ds, "weight": [1.0, 1.0, 1.0], "majority": "mass"}
    prep = global_ties_prepass(params, stream_of(bases, models))
    for i, d in enumerate(ds):
        cat = torch.cat([(x - b).abs().flatten() for x, b in zip(models[i], bases)])
        n = cat.numel()
        ref = torch.kthvalue(cat, n - int(n * d)).values  # the TIES reference's k-th value
        assert prep["thresholds"][i] == float(ref)
    # a one-shot iterator gives the same answer (materialised, with a warning)
    with pytest.warns(UserWarning, match="one-shot"):
        prep2 = global_ties_prepass(params, iter(stream_of(bases, models)))
    assert prep2 == prep
    # per_tensor scope reads nothing
    assert global_ties_prepass({**params, "scope": "per_tensor"}, None) is None


def test_ties_global_scope_matches_reference_and_zero_sign_rule():
    shapes = [(12, 5), (9,)]
    bases, models = fake_model(2, shapes, seed=3)
    # one entry whose trimmed deltas cancel exactly: resolved by the model-wide majority sign
    models[0][1][0] = bases[1][0] + 50.0
    models[1][1][0] = bases[1][0] - 50.0
    spec = get_method("ties")
    kw = spec.resolve({"scope": "global", "density": 0.3, "merge": "sum"}, [{}, {}])
    prep = global_ties_prepass(kw, stream_of(bases, models))
    # brute-force zero sign: sign of Σ_j sign(Σ_t τ̂_t^j) over the whole model
    tot = 0.0
    for j, b in enumerate(bases):
        tr = [torch.where((m[j] - b).abs() >= prep["thresholds"][i], m[j] - b, 0.0) for i, m in enumerate(models)]
        tot += float(torch.sign(tr[0] + tr[1]).sum())
    assert prep["zero_sign"] == (1.0 if tot > 0 else -1.0 if tot < 0 else 0.0)
    for j, b in enumerate(bases):
        out = spec([m[j] for m in models], b, ctx=TensorContext(name=f"t{j}", prepass=prep), **kw)
        ref = ties_reference([m[j] for m in models], b, [1.0, 1.0], None, 1.0, False, "mass",
                             thresholds=prep["thresholds"], zero_sign=prep["zero_sign"])
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


def test_ties_global_without_prepass_is_a_clear_error():
    with pytest.raises(MergelabError, match="needs its prepass"):
        run("ties", [torch.ones(3)], torch.zeros(3), g={"scope": "global"})


# ------------------------------------------------------------------ DARE

def test_dare_expectation_is_the_task_vector():
    base = torch.randn(400)
    x = base + torch.randn(400)
    tau = x - base
    d, reps = 0.3, 600
    acc = torch.zeros(400, dtype=torch.float64)
    for r in range(reps):
        out = run("dare_linear", [x], base, m=[{"density": d}], ctx=TensorContext(name=f"layer{r}.weight", seed=7))
        acc += (out - base).double()
    mean = acc / reps
    # per entry: Var[τ̃] = τ²(1−d)/d; the mean of `reps` draws has std |τ|·sqrt((1−d)/(d·reps))
    z = (mean - tau.double()).abs() / (tau.double().abs() * ((1 - d) / (d * reps)) ** 0.5)
    assert float(z.max()) < 5.0
    assert abs(float(z.mean()) - 0.8) < 0.15  # E|N(0,1)| ≈ 0.80


def test_dare_mask_density_and_rescale():
    base = torch.zeros(200_000)
    x = torch.ones(200_000)
    out = run("dare_linear", [x], base, m=[{"density": 0.1}])
    kept = out != 0
    assert abs(float(kept.float().mean()) - 0.1) < 0.005
    assert torch.all(out[kept] == 10.0)
    out = run("dare_linear", [x], base, g={"rescale": False}, m=[{"density": 0.1}])
    assert torch.all(out[out != 0] == 1.0)


def test_dare_is_deterministic_per_name_seed_and_model():
    base = torch.zeros(5000)
    xs = [torch.randn(5000), torch.randn(5000)]
    go = lambda name, seed: run("dare_ties", xs, base, g={"density": 0.5}, ctx=TensorContext(name=name, seed=seed))
    a, b = go("a.weight", 1), go("a.weight", 1)
    assert same_bytes(a, b)
    assert not torch.equal(a, go("b.weight", 1))
    assert not torch.equal(a, go("a.weight", 2))
    # the two models get different masks
    m0 = run("dare_linear", [torch.ones(5000)], base, m=[{"density": 0.5}], ctx=TensorContext(name="a", seed=1))
    m01 = run("dare_linear", [torch.ones(5000)] * 2, base, g={"weight": [1.0, 0.0]}, m=[{"density": 0.5}] * 2,
              ctx=TensorContext(name="a", seed=1))
    m10 = run("dare_linear", [torch.ones(5000)] * 2, base, g={"weight": [0.0, 1.0]}, m=[{"density": 0.5}] * 2,
              ctx=TensorContext(name="a", seed=1))
    assert same_bytes(m0, m01) and not torch.equal(m01, m10)
    # the seed does not use Python's hash(): a fixed value
    assert sparse.tensor_seed(0, "a", 0) == sparse.tensor_seed(0, "a", 0) != sparse.tensor_seed(0, "a", 1)


def test_dare_seed_is_a_fixed_function_of_seed_name_and_index():
    # blake2b of (seed, name, index): the same number in every process and on every
    # platform (Python's hash() would change with PYTHONHASHSEED)
    assert sparse.tensor_seed(3, "x.weight", 1) == 3254603654826957967


def test_dare_ties_equals_ties_rule_on_the_dropped_deltas():
    base = torch.randn(300)
    xs = [base + torch.randn(300) for _ in range(3)]
    ctx = TensorContext(name="w", seed=5)
    out = run("dare_ties", xs, base, g={"density": 0.4, "normalize": True}, ctx=ctx)
    # rebuild the DARE deltas with the same keep masks, then apply the TIES rule (density 1)
    dropped = []
    for i, x in enumerate(xs):
        keep = sparse.dare_keep(0, 300, 0.4, sparse.tensor_seed(5, "w", i))
        dropped.append(base + torch.where(keep, x - base, 0.0) / 0.4)
    ref = run("ties", dropped, base, g={"normalize": True})
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ TALL masks and consensus

@settings(max_examples=40, deadline=None)
@given(data=st.data())
def test_tall_masks_match_formula(data):
    n_models = data.draw(st.integers(1, 4))
    n = data.draw(st.integers(1, 30))
    base = dyadic_tensor(data.draw, n)
    xs = [base + dyadic_tensor(data.draw, n) for _ in range(n_models)]
    lams = data.draw(st.lists(st.sampled_from([0.2, 0.5, 1.0]), min_size=n_models, max_size=n_models))
    g = {"output": "masks"}
    masks = run("tall_masks", xs, base, g=g, m=[{"lambda": l} for l in lams])
    models = run("tall_masks", xs, base, m=[{"lambda": l} for l in lams])
    taus = [(x - base).tolist() for x in xs]
    mtl = [sum(t[j] for t in taus) for j in range(n)]
    assert list(masks) == [str(i) for i in range(n_models)]
    for i in range(n_models):
        ref = [abs(taus[i][j]) >= lams[i] * abs(mtl[j] - taus[i][j]) for j in range(n)]
        assert masks[str(i)].dtype == torch.bool and masks[str(i)].tolist() == ref
        ref_model = torch.tensor([base[j].item() + (mtl[j] if ref[j] else 0.0) for j in range(n)])
        torch.testing.assert_close(models[str(i)], ref_model, rtol=0, atol=1e-6)
    # consensus: keep entries active in ≥ k masks, scaled by α
    for k in (1, 2, 3):
        out = run("consensus", xs, base, g={"k": k, "alpha": 0.5}, m=[{"lambda": l} for l in lams])
        count = [sum(abs(taus[i][j]) >= lams[i] * abs(mtl[j] - taus[i][j]) for i in range(n_models)) for j in range(n)]
        ref = torch.tensor([base[j].item() + (0.5 * mtl[j] if count[j] >= k else 0.0) for j in range(n)])
        torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)


def test_tall_masks_variant_names_and_ties_base_merge():
    base = torch.randn(50)
    xs = [base + torch.randn(50) for _ in range(3)]
    ctx = TensorContext(name="w", model_names=["cola", "sst2", "rte"])
    spec = get_method("tall_masks")
    kw = spec.resolve({"base_merge": "ties", "density": 0.5, "merge": "sum", "output": "masks"}, [{}] * 3)
    out = spec(xs, base, ctx=ctx, **kw)
    assert list(out) == ["cola", "sst2", "rte"]
    paths = TensorContext(name="w", model_names=["/m/a/cola/", "/m/b/sst2", "rte"])
    assert list(spec(xs, base, ctx=paths, **kw)) == ["cola", "sst2", "rte"]
    dup = TensorContext(name="w", model_names=["/a/m", "/b/m", "c"])
    assert list(spec(xs, base, ctx=dup, **kw)) == ["0", "1", "2"]
    tau_mtl = run("ties", xs, base, g={"density": 0.5, "normalize": False}) - base
    for name, x in zip(out, xs):
        assert torch.equal(out[name], (x - base).abs() >= (tau_mtl - (x - base)).abs())


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("sparsify,consensus", [("magnitude", True), ("random", False), ("none", False)])
def test_sparse_task_merge_returns_float32_for_any_input_dtype(dtype, sparsify, consensus):
    """τ_m is float32 whatever the inputs' dtype, and equals the float32 merge of the same
    values (inputs that float32 holds exactly)."""
    g = torch.Generator().manual_seed(3)
    base = (torch.randn(3, 5, generator=g) * 8).round() / 8
    xs = [base + (torch.randn(3, 5, generator=g) * 8).round() / 8 for _ in range(2)]
    kw = dict(weight=[1.0, 0.5], density=[0.5, 0.5], sparsify=sparsify, consensus=consensus,
              normalize=False, name="w", seed=1)
    got = sparse.sparse_task_merge([x.to(dtype) for x in xs], base.to(dtype), **kw)
    assert got.dtype == torch.float32
    if dtype != torch.bfloat16:   # eighths, halved or doubled: exact in float64 and float32
        torch.testing.assert_close(got, sparse.sparse_task_merge(xs, base, **kw), rtol=0, atol=0)
