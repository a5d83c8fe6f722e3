"""Statistics files written here are consumed by the `methods` merges (file contract)."""
import torch
from safetensors.torch import load_file

from _stats_models import mlp, vector_batches
from mergelab.methods.fisher import fisher_merge
from mergelab.methods.regmean import regmean_merge
from mergelab.stats import diagonal_fisher, gram_matrices


def test_gram_files_drive_regmean_to_the_least_squares_solution(tmp_path):
    models = [mlp(1), mlp(2)]
    data = [vector_batches(3, seed=1), vector_batches(3, seed=2)]
    for i, (m, d) in enumerate(zip(models, data)):
        gram_matrices(m, d, layers=["0"], progress=False).save(tmp_path / f"g{i}.safetensors")
    grams = [load_file(str(tmp_path / f"g{i}.safetensors")) for i in range(2)]
    merged = regmean_merge([m.state_dict() for m in models], grams, alpha=1.0)
    # brute force: the weight minimising Σ_i ||X_i Wᵀ − X_i W_iᵀ||² over both models' inputs
    xs = [torch.cat([b[0] for b in d]).double() for d in data]
    X = torch.cat(xs)
    Y = torch.cat([x @ m[0].weight.detach().double().T for x, m in zip(xs, models)])
    W = torch.linalg.lstsq(X, Y).solution.T
    torch.testing.assert_close(merged["0.weight"].double(), W, rtol=1e-4, atol=1e-5)


def test_fisher_files_drive_fisher_merge(tmp_path):
    models = [mlp(1), mlp(2)]
    for i, m in enumerate(models):
        diagonal_fisher(m, vector_batches(2, seed=i), progress=False).save(tmp_path / f"f{i}.safetensors")
    fishers = [load_file(str(tmp_path / f"f{i}.safetensors")) for i in range(2)]
    merged = fisher_merge([m.state_dict() for m in models], fishers)
    k = "2.weight"
    f0, f1 = (f[k].clamp_min(1e-6) for f in fishers)
    w0, w1 = (m.state_dict()[k] for m in models)
    torch.testing.assert_close(merged[k], (f0 * w0 + f1 * w1) / (f0 + f1), rtol=1e-5, atol=1e-6)
