"""Model zoo shapes, fx-traceability, training/eval loop and the expert cache."""
import numpy as np
import pytest
import torch
import torch.fx
from torch import nn

from mergelab.experiments import train as T
from mergelab.experiments import zoo


@pytest.mark.parametrize("arch,kw", [
    ("mlp", dict(widths=(32, 16), n_classes=5)),
    ("vgg", dict(cfg=(8, "M", 16), dense=(24,), norm="ln", n_classes=5)),
    ("vgg", dict(cfg=(8, "M", 16), dense=(24,), norm="bn", n_classes=5)),
    ("resnet20", dict(width=1, n_classes=5)),
])
def test_vision_forward_shapes_and_trace(arch, kw):
    m = zoo.build(arch, seed=1, **kw).eval()
    x = torch.randn(3, 1, 28, 28)
    out = m(x)
    assert out.shape == (3, 5)
    gm = torch.fx.symbolic_trace(m)
    torch.testing.assert_close(gm(x), out)
    # same seed -> same weights; other seed -> different
    m2 = zoo.build(arch, seed=1, **kw)
    m3 = zoo.build(arch, seed=2, **kw)
    k = next(iter(m.state_dict()))
    assert torch.equal(m.state_dict()[k], m2.state_dict()[k])
    assert not torch.equal(m.state_dict()[k], m3.state_dict()[k])
    assert all(not k.startswith("head.") for k in zoo.body_keys(m.state_dict()))
    assert any(k.startswith("head.") for k in m.state_dict())


def test_resnet20_depth_and_width():
    m = zoo.ResNet20(width=2)
    convs = [mod for mod in m.modules() if isinstance(mod, nn.Conv2d) and mod.kernel_size == (3, 3)]
    assert len(convs) == 19  # + the head = 20 weighted layers
    assert m.head.in_features == 128


def test_channel_layernorm_matches_bruteforce():
    ln = zoo.ChannelLayerNorm(6)
    with torch.no_grad():
        ln.weight.uniform_(0.5, 2)
        ln.bias.normal_()
    x = torch.randn(2, 6, 4, 5)
    mu = x.mean(1, keepdim=True)
    var = x.var(1, unbiased=False, keepdim=True)
    ref = (x - mu) / torch.sqrt(var + ln.eps) * ln.weight[None, :, None, None] + ln.bias[None, :, None, None]
    torch.testing.assert_close(ln(x), ref)
    assert zoo.VGG(cfg=(4, "M", 8), norm="ln").norm_sites() == ["conv.1", "conv.5"]


def test_text_classifier_mean_pool_ignores_padding():
    m = zoo.tiny_text_classifier(3).eval()
    ids = torch.randint(5, 100, (2, 7))
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, 4:] = 0
    out = m({"input_ids": ids, "attention_mask": mask})
    assert out.shape == (2, 3)
    # the padded row equals the same row run without its padding
    short = m({"input_ids": ids[1:, :4], "attention_mask": mask[1:, :4]})
    torch.testing.assert_close(out[1:], short, atol=1e-5, rtol=1e-5)


def _toy(n=400, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 1, 28, 28)).astype(np.float32)
    y = (x[:, 0, :, :14].mean((1, 2)) > x[:, 0, :, 14:].mean((1, 2))).astype(np.int64)
    return x, y


def test_train_learns_and_is_deterministic():
    x, y = _toy()
    accs, first = [], None
    for _ in range(2):
        m = zoo.build("mlp", seed=0, widths=(32,), n_classes=2)
        losses = T.train(m, T.array_sampler(x, y), steps=60, batch_size=32, lr=0.05, seed=3, quiet=True)
        if first is None:
            first = m.state_dict()["head.weight"].clone()
        else:
            assert torch.equal(first, m.state_dict()["head.weight"])
        accs.append(T.evaluate(m, T.batches(x, y))["acc"])
    assert np.mean(losses[-10:]) < np.mean(losses[:10])
    assert accs[0] > 0.8


def test_evaluate_counts_match_bruteforce():
    x, y = _toy(130)
    m = zoo.build("mlp", seed=0, widths=(8,), n_classes=2).eval()
    r = T.evaluate(m, T.batches(x, y, batch_size=50))
    with torch.no_grad():
        out = m(torch.as_tensor(x))
    assert r["n"] == 130
    assert r["acc"] == pytest.approx(float((out.argmax(1) == torch.as_tensor(y)).float().mean()))
    assert r["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(out, torch.as_tensor(y))), rel=1e-5)


def test_reset_bn_stats_is_exact_average():
    m = zoo.build("vgg", seed=0, cfg=(4,), dense=(), norm="bn", n_classes=2)
    x = torch.randn(64, 1, 28, 28) * 3 + 1
    T.reset_bn_stats(m, T.batches(x.numpy(), np.zeros(64, dtype=np.int64), batch_size=16))
    with torch.no_grad():
        h = m.conv[0](x)
    torch.testing.assert_close(m.conv[1].running_mean, h.mean((0, 2, 3)), atol=1e-5, rtol=1e-4)


def test_lr_schedule():
    assert T.lr_at(0, 100, 1.0, 10) == pytest.approx(0.1)
    assert T.lr_at(10, 100, 1.0, 10) == pytest.approx(1.0)
    assert T.lr_at(100, 100, 1.0, 10) == pytest.approx(0.0, abs=1e-12)


def test_expert_cache_hit_on_second_call(tmp_path):
    cache = T.ExpertCache(tmp_path)
    x, y = _toy(100)
    calls = []

    def fit(m):
        calls.append(1)
        T.train(m, T.array_sampler(x, y), steps=5, batch_size=16, seed=0, quiet=True)
        return {"acc": T.evaluate(m, T.batches(x, y))["acc"]}

    cfg = {"arch": "mlp", "seed": 0, "steps": 5}
    build = lambda: zoo.build("mlp", seed=0, widths=(8,), n_classes=2)  # noqa: E731
    m1, i1 = cache.get_or_train(cfg, build, fit)
    m2, i2 = cache.get_or_train(dict(reversed(list(cfg.items()))), build, fit)
    assert len(calls) == 1 and cache.hits == 1 and cache.misses == 1
    assert i1 == i2
    for k, v in m1.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k])
    cache.get_or_train({**cfg, "steps": 6}, build, fit)
    assert len(calls) == 2
    assert T.config_hash(cfg) != T.config_hash({**cfg, "steps": 6})
