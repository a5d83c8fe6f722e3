import copy
import math
from functools import reduce

import pytest
import torch
from torch import nn

from _stats_models import LayerNorm2d, cnn, image_batches
from mergelab.errors import MergelabError
from mergelab.repair import can_fold, fold_correction, repair, repair_target
from mergelab.stats import Site, activation_stats


def reference_buggy_target_var(variances):
    """tact-merge utils.merge_batch_stats: sqrt of the running sum at every step."""
    n = len(variances)
    return (reduce(lambda x, y: math.sqrt(x) + math.sqrt(y), variances) / n) ** 2


@pytest.mark.parametrize("n", range(1, 9))
def test_n_model_std_target_of_equal_variances_is_that_variance(n):
    v = 4.0
    mean, std = repair_target([torch.full((3,), 1.5)] * n, [torch.full((3,), math.sqrt(v))] * n)
    torch.testing.assert_close(std ** 2, torch.full((3,), v, dtype=torch.float64))
    torch.testing.assert_close(mean, torch.full((3,), 1.5, dtype=torch.float64))


def test_reference_bug_differs_for_eight_models():
    assert reference_buggy_target_var([4.0] * 2) == pytest.approx(4.0)    # right for N = 2
    assert reference_buggy_target_var([4.0] * 8) == pytest.approx(0.25)   # 16x too small for N = 8
    _, std = repair_target([torch.zeros(1)] * 8, [torch.full((1,), 2.0)] * 8)
    assert float(std) ** 2 == pytest.approx(4.0)


def test_weighted_target_averages_stds_not_variances():
    mean, std = repair_target([torch.tensor([0.0]), torch.tensor([4.0])],
                              [torch.tensor([1.0]), torch.tensor([3.0])], weights=[3, 1])
    assert float(mean) == pytest.approx(1.0) and float(std) == pytest.approx(1.5)
    with pytest.raises(MergelabError, match="has 3 values, expected 2"):
        repair_target([torch.zeros(1)] * 2, [torch.ones(1)] * 2, weights=[1, 1, 1])


def average(models, weights):
    out = copy.deepcopy(models[0])
    sds = [m.state_dict() for m in models]
    out.load_state_dict({k: sum(w * sd[k].float() for w, sd in zip(weights, sds)).to(sds[0][k].dtype)
                         for k in sds[0]})
    return out


@pytest.mark.parametrize("norm", ["bn", "ln"])
def test_repaired_site_stats_equal_the_target(norm):
    experts = [cnn(s, norm).eval() for s in (1, 2, 3)]
    w = [0.5, 0.3, 0.2]
    merged = average(experts, w).eval()
    data = image_batches(3, seed=5)
    fixed = repair(merged, experts, data, weights=w, mode="sequential", eps=0.0, progress=False).eval()
    assert fixed.mergelab_unfolded == []
    sites = ["1", "4", "8"]            # REPAIR's default sites of this CNN: pre-activation
    ex = [activation_stats(e, data, sites, progress=False) for e in experts]
    got = activation_stats(fixed, data, sites, progress=False)
    for s in sites:
        mean, std = repair_target([e.mean[s] for e in ex], [e.std[s] for e in ex], w)
        assert ((got.std[s].double() - std).abs() - 1e-4 * std).max() <= 1e-7, s
        assert ((got.mean[s].double() - mean).abs() - 1e-4 * std).max() <= 1e-7, s
    # REPAIR actually changed something: the merge had collapsed variance at the last site
    before = activation_stats(merged, data, sites, progress=False)
    assert not torch.allclose(before.std["8"], got.std["8"], rtol=1e-3)
    # folded (plain weights) and unfolded (hooks) give the same function
    hooked = repair(merged, experts, data, weights=w, mode="sequential", eps=0.0, fold=False,
                    progress=False).eval()
    assert sorted(hooked.mergelab_unfolded) == sorted(sites)
    with torch.no_grad():
        x = data[0][0]
        torch.testing.assert_close(fixed(x), hooked(x), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(merged(x), fixed(x), atol=1e-3)


@pytest.mark.parametrize("make,site,x_shape", [
    (lambda: nn.Linear(5, 4), Site("m"), (3, 5)),
    (lambda: nn.Linear(5, 4, bias=False), Site("m"), (3, 5)),
    (lambda: nn.Linear(5, 4), Site("m", "input"), (3, 7, 5)),
    (lambda: nn.Conv2d(3, 4, 3, padding=1), Site("m"), (2, 3, 6, 6)),
    (lambda: nn.Conv2d(3, 4, 3), Site("m", "input"), (2, 3, 6, 6)),
    (lambda: nn.BatchNorm2d(3), Site("m"), (2, 3, 4, 4)),
    (lambda: nn.LayerNorm(5), Site("m"), (2, 7, 5)),
    (lambda: LayerNorm2d(3), Site("m"), (2, 3, 4, 5)),
    (lambda: nn.GroupNorm(1, 3), Site("m"), (2, 3, 4, 4)),
])
def test_fold_rules_equal_the_explicit_affine(make, site, x_shape):
    torch.manual_seed(1)
    net = nn.Sequential()
    net.add_module("m", make())
    for p in net.parameters():
        nn.init.normal_(p)
    net.eval()
    x = torch.randn(x_shape)
    from mergelab.repair.correct import apply_hooks
    m = net.m
    c = m.weight.shape[1] if site.where == "input" else m.weight.shape[0]
    a, b = torch.rand(c) + 0.5, torch.randn(c)
    ref = copy.deepcopy(net)
    apply_hooks(ref, [site], {site.name: (a, b)})
    assert can_fold(net, site)
    fold_correction(net, site, a, b)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-5)


def test_unfoldable_sites_say_why():
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())
    with pytest.raises(MergelabError, match="padded or grouped conv"):
        fold_correction(net, Site("0", "input"), torch.ones(3), torch.zeros(3))
    with pytest.raises(MergelabError, match="output of a ReLU"):
        fold_correction(net, Site("1"), torch.ones(4), torch.zeros(4))
