"""Diagonal Fisher against a brute-force per-example Python loop written here."""
import pytest
import torch

from _stats_models import cnn, image_batches, mlp, tiny_bert, token_batches, vector_batches
from mergelab.errors import MergelabError
from mergelab.stats import diagonal_fisher, sample_labels


def brute_force(model, data, mode, seed=0, n_examples=None):
    model.eval()
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    n = 0
    for bi, batch in enumerate(data):
        if isinstance(batch, dict):
            x = {k: v for k, v in batch.items() if k != "labels"}
            y_true, size = batch["labels"], batch["input_ids"].shape[0]
            one = lambda i: model(**{k: v[i:i + 1] for k, v in x.items()}).logits[0]
            full = lambda: model(**x).logits
        else:
            x, y_true = batch
            size = x.shape[0]
            one = lambda i: model(x[i:i + 1])[0]
            full = lambda: model(x)
        if mode == "sampled":
            with torch.no_grad():
                y_s = sample_labels(full(), seed, bi)
        for i in range(size):
            if n_examples is not None and n >= n_examples:
                break
            logp = torch.log_softmax(one(i), -1)
            if mode == "expected":
                ys = range(logp.shape[0])
                w = logp.detach().exp()
            else:
                ys = [int((y_true if mode == "empirical" else y_s)[i])]
                w = torch.ones(logp.shape[0])
            for y in ys:
                g = torch.autograd.grad(logp[y], list(params.values()), retain_graph=True)
                for (name, _), gi in zip(params.items(), g):
                    acc[name] += w[y].double() * gi.double() ** 2
            n += 1
    return {k: v / n for k, v in acc.items()}


def assert_rel(f, ref):
    assert set(f) == set(ref)
    scale = max(float(v.abs().max()) for v in ref.values())
    for k in ref:
        # relative to the tensor's own scale; a tensor whose exact Fisher is 0 (e.g. attention
        # key biases) holds only rounding noise, compared against the model-wide scale
        denom = max(float(ref[k].abs().max()), 1e-6 * scale)
        err = float((f[k].double() - ref[k]).abs().max()) / denom
        assert err <= 1e-5, (k, err)
        assert f[k].dtype == torch.float32 and f[k].shape == ref[k].shape


@pytest.mark.parametrize("mode", ["expected", "sampled", "empirical"])
def test_fisher_mlp_each_mode(mode):
    net, data = mlp(), vector_batches(3, bs=6)
    f = diagonal_fisher(net, data, mode=mode, seed=3, chunk_size=4, progress=False)
    assert f.n_examples == 18 and f.mode == mode
    assert_rel(f, brute_force(net, data, mode, seed=3))


def test_fisher_cnn_batchnorm_expected_and_n_examples():
    net, data = cnn(norm="bn"), image_batches(2, bs=5)
    f = diagonal_fisher(net, data, n_examples=7, chunk_size=8, progress=False)
    assert f.n_examples == 7
    assert_rel(f, brute_force(net, data, "expected", n_examples=7))


def test_fisher_tiny_bert_sampled():
    net, data = tiny_bert(), token_batches(1, bs=3)
    f = diagonal_fisher(net, data, mode="sampled", seed=1, progress=False)
    assert_rel(f, brute_force(net, data, "sampled", seed=1))


def test_fisher_file_and_errors(tmp_path):
    net = mlp()
    f = diagonal_fisher(net, vector_batches(1), progress=False)
    f.save(tmp_path / "f.safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "f.safetensors"), "pt") as h:
        assert h.metadata() == {"mergelab_kind": "fisher", "mode": "expected", "n_examples": "8"}
        assert set(h.keys()) == {n for n, _ in net.named_parameters()}
    with pytest.raises(MergelabError, match="fisher mode: expected one of"):
        diagonal_fisher(net, vector_batches(1), mode="exact", progress=False)
    with pytest.raises(MergelabError, match="needs labels"):
        diagonal_fisher(net, [torch.randn(4, 10)], mode="empirical", progress=False)
