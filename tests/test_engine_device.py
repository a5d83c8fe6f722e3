"""Device placement: methods create every tensor on their inputs' device (CPU checks here),
and the ``cuda``-marked tests compare each method on CUDA with the CPU result."""
import ast
import pathlib

import pytest
import torch

import mergelab as ml
from mergelab.errors import MergelabError

METHODS_DIR = pathlib.Path(ml.__file__).parent / "methods"
FACTORIES = {"zeros", "ones", "empty", "full", "tensor", "as_tensor", "arange", "rand", "randn", "randint",
             "randperm", "linspace", "logspace", "eye"}


def _states(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = {"emb.weight": torch.randn(33, 20, generator=g), "layers.0.w": torch.randn(12, 20, generator=g),
            "layers.1.w": torch.randn(12, 20, generator=g), "layers.1.b": torch.randn(12, generator=g),
            "count": torch.tensor([3])}
    states = [{k: v + 0.1 * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone()
               for k, v in base.items()} for _ in range(n)]
    stats = {"fisher": [{k: torch.rand(v.shape, generator=g) for k, v in s.items() if v.is_floating_point()}
                        for s in states],
             "gram": [{k: (lambda x: x.T @ x)(torch.randn(25, v.shape[1], generator=g))
                       for k, v in s.items() if v.dim() == 2} for s in states]}
    return base, states, stats


CASES = [  # (method, params, uses base, exact on CUDA vs CPU)
    ("linear", {"weight": [0.2, 0.3, 0.5]}, False, True),
    ("task_arithmetic", {"weight": [0.5, 1.0, 0.7], "lambda_": 0.8}, True, True),
    ("ties", {"density": 0.4}, True, True),
    ("ties", {"density": [0.3, 0.5, 0.7], "scope": "global"}, True, True),
    ("ties", {"density": 0.4, "tie_break": "argsort"}, True, False),
    ("dare_linear", {"density": 0.5}, True, True),
    ("dare_ties", {"density": [0.3, 0.6, 0.9]}, True, True),
    ("tall_masks", {"base_merge": "ties", "density": 0.5, "lambda_": 0.4}, True, True),
    ("consensus", {"base_merge": "ties", "density": 0.5, "scope": "global", "k": 2}, True, True),
    ("consensus", {"base_merge": "task_arithmetic", "k": 1}, True, True),
    ("slerp", {"t": 0.3}, None, False),
    ("fisher", {"normalize": True}, False, False),
    ("regmean", {"alpha": 0.8}, False, False),
]
IDS = [f"{c[0]}-{i}" for i, c in enumerate(CASES)]


def _run(method, params, with_base, device=None, data=None):
    base, states, stats = data or _states()
    if with_base is None:
        states = states[:2]
    kind = {"fisher": "fisher", "regmean": "gram"}.get(method)
    return ml.merge_states(method, states, base if with_base else None, seed=4, device=device,
                           stats={kind: stats[kind]} if kind else None, **params)


def _flat(out):
    return out if all(isinstance(v, torch.Tensor) for v in out.values()) else \
        {f"{v}/{k}": t for v, s in out.items() for k, t in s.items()}


def test_methods_create_no_tensor_on_an_implicit_device():
    """Source lint: every tensor factory call in methods/ names its device (else *_like)."""
    bad = []
    for f in sorted(METHODS_DIR.glob("*.py")):
        for node in ast.walk(ast.parse(f.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and isinstance(node.func.value, ast.Name) and node.func.value.id == "torch"
                    and node.func.attr in FACTORIES and not any(k.arg == "device" for k in node.keywords)):
                bad.append(f"{f.name}:{node.lineno} torch.{node.func.attr}")
    assert not bad, bad


@pytest.mark.parametrize("method,params,with_base,exact", CASES, ids=IDS)
def test_methods_follow_their_inputs_not_the_default_device(method, params, with_base, exact):
    """With the default device set to 'meta', any tensor made without device=/_like would be a
    meta tensor and the merge would fail or differ: every method gives the same bytes."""
    data = _states()
    want = _flat(_run(method, params, with_base, data=data))
    with torch.device("meta"):
        got = _flat(_run(method, params, with_base, data=data))
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].device.type == "cpu" and torch.equal(got[k], want[k]), k


def test_device_is_validated_everywhere(tmp_path):
    base, states, _ = _states()
    with pytest.raises(MergelabError, match="expected cpu, cuda"):
        ml.merge_states("linear", states, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(MergelabError, match="CUDA is not available"):
            ml.merge_states("linear", states, device="cuda")
        from core_helpers import nothing_written, save_hf

        p = save_hf(tmp_path / "m", {k: v for k, v in states[0].items()})
        with pytest.raises(MergelabError, match="CUDA is not available"):
            ml.merge({"models": [{"model": str(p)}], "merge_method": "linear", "device": "cuda"},
                     tmp_path / "o", quiet=True)
        assert nothing_written(tmp_path / "o")


def test_dare_masks_are_device_independent_by_construction():
    from mergelab.methods.sparse import dare_keep

    cpu = dare_keep(5, 3_000_000, 0.3, 123)
    meta_default = None
    with torch.device("meta"):
        meta_default = dare_keep(5, 3_000_000, 0.3, 123)
    assert meta_default.device.type == "cpu" and torch.equal(cpu, meta_default)
    assert dare_keep(5, 3_000_000, 0.3, 123, device="meta").device.type == "meta"




@pytest.mark.parametrize("method,params,with_base,exact", CASES, ids=IDS)
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_equals_cpu(method, params, with_base, exact):
    cpu = _flat(_run(method, params, with_base, "cpu"))
    gpu = _flat(_run(method, params, with_base, "cuda"))
    assert sorted(cpu) == sorted(gpu)
    for k in cpu:
        assert gpu[k].device.type == "cpu"  # back on the storage device (the states')
        if exact:
            assert torch.equal(gpu[k], cpu[k]), (k, float((gpu[k].float() - cpu[k].float()).abs().max()))
        else:
            torch.testing.assert_close(gpu[k], cpu[k], rtol=1e-5, atol=1e-5)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_merge_from_files_equals_cpu(tmp_path):
    from core_helpers import save_hf
    from mergelab.io import open_checkpoint

    base, states, _ = _states()
    paths = [save_hf(tmp_path / f"m{i}", s) for i, s in enumerate([base] + states)]
    for method, params in (("dare_ties", {"density": 0.5}), ("ties", {"density": 0.3, "scope": "global"})):
        r = {"models": [{"model": str(p)} for p in paths[1:]], "base_model": str(paths[0]),
             "merge_method": method, "parameters": params, "seed": 3}
        outs = []
        for dev in ("cpu", "cuda"):
            res = ml.merge(r, tmp_path / f"{method}-{dev}", device=dev, block_size="1KiB", quiet=True)
            ck = open_checkpoint(res.outputs[0])
            outs.append({k: ck.get(k) for k in ck.keys()})
        for k in outs[0]:
            assert torch.equal(outs[0][k], outs[1][k]), (method, k)


def test_cli_device_option_and_recipe_key(tmp_path):
    import yaml
    from click.testing import CliRunner

    from core_helpers import nothing_written, save_hf
    from mergelab.cli import main
    from mergelab.io import open_checkpoint

    _, states, _ = _states()
    p = save_hf(tmp_path / "m", states[0])
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump({"models": [{"model": str(p)}], "merge_method": "linear", "device": "cpu"}))
    res = CliRunner().invoke(main, ["merge", str(rp), "-o", str(tmp_path / "o"), "-q"])
    assert res.exit_code == 0, res.output
    assert torch.equal(open_checkpoint(tmp_path / "o").get("layers.0.w"), states[0]["layers.0.w"])
    bad = ["tpu"] + ([] if torch.cuda.is_available() else ["cuda"])
    for dev in bad:
        res = CliRunner().invoke(main, ["merge", str(rp), "-o", str(tmp_path / "x"), "-q", "--device", dev])
        lines = res.stderr.strip().splitlines()
        assert res.exit_code == 2 and len(lines) == 1 and lines[0].startswith("error: --device"), res.stderr
        assert nothing_written(tmp_path / "x")
