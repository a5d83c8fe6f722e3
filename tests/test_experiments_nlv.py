"""nonlocal-vision seams: the suite's calls into mergelab.align / repair / stats do what the
suite assumes (checked against brute-force computations on tiny VGGs, no data files)."""
import copy

import torch

from mergelab.experiments import zoo
from mergelab.experiments.suites import nonlocal_vision as N

CFG = {"cfg": ("M", 8, "M", 16), "dense": (16,), "norm": "ln"}


def _vgg(seed, n_classes=5):
    m = zoo.build("vgg", seed=seed, n_classes=n_classes, **CFG)
    with torch.no_grad():   # non-trivial norm affines, so statistics differ per channel
        for mod in m.modules():
            if isinstance(mod, zoo.ChannelLayerNorm):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.uniform_(-0.5, 0.5)
    return m.eval()


def _data(n_batches=3, bs=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 1, 28, 28, generator=g), torch.randint(0, 5, (bs,), generator=g))
            for _ in range(n_batches)]


def _outputs(model, data):
    with torch.no_grad():
        return torch.cat([model(x) for x, _ in data])


def _permuted_copy(model, seed):
    """The model with every hidden unit randomly permuted (same function), via the spec."""
    from mergelab.align import permute
    spec = N._spec(model, _data(1))
    g = torch.Generator().manual_seed(seed)
    perm = {k: torch.randperm(gr.size, generator=g) for k, gr in spec.groups.items()}
    out = copy.deepcopy(model)
    out.load_state_dict(permute(spec, model.state_dict(), perm))
    return out


def test_weight_alignment_undoes_a_permutation_and_preserves_function():
    ref = _vgg(0)
    other = _permuted_copy(ref, seed=3)
    data = _data()
    assert not torch.equal(other.state_dict()["conv.1.weight"], ref.state_dict()["conv.1.weight"])
    mapper = N._align_perm("weight", N._spec(ref, data), ref, other, data)
    aligned = mapper(other.state_dict())
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(aligned[k], v)


