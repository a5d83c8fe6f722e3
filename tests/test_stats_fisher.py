"""Diagonal Fisher against a brute-force per-example Python loop written here (both backends:
vmap over torch.func, and per-example gradients in closed form from forward hooks)."""
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from _stats_models import cnn, image_batches, mlp, tiny_bert, token_batches, vector_batches
from mergelab.errors import MergelabError
from mergelab.stats import diagonal_fisher, sample_labels


def _logits(out):
    return out.logits if hasattr(out, "logits") else out


def brute_force(model, data, mode, seed=0, n_examples=None):
    model.eval()
    params = dict(model.named_parameters())
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    n = 0
    for bi, batch in enumerate(data):
        if isinstance(batch, dict):
            x = {k: v for k, v in batch.items() if k != "labels"}
            y_true, size = batch["labels"], batch["input_ids"].shape[0]
            one = lambda i: _logits(model(**{k: v[i:i + 1] for k, v in x.items()}))[0]
            full = lambda: _logits(model(**x))
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


@pytest.mark.parametrize("backend", ["vmap", "hooks"])
@pytest.mark.parametrize("mode", ["expected", "sampled", "empirical"])
def test_fisher_mlp_each_mode(mode, backend):
    net, data = mlp(), vector_batches(3, bs=6)
    f = diagonal_fisher(net, data, mode=mode, seed=3, chunk_size=4, progress=False, backend=backend)
    assert f.n_examples == 18 and f.mode == mode and f.backend == backend
    assert_rel(f, brute_force(net, data, mode, seed=3))


def test_fisher_cnn_batchnorm_expected_and_n_examples():
    net, data = cnn(norm="bn"), image_batches(2, bs=5)
    f = diagonal_fisher(net, data, n_examples=7, chunk_size=8, progress=False)
    assert f.n_examples == 7
    assert_rel(f, brute_force(net, data, "expected", n_examples=7))


@pytest.mark.parametrize("backend", ["vmap", "hooks"])
def test_fisher_tiny_bert_sampled(backend):
    net, data = tiny_bert(), token_batches(1, bs=3)
    f = diagonal_fisher(net, data, mode="sampled", seed=1, progress=False, backend=backend)
    assert f.backend == backend
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


