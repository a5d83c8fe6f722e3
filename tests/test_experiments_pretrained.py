"""The pretrained-vision suite: our EfficientNet-Lite0 against the reference implementation
with the shipped ImageNet weights, frozen-BatchNorm fine-tuning, and the smoke run (slow)."""
import math

import pytest
import torch

from mergelab.experiments import train as T
from mergelab.experiments import zoo

# Every accuracy of `mergelab reproduce pretrained-vision --profile smoke` (seed 0) under torch
# 2.13.0 with the AVX2 kernels pinned (tests/suite_helpers.results_digest): a change of this
# digest on another machine means the experts or merges are not reproducible there
# (per CPU vendor: suite_helpers.check_recorded)
PV_SMOKE_DIGEST = {"GenuineIntel": "557f4c8983b10d6af514f6a6e2fbd65be7d8cbc3d9699fd18bf887ba36fcbaf7",
                   "AuthenticAMD": "c8e631d75d17aa531e1b946b03d3bc5aa790f2016ff635f1ecac3ec033d08737"}


def test_lite0_equals_reference_implementation_on_imagenet_weights():
    """Same logits as efficientnet-lite-pytorch's model with the same checkpoint (224 px)."""
    ref_mod = pytest.importorskip("efficientnet_lite_pytorch")
    from mergelab.experiments.data import lite0_weights_path

    ours = zoo.efficientnet_lite0()
    ref = ref_mod.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(lite0_weights_path())).eval()
    x = torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        a, b = ours(x), ref(x)
    assert a.shape == (2, 1000)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    assert sum(p.numel() for p in ours.parameters()) == 4652008


def test_lite0_same_padding_matches_tensorflow_rule():
    """TF "SAME": output side ceil(n / s); the extra pixel of an odd total pad goes right/bottom."""
    for n in (7, 8, 28, 32, 33):
        for k, s in ((3, 1), (3, 2), (5, 2), (5, 1)):
            x = torch.zeros(1, 1, n, n)
            y = zoo._same_pad(x, k, s)
            assert (y.shape[-1] - k) // s + 1 == math.ceil(n / s)
            total = y.shape[-1] - n
            x1 = torch.zeros(1, 1, n, n)
            x1[..., -1, -1] = 1.0   # the last pixel moves by the left pad only
            y1 = zoo._same_pad(x1, k, s)
            left = total // 2
            assert y1[0, 0, n - 1 + left, n - 1 + left] == 1.0


def test_grey_input_is_resized_and_repeated():
    m = zoo.EfficientNetLite0(5, resolution=32).eval()
    g = torch.randn(3, 1, 28, 28)
    rgb = torch.nn.functional.interpolate(g.expand(-1, 3, -1, -1), size=(32, 32), mode="bilinear",
                                          align_corners=False)
    with torch.no_grad():
        torch.testing.assert_close(m(g), m(rgb))


def test_frozen_bn_training_keeps_statistics_and_trains_affine():
    m = zoo.EfficientNetLite0(3, resolution=32)
    before = {k: v.clone() for k, v in m.state_dict().items() if "running" in k or "num_batches" in k}
    w0 = m._bn0.weight.detach().clone()
    x, y = torch.randn(64, 1, 28, 28).numpy(), torch.randint(0, 3, (64,)).numpy()
    T.train(m, T.array_sampler(x, y), steps=2, batch_size=16, lr=0.1, quiet=True, frozen_bn=True)
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not torch.equal(w0, m._bn0.weight.detach())
    T.train(m, T.array_sampler(x, y), steps=1, batch_size=16, lr=0.1, quiet=True)   # default: BN updates
    assert not torch.equal(before["_bn0.running_mean"], m.state_dict()["_bn0.running_mean"])


@pytest.mark.slow
def test_pretrained_vision_smoke_end_to_end(tmp_path):
    from suite_helpers import check_recorded, ensure_data, reproduce_smoke, results_digest

    ensure_data()
    res = reproduce_smoke("pretrained-vision", tmp_path / "out")
    ex = res["experts"]["local"]
    assert len(ex) == 2 and all(v > 0.5 for v in ex.values())   # 5 classes: chance 0.2
    got = {(r["method"], r["correction"]) for r in res["runs"]}
    assert got == {(m, c) for m in ("task_arithmetic", "ties", "ties_tall", "fisher")
                   for c in ("none", "repair", "tact")}
    for r in res["runs"]:
        assert all(0.0 <= a <= 1.0 for a in r["acc"].values())
    assert res["foundation"]["sha256"].startswith("579344248a93")
    if torch.__version__.split("+")[0] == "2.13.0" and res["versions"]["cpu_capability"] == "AVX2":
        check_recorded(results_digest(res), PV_SMOKE_DIGEST, "pretrained-vision smoke digest")
