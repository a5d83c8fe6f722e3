"""``device=`` for every stage other than the merge itself: statistics passes, REPAIR, TACT,
weight and activation matching.

* CPU (always): ``device="cpu"`` gives the same bits as the default (the model's own device),
  and a device this machine lacks is one :class:`DeviceError` before any work (CLI: exit 2).
* CUDA (``-m cuda``, skipped without a GPU): each stage on ``cuda`` equals its CPU result
  within float tolerance (permutations exactly), and the models are back on the CPU after.
"""
import copy

import pytest
import torch
from click.testing import CliRunner

from _stats_models import cnn, mlp
from align_models import MLP
from mergelab.align import permutation_spec, permute
from mergelab.align.matching import activation_matching, weight_matching
from mergelab.cli import main
from mergelab.device import resolve_device
from mergelab.errors import DeviceError, MergelabError
from mergelab.repair import repair, tact
from mergelab.stats import activation_stats, diagonal_fisher, gram_matrices
from mergelab.stats.data import TensorBatches

HAS_CUDA = torch.cuda.is_available()


def _data(n=22, shape=(10,), seed=0, n_classes=3, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return TensorBatches(torch.randn(n, *shape, generator=g) + shift,
                         torch.randint(0, n_classes, (n,), generator=g), 8)


def _cpu(d):
    return {k: v.detach().cpu() for k, v in d.items()}


def _stats(dev):
    st = activation_stats(cnn(), _data(shape=(3, 5, 5), n_classes=4), progress=False, device=dev)
    return _cpu({**{f"{s}.mean": st.mean[s] for s in st.sites}, **{f"{s}.std": st.std[s] for s in st.sites}})


def _gram(dev):
    return _cpu(gram_matrices(mlp(), _data(), progress=False, device=dev))


def _fisher(dev, **kw):
    return _cpu(diagonal_fisher(cnn(), _data(shape=(3, 5, 5), n_classes=4), progress=False, device=dev, **kw))


def _repair(dev, mode="sequential"):
    out = repair(cnn(), [cnn(1), cnn(2)], _data(shape=(3, 5, 5), n_classes=4), mode=mode, progress=False,
                 device=dev)
    return _cpu(out.state_dict())


def _tact(dev, mode="joint"):
    t = tact(mlp(1), {"a": mlp(2), "b": mlp(3)}, {"a": _data(), "b": _data(seed=1, shift=0.5)}, mode=mode,
             progress=False, device=dev)
    return t.corrections_state()


def _pair():
    torch.manual_seed(0)
    a = MLP(d_in=6, hidden=(12, 10), d_out=3).eval()
    spec = permutation_spec(a, torch.randn(2, 6))
    b = copy.deepcopy(a)
    b.load_state_dict(permute(spec, a.state_dict(), spec.random_permutation(seed=5)))
    return spec, a, b


def _weight_matching(dev):
    spec, a, b = _pair()
    noisy = {k: v + 0.01 * torch.randn_like(v) for k, v in b.state_dict().items()}
    return dict(weight_matching(spec, a.state_dict(), noisy, seed=1, device=dev))


def _activation_matching(dev):
    spec, a, b = _pair()
    data = [torch.randn(16, 6, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    return dict(activation_matching(spec, a, b, data, device=dev))


STAGES = {
    "activation_stats": _stats, "gram": _gram,
    "fisher_hooks": lambda d: _fisher(d, backend="hooks"),
    "fisher_vmap": lambda d: _fisher(d, backend="vmap"),
    "fisher_sampled": lambda d: _fisher(d, mode="sampled", seed=3),
    "repair_sequential": _repair, "repair_joint": lambda d: _repair(d, "joint"),
    "tact_joint": _tact, "tact_sequential": lambda d: _tact(d, "sequential"),
    "weight_matching": _weight_matching, "activation_matching": _activation_matching,
}


def _same(got, want, exact):
    assert set(got) == set(want)
    for k in want:
        if exact or not want[k].is_floating_point():
            assert torch.equal(got[k], want[k]), k
        else:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.parametrize("stage", list(STAGES))
def test_cpu_device_equals_default(stage):
    _same(STAGES[stage]("cpu"), STAGES[stage](None), exact=True)


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("stage", list(STAGES))
def test_cuda_without_cuda_is_one_clear_error(stage):
    with pytest.raises(DeviceError, match="CUDA is not available on this machine"):
        STAGES[stage]("cuda")


@pytest.mark.parametrize("bad", ["tpu", "cuda:x", "", 3.5])
def test_unknown_device_is_one_clear_error(bad):
    with pytest.raises(DeviceError, match="expected cpu, cuda or cuda:N"):
        resolve_device(bad)
    assert issubclass(DeviceError, MergelabError)


def test_placement_returns_models_home():
    net = cnn()
    activation_stats(net, _data(shape=(3, 5, 5), n_classes=4), progress=False, device="cpu")
    assert all(p.device.type == "cpu" for p in net.parameters())


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
@pytest.mark.parametrize("stage", list(STAGES))
def test_cuda_equals_cpu(stage):
    _same(STAGES[stage]("cuda"), STAGES[stage]("cpu"), exact=stage.endswith("matching"))


@pytest.mark.cuda
@pytest.mark.skipif(not HAS_CUDA, reason="needs CUDA")
def test_cuda_pass_leaves_models_where_they_were():
    net, experts = cnn(), [cnn(1), cnn(2)]
    data = _data(shape=(3, 5, 5), n_classes=4)
    diagonal_fisher(net, data, progress=False, device="cuda")
    fixed = repair(net, experts, data, progress=False, device="cuda")
    for m in (net, fixed, *experts):
        assert all(p.device.type == "cpu" for p in m.parameters())


# ---------------------------------------------------------------- CLI and recipe
def _invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("cmd", [["stats", "gram"], ["stats", "activations"], ["stats", "fisher"]])
def test_stats_cli_device_cuda_without_cuda(tmp_path, cmd):
    r = _invoke(*cmd, tmp_path / "m.safetensors", "--data", tmp_path / "d.npz", "-o", tmp_path / "o.safetensors",
                "--device", "cuda")
    assert r.exit_code == 2
    assert r.stderr.strip().splitlines() == [
        f"error: --device 'cuda': CUDA is not available on this machine (torch {torch.__version__}); use cpu"]
    assert not (tmp_path / "o.safetensors").exists()


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
def test_align_cli_device_cuda_without_cuda(tmp_path):
    from safetensors.torch import save_file

    _, a, b = _pair()
    for n, m in (("a", a), ("b", b)):
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(tmp_path / f"{n}.safetensors"))
    r = _invoke("align", tmp_path / "a.safetensors", tmp_path / "b.safetensors", "-o", tmp_path / "out",
                "--input-shape", "2,6", "--model-code", "align_models:MLP", "--device", "cuda")
    assert r.exit_code == 2, r.output
    assert r.stderr.strip().splitlines()[-1].startswith("error: align device 'cuda': CUDA is not available")
    assert not (tmp_path / "out").exists()


@pytest.mark.skipif(HAS_CUDA, reason="this machine has CUDA")
@pytest.mark.parametrize("section", ["repair", "tact", "align"])
def test_recipe_stage_device_cuda_without_cuda_writes_nothing(tmp_path, section):
    import mergelab as ml
    from safetensors.torch import save_file

    paths = []
    for seed in (1, 2):
        p = tmp_path / f"e{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in mlp(seed).state_dict().items()}, str(p))
        paths.append(str(p))
    (tmp_path / "d.npz").write_bytes(b"")
    sec = {"repair": {"data": str(tmp_path / "d.npz"), "device": "cuda"},
           "tact": {"tasks": {"a": {"model": paths[0], "data": str(tmp_path / "d.npz")}}, "device": "cuda"},
           "align": {"input_shape": [2, 10], "model_code": "_stats_models:mlp", "device": "cuda"}}[section]
    recipe = {"models": [{"model": p} for p in paths], "merge_method": "linear", section: sec}
    with pytest.raises(DeviceError, match=f"{section}.*CUDA is not available"):
        ml.merge(recipe, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()


def test_recipe_stage_device_cpu_equals_default(tmp_path):
    import numpy as np

    import mergelab as ml
    from safetensors.torch import save_file

    paths = []
    for seed in (1, 2):
        p = tmp_path / f"e{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in mlp(seed).state_dict().items()}, str(p))
        paths.append(str(p))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(20, 10)).astype(np.float32), y=rng.integers(0, 3, 20))
    outs = []
    for dev in (None, "cpu"):
        tact_sec = {"tasks": {"a": {"model": paths[0], "data": str(tmp_path / "d.npz")}},
                    "model_code": "_stats_models:mlp", "batch_size": 8}
        if dev:
            tact_sec["device"] = dev
        recipe = {"models": [{"model": p} for p in paths], "merge_method": "linear", "tact": tact_sec}
        ml.merge(recipe, tmp_path / f"out{dev}", quiet=True)
        outs.append(tmp_path / f"out{dev}")
    from safetensors import safe_open
    from safetensors.torch import load_file

    for f in ("tact/corrections.safetensors", "tact/a/model.safetensors", "model.safetensors"):
        a, b = load_file(str(outs[0] / f)), load_file(str(outs[1] / f))
        assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a), f
        with safe_open(str(outs[0] / f), "pt") as fa, safe_open(str(outs[1] / f), "pt") as fb:
            assert fa.metadata() == fb.metadata(), f     # equal as dicts (safetensors orders keys by hash)
