"""Real data: alignment lowers the loss barrier between two independently trained MLPs.

Fashion-MNIST through ``mergelab.experiments.data`` (installed into the cache if missing;
skipped with the reason only when it cannot be installed).
"""
import copy

import pytest
import torch
import torch.nn.functional as F

from align_models import MLP
from mergelab.align.apply import permute
from mergelab.align.matching import activation_matching, weight_matching
from mergelab.align.spec import permutation_spec
from suite_helpers import ensure_data

def _load():
    """Fashion-MNIST through the project's own checksummed loader, installed if missing."""
    from mergelab.experiments import data
    ensure_data(["fashion-mnist"])
    xa, ya, xta, yta = data.load_fashion_mnist()
    x = torch.tensor(xa).float().div(255).view(-1, 784)
    xt = torch.tensor(xta).float().div(255).view(-1, 784)
    y, yt = torch.tensor(ya).long(), torch.tensor(yta).long()
    mu, sd = x.mean(), x.std()
    return (x - mu) / sd, y, (xt - mu) / sd, yt


def _train(seed, x, y, epochs=3):
    torch.manual_seed(seed)
    m = MLP(784, (256, 256), 10)
    opt = torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for idx in torch.randperm(len(x), generator=g).split(128):
            opt.zero_grad()
            F.cross_entropy(m(x[idx]), y[idx]).backward()
            opt.step()
    return m.eval()


def _loss(m, state, x, y):
    m = copy.deepcopy(m)
    m.load_state_dict(state)
    with torch.no_grad():
        return float(F.cross_entropy(m(x), y))


def _barrier(m, a, b, x, y):
    mid = {k: (a[k] + b[k]) / 2 for k in a}
    return _loss(m, mid, x, y) - (_loss(m, a, x, y) + _loss(m, b, x, y)) / 2


@pytest.mark.slow
def test_alignment_lowers_midpoint_barrier_on_fashion_mnist():
    x, y, xt, yt = _load()
    ma, mb = _train(0, x, y), _train(1, x, y)
    a, b = ma.state_dict(), mb.state_dict()
    spec = permutation_spec(ma, xt[:8])
    before = _barrier(ma, a, b, xt, yt)
    pw = weight_matching(spec, a, b)
    after_w = _barrier(ma, a, permute(spec, b, pw), xt, yt)
    data = [x[i:i + 500] for i in range(0, 10000, 500)]
    pa = activation_matching(spec, ma, mb, data)
    after_a = _barrier(ma, a, permute(spec, b, pa), xt, yt)
    print(f"\nFashion-MNIST MLP 784-256-256-10, midpoint loss barrier (test set): "
          f"none {before:.4f}  weight matching {after_w:.4f} ({len(pw.history) - 1} sweeps)  "
          f"activation matching {after_a:.4f}")
    assert after_w < before
    assert after_a < before
    # aligning does not change what model B computes
    assert abs(_loss(ma, permute(spec, b, pw), xt, yt) - _loss(ma, b, xt, yt)) < 1e-4