# ---------------------------------------------------------------- hooks backend
class ResCNN(nn.Module):
    """BatchNorm + a residual `out += identity` + in-place ReLUs, dilation, stride, groups,
    GroupNorm, an asymmetric 'same' padding, a Conv1d: every conv path of the hooks backend
    (10x10 maps take the grouped-convolution path, 5x5 maps the strided-matmul path)."""

    def __init__(self, n_out=4):
        super().__init__()
        torch.manual_seed(0)
        self.conv0 = nn.Conv2d(3, 6, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(6)
        self.conv1 = nn.Conv2d(6, 6, 3, padding=2, dilation=2, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(6, 8, 3, stride=2, padding=1, groups=2)
        self.gn = nn.GroupNorm(2, 8)
        self.conv3 = nn.Conv2d(8, 8, (2, 3), padding="same")
        self.conv4 = nn.Conv2d(8, 4, 1, stride=2)
        self.conv1d = nn.Conv1d(4, 5, 2, stride=1, padding=1)
        self.head = nn.Linear(5, n_out)
        for m in self.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.uniform_(m.weight, 0.5, 1.5)
                nn.init.uniform_(m.bias, -0.3, 0.3)
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        x = self.relu(self.bn0(self.conv0(x)))
        out = self.bn1(self.conv1(x))
        out += x                                   # in-place on the BatchNorm's output
        out = self.relu(out)
        out = F.relu(self.gn(self.conv2(out)), inplace=True)
        out = self.conv4(self.conv3(out) + out)    # (B, 4, 3, 3)
        out = self.conv1d(out.flatten(2))          # (B, 5, 10)
        return self.head(out.mean(2))


class TokenNet(nn.Module):
    """Embedding (padding_idx) called twice, LayerNorm on (B, T, d), a Linear on tokens, and a
    head whose weight is tied to the embedding table (logits over the vocabulary)."""

    def __init__(self, vocab=9, d=6):
        super().__init__()
        torch.manual_seed(1)
        self.emb = nn.Embedding(vocab, d, padding_idx=0)
        self.ln = nn.LayerNorm(d)
        self.tok = nn.Linear(d, d)
        self.head = nn.Linear(d, vocab, bias=False)
        self.head.weight = self.emb.weight
        nn.init.uniform_(self.ln.weight, 0.5, 1.5)
        nn.init.uniform_(self.ln.bias, -0.3, 0.3)

    def forward(self, input_ids, attention_mask):
        h = self.emb(input_ids) + 0.5 * self.emb(input_ids.flip(1))
        h = torch.tanh(self.tok(self.ln(h)))
        m = attention_mask[..., None].float()
        return self.head((h * m).sum(1) / m.sum(1))


class TwiceNet(nn.Module):
    """A Linear called twice, and two Linears sharing one weight."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(2)
        self.inp = nn.Linear(10, 8)
        self.mid = nn.Linear(8, 8)
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = torch.tanh(self.mid(torch.tanh(self.mid(self.inp(x)))))
        return self.out(torch.tanh(self.b(torch.tanh(self.a(h)))))


class RawParamNet(nn.Module):
    """A raw nn.Parameter used in the top-level forward: not a supported leaf module."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.fc, self.out = nn.Linear(10, 8), nn.Linear(8, 3)
        self.scale = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x):
        return self.out(torch.tanh(self.fc(x) * self.scale))


class SneakyNet(nn.Module):
    """A supported leaf's weight also used outside its module's forward (only the first-batch
    check can see it)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(4)
        self.fc, self.out = nn.Linear(8, 8), nn.Linear(8, 3)
        self.inp = nn.Linear(10, 8)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        return self.out(torch.tanh(self.fc(h)) + F.linear(h, self.fc.weight))


class SamePadConv(nn.Conv2d):
    """TF "SAME" padding (asymmetric, stride-dependent) applied in its own forward."""

    def forward(self, x):
        k, st = self.kernel_size[0], self.stride[0]
        pad = max((-(-x.shape[-1] // st) - 1) * st + k - x.shape[-1], 0)
        return super().forward(F.pad(x, (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)))


class ScaledConv(nn.Conv2d):
    """Post-processes the convolution's output in its own forward."""

    def forward(self, x):
        return 0.5 * torch.tanh(self._conv_forward(x, self.weight, self.bias))


class WSConv(nn.Conv2d):
    """Weight standardisation: convolves with a function of its weight (not exact in hooks)."""

    def forward(self, x):
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return self._conv_forward(x, w / (w.std((1, 2, 3), keepdim=True) + 1e-5), self.bias)


class TwiceConv(nn.Conv2d):
    """Convolves twice in one forward (hooks record one input per call)."""

    def forward(self, x):
        conv = self._conv_forward
        return conv(x, self.weight, self.bias) + conv(x.flip(-1), self.weight, self.bias)


class SameNet(nn.Module):
    """Conv subclasses with their own forward (SAME padding, stride 2, depthwise; a
    post-processing one) and 1x1 convs whose output map is one position (the outer-product
    path), then a head; ``conv=`` swaps the middle conv's class for the error cases."""

    def __init__(self, conv=ScaledConv):
        super().__init__()
        torch.manual_seed(5)
        self.c0 = SamePadConv(3, 6, 3, stride=2, bias=False)
        self.bn = nn.BatchNorm2d(6)
        self.dw = SamePadConv(6, 6, 5, stride=2, groups=6)
        self.mid = conv(6, 8, 3, padding=1)
        self.one = nn.Conv2d(8, 7, 1)                  # on the pooled 1x1 map
        self.one_strided = nn.Conv2d(8, 5, 1, stride=3, bias=False)   # 3x3 -> 1x1: reads (0, 0)
        self.head = nn.Linear(12, 4)
        nn.init.uniform_(self.bn.weight, 0.5, 1.5)
        self.bn.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        h = self.mid(F.relu(self.dw(F.relu(self.bn(self.c0(x))))))      # (B, 8, 3, 3)
        a = self.one(h.mean((2, 3), keepdim=True)).flatten(1)
        b = self.one_strided(h).flatten(1)
        return self.head(torch.tanh(torch.cat([a, b], 1)))


def _token_batches():
    return token_batches(2, bs=4, vocab=9, n_classes=9)


HOOK_CASES = {
    "rescnn": (ResCNN, lambda: image_batches(2, bs=5, hw=10)),
    "tokens": (TokenNet, _token_batches),
    "twice": (TwiceNet, lambda: vector_batches(2, bs=5)),
    "same-conv": (SameNet, lambda: image_batches(2, bs=5, hw=11)),
}


@pytest.mark.parametrize("mode", ["expected", "sampled", "empirical"])
@pytest.mark.parametrize("case", sorted(HOOK_CASES))
def test_fisher_hooks_against_brute_force(case, mode):
    make, batches = HOOK_CASES[case]
    net, data = make(), batches()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fisher")   # "auto" must not fall back here
        f = diagonal_fisher(net, data, mode=mode, seed=2, chunk_size=3, progress=False)
    assert f.backend == "hooks"
    assert_rel(f, brute_force(net, data, mode, seed=2))
    assert not net.training


def test_fisher_hooks_cnn_batchnorm_n_examples():
    net, data = cnn(norm="bn"), image_batches(2, bs=5)
    f = diagonal_fisher(net, data, n_examples=7, chunk_size=8, progress=False, backend="hooks")
    assert f.n_examples == 7
    assert_rel(f, brute_force(net, data, "expected", n_examples=7))


def test_fisher_hooks_subset_and_frozen_params():
    net, data = ResCNN(), image_batches(1, bs=4, hw=10)
    for p in net.conv0.parameters():
        p.requires_grad_(False)
    names = ["conv0.weight", "bn1.weight", "conv3.weight", "head.bias"]
    f = diagonal_fisher(net, data, mode="empirical", params=names, progress=False, backend="hooks")
    ref = diagonal_fisher(net, data, mode="empirical", params=names, progress=False, backend="vmap")
    assert set(f) == set(names) and not net.conv0.weight.requires_grad
    assert_rel(f, {k: v.double() for k, v in ref.items()})


def test_fisher_auto_falls_back_on_raw_parameter():
    net, data = RawParamNet(), vector_batches(2, bs=4)
    f = diagonal_fisher(net, data, mode="empirical", progress=False)
    assert f.backend == "vmap"
    assert_rel(f, brute_force(net, data, "empirical"))
    with pytest.raises(MergelabError, match="fisher backend 'hooks': parameter 'scale'"):
        diagonal_fisher(net, data, progress=False, backend="hooks")
    # the subset that lives in supported leaves can use hooks
    f = diagonal_fisher(net, data, mode="empirical", params=["fc.weight", "out.weight"], progress=False)
    assert f.backend == "hooks"


def test_fisher_auto_check_catches_parameter_used_outside_its_module():
    net, data = SneakyNet(), vector_batches(2, bs=4)
    with pytest.warns(UserWarning, match="parameter 'fc.weight'"):
        f = diagonal_fisher(net, data, mode="expected", progress=False)
    assert f.backend == "vmap"
    assert_rel(f, brute_force(net, data, "expected"))
    # forcing hooks gives a wrong answer here: the check is what protects "auto"
    wrong = diagonal_fisher(net, data, mode="expected", progress=False, backend="hooks")
    assert float((wrong["fc.weight"] - f["fc.weight"]).abs().max()) > 1e-3 * float(f["fc.weight"].abs().max())


@pytest.mark.parametrize("conv, why", [(WSConv, "other than its own weight"),
                                       (TwiceConv, "called _conv_forward 2 times")])
def test_fisher_conv_subclass_that_hooks_cannot_serve(conv, why):
    """A conv subclass recorded at _conv_forward must convolve once with its own weight: else
    "hooks" refuses in one line and "auto" falls back to vmap with the exact answer."""
    net, data = SameNet(conv), image_batches(2, bs=4, hw=11)
    with pytest.raises(MergelabError, match=f"fisher backend 'hooks': .*{why}"):
        diagonal_fisher(net, data, progress=False, backend="hooks")
    assert "_conv_forward" not in vars(net.mid)      # the instance's method is restored
    with pytest.warns(UserWarning, match=why):
        f = diagonal_fisher(net, data, mode="sampled", seed=1, progress=False)
    assert f.backend == "vmap"
    assert_rel(f, brute_force(net, data, "sampled", seed=1))


def test_fisher_backend_errors():
    with pytest.raises(MergelabError, match="fisher backend: expected one of auto, hooks, vmap"):
        diagonal_fisher(mlp(), vector_batches(1), progress=False, backend="jax")
    net = RawParamNet()   # a parameter of a module with submodules: no hooks
    with pytest.raises(MergelabError, match="fisher backend 'hooks': parameter 'scale': RawParamNet is not a "
                                            "supported module type; expected parameters of modules "
                                            "without submodules"):
        diagonal_fisher(net, vector_batches(1), progress=False, backend="hooks")


def test_fisher_hooks_serve_a_norm_with_its_own_forward():
    """A LayerNorm subclass over NCHW channels (its own forward, so not the closed form):
    hooks take its per-example gradients from the module's own code (vmap over that leaf)."""
    from _stats_models import LayerNorm2d
    net, data = cnn(norm="ln"), image_batches(2, bs=4)
    assert isinstance(net[1], LayerNorm2d)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="fisher")
        f = diagonal_fisher(net, data, mode="expected", progress=False)
    assert f.backend == "hooks"
    assert_rel(f, brute_force(net, data, "expected"))
    assert_rel(diagonal_fisher(net, data, mode="empirical", progress=False, backend="hooks"),
               brute_force(net, data, "empirical"))