def test_activation_alignment_is_function_preserving_and_undoes_a_permutation():
    ref = _vgg(0)
    other = _permuted_copy(ref, seed=5)
    data = _data()
    mapper = N._align_perm("activation", N._spec(ref, data), ref, other, data)
    m = copy.deepcopy(other)
    m.load_state_dict(mapper(other.state_dict()))
    torch.testing.assert_close(_outputs(m, data), _outputs(other, data), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(m.state_dict()["conv.1.weight"], ref.state_dict()["conv.1.weight"])


def test_weight_matching_ignores_heads():
    """Heads are per task: matching two models that differ only in their heads gives identity."""
    ref = _vgg(0)
    other = _permuted_copy(ref, seed=1)
    other_new_head = copy.deepcopy(other)
    torch.nn.init.normal_(other_new_head.head.weight, std=10.0)
    data = _data()
    spec = N._spec(ref, data)
    a = N._align_perm("weight", spec, ref, other, data)(other.state_dict())
    b = N._align_perm("weight", spec, ref, other_new_head, data)(other_new_head.state_dict())
    for k in a:
        if not k.startswith("head."):
            torch.testing.assert_close(a[k], b[k])


def _site_moments(model, data, sites):
    """Brute force: per-channel mean / population std of each site's output (channels on axis 1)."""
    got = {}
    hooks = [model.get_submodule(s).register_forward_hook(
        lambda mod, inp, out, s=s: got.setdefault(s, []).append(out.detach())) for s in sites]
    with torch.no_grad():
        for x, _ in data:
            model(x)
    for h in hooks:
        h.remove()
    res = {}
    for s in sites:
        y = torch.cat(got[s]).double()
        y = y.transpose(0, 1).reshape(y.shape[1], -1) if y.dim() == 4 else y.T
        res[s] = (y.mean(1), y.std(1, unbiased=False))
    return res


def test_tact_moves_each_task_to_its_own_expert_statistics_with_its_own_head():
    e1, e2, other = _vgg(1), _vgg(2), _vgg(3)
    merged = copy.deepcopy(e1)
    merged.load_state_dict({k: 0.5 * (v + other.state_dict()[k]) for k, v in e1.state_dict().items()})
    d1, d2 = _data(seed=1), _data(seed=2)
    models = N._tact(merged, {"t1": e1, "t2": e2}, {"t1": d1, "t2": d2})
    sites = ["conv.2", "conv.6", "dense.0"]
    assert e1.norm_sites() == sites[:2]
    for t, e, d in (("t1", e1, d1), ("t2", e2, d2)):
        # its own head, with the head-input correction folded in: W' = W diag(a), one a per column
        ratio = models[t].head.weight / e.head.weight
        torch.testing.assert_close(ratio, ratio[:1].expand_as(ratio))
        want, got = _site_moments(e, d, sites), _site_moments(models[t], d, sites)
        for s in sites:
            torch.testing.assert_close(got[s][0], want[s][0], atol=2e-3, rtol=1e-3)
            torch.testing.assert_close(got[s][1], want[s][1], atol=2e-3, rtol=1e-3)


def test_repair_targets_the_mean_of_expert_means_and_stds():
    e1, e2 = _vgg(1), _vgg(2)
    merged = copy.deepcopy(e1)
    merged.load_state_dict({k: 0.5 * (v + e2.state_dict()[k]) for k, v in e1.state_dict().items()})
    data = _data(seed=4)
    fixed = N._repair(merged, [e1, e2], data)
    sites = ["conv.2", "conv.6", "dense.0"]
    m1, m2, got = (_site_moments(m, data, sites) for m in (e1, e2, fixed))
    for s in sites:
        torch.testing.assert_close(got[s][0], 0.5 * (m1[s][0] + m2[s][0]), atol=2e-3, rtol=1e-3)
        torch.testing.assert_close(got[s][1], 0.5 * (m1[s][1] + m2[s][1]), atol=2e-3, rtol=1e-3)
    assert fixed.mergelab_unfolded == []


def test_site_std_matches_bruteforce():
    m, data = _vgg(0), _data()
    got = N._site_std(m, data, N._sites(m, head_input=False))
    want = _site_moments(m, data, m.norm_sites() + ["dense.0"])
    for s in want:
        torch.testing.assert_close(got[s].double(), want[s][1], atol=1e-5, rtol=1e-5)


def test_groups_and_spread():
    shared = {"w": torch.zeros(2)}
    assert N._groups({"a": shared, "b": shared}) == [["a", "b"]]
    assert N._groups({"a": {"w": torch.zeros(2)}, "b": {"w": torch.zeros(2)}}) == [["a"], ["b"]]
    s = {"a": {"x.w": torch.zeros(2), "head.w": torch.zeros(1)},
         "b": {"x.w": torch.tensor([3.0, 4.0]), "head.w": torch.ones(1) * 100},
         "c": {"x.w": torch.tensor([0.0, 1.0]), "head.w": torch.zeros(1)}}
    assert abs(N._spread(s) - 3.0) < 1e-6   # mean of 5 and 1; heads ignored


def test_every_profile_runs_every_setting_and_method():
    for name in ("smoke", "quick"):
        p = N.PROFILES[name]
        assert set(p["settings"]) == set(N.SETTINGS) and set(p["methods"]) == set(N.METHODS)
        assert set(p["alignments"]) == set(N.ALIGNMENTS) and set(p["corrections"]) == set(N.CORRECTIONS)


def test_joint_correction_on_one_batch_equals_sequential():
    """Why the suite uses mode='joint' with one calibration batch: the same corrections as the
    exact layer-by-layer estimate."""
    from mergelab.repair import tact
    e, other = _vgg(1), _vgg(3)
    merged = copy.deepcopy(e)
    merged.load_state_dict({k: 0.5 * (v + other.state_dict()[k]) for k, v in e.state_dict().items()})
    x, y = _data(seed=7)[0]
    data = {"t": [(torch.cat([x, x.flip(0)]), torch.cat([y, y]))]}
    a = tact(merged, {"t": e}, data, sites=N._sites(merged), head="head", mode="joint", progress=False)
    b = tact(merged, {"t": e}, data, sites=N._sites(merged), head="head", mode="sequential", progress=False)
    for s in a.corrections["t"]:
        for u, v in zip(a.corrections["t"][s], b.corrections["t"][s]):
            torch.testing.assert_close(u, v, atol=1e-4, rtol=1e-4)


def test_fisher_of_aligned_expert_is_the_permuted_fisher():
    """The suite computes each expert's Fisher once and permutes it with the expert's mapper."""
    ref = _vgg(0)
    other = _permuted_copy(_vgg(1), seed=2)
    data = _data(n_batches=1)
    mapper = N._align_perm("weight", N._spec(ref, data), ref, other, data)
    moved = copy.deepcopy(other)
    moved.load_state_dict(mapper(other.state_dict()))
    direct = N._fisher(moved, data, 16)
    permuted = mapper(N._fisher(other, data, 16))
    for k in direct:
        torch.testing.assert_close(permuted[k], direct[k], rtol=1e-4, atol=1e-7)
