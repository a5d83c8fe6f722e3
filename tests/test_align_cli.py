"""`mergelab align` end to end, its one-line errors, and the recipe `align:` section."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergelab.align import load_permutation, permutation_spec, permute

MODEL_CODE = textwrap.dedent("""
    import torch
    from torch import nn

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(6, 12)
            self.fc2 = nn.Linear(12, 10)
            self.fc3 = nn.Linear(10, 3)

        def forward(self, x):
            return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    def make():
        return Net()

    class Broken(Net):
        def forward(self, x):
            raise RuntimeError("custom kernel missing")

    def broken():
        return Broken()

    def not_a_model():
        return 42
""")


def _net(tmp_path):
    (tmp_path / "netcode.py").write_text(MODEL_CODE)
    sys.path.insert(0, str(tmp_path))
    try:
        import importlib
        import netcode
        importlib.reload(netcode)
        return netcode
    finally:
        sys.path.remove(str(tmp_path))


def _save(state, path):
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


@pytest.fixture()
def pair(tmp_path):
    """A (reference), B = A permuted by a random permutation, and the spec."""
    netcode = _net(tmp_path)
    torch.manual_seed(0)
    a = netcode.make()
    spec = permutation_spec(a, torch.randn(2, 6))
    assert len(spec.groups) == 2   # the two hidden layers (12 and 10 units); input and output stay
    perm = spec.random_permutation(seed=5)
    sa = a.state_dict()
    sb = permute(spec, sa, perm)
    pa = _save(sa, tmp_path / "a.safetensors")
    pb = _save(sb, tmp_path / "b.safetensors")
    return dict(tmp=tmp_path, netcode=netcode, spec=spec, perm=perm, sa=sa, sb=sb, pa=pa, pb=pb)


def _cli(*args, cwd=None):
    """The real command in a subprocess (slow: a fresh interpreter imports torch)."""
    return subprocess.run([sys.executable, "-m", "mergelab", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=120)


class _Res:
    def __init__(self, r):
        self.returncode, self.stdout, self.stderr = r.exit_code, r.stdout, r.stderr


def _run(*args):
    """The same command in-process (click's runner; the group's error handling included)."""
    from click.testing import CliRunner
    from mergelab.cli import main
    return _Res(CliRunner().invoke(main, [str(a) for a in args]))


def test_cli_align_end_to_end_recovers_reference_and_transfers(pair):
    t = pair["tmp"]
    # an expert fine-tuned from B (B plus a delta): --transfer-to writes it in A's frame
    torch.manual_seed(1)
    se = {k: v + 0.01 * torch.randn_like(v) for k, v in pair["sb"].items()}
    pe = _save(se, t / "expert_b.safetensors")
    out = t / "out"
    r = _cli("align", pair["pa"], pair["pb"], "-o", out, "--model-code", f"{t / 'netcode.py'}:make",
             "--input-shape", "2,6", "--checkpoints", "--transfer-to", pe)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "spec: 2 groups" in r.stdout
    p = load_permutation(out / "b.permutation.safetensors", pair["spec"])
    # B aligned back equals A exactly (identical weights)
    back = permute(pair["spec"], pair["sb"], p)
    for k, v in pair["sa"].items():
        assert torch.equal(back[k], v), k
    # the written checkpoint of B (streamed through PermutedCheckpoint) is A
    from mergelab.io import open_checkpoint
    ck = open_checkpoint(out / "b")
    for k, v in pair["sa"].items():
        assert torch.equal(ck.get(k), v), k
    # the transferred expert is the expert permuted by B's permutation, and computes the same function
    ce = open_checkpoint(out / "expert_b")
    want = permute(pair["spec"], se, p)
    for k in se:
        assert torch.equal(ce.get(k), want[k]), k
    m1, m2 = pair["netcode"].make(), pair["netcode"].make()
    m1.load_state_dict(se)
    m2.load_state_dict({k: ce.get(k) for k in ce.keys()})
    x = torch.randn(5, 6)
    torch.testing.assert_close(m1(x), m2(x), rtol=1e-5, atol=1e-5)
    # outputs are not overwritten without --force
    r2 = _run("align", pair["pa"], pair["pb"], "-o", out, "--model-code", f"{t / 'netcode.py'}:make",
              "--input-shape", "2,6")
    assert r2.returncode == 2 and r2.stderr.startswith("error: ") and "already exists" in r2.stderr


def _one_line_error(r, *words):
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for w in words:
        assert w in lines[0], lines[0]


def test_cli_align_one_line_errors(pair):
    t = pair["tmp"]
    code = f"{t / 'netcode.py'}"
    base = ["align", pair["pa"], pair["pb"], "-o", t / "o", "--input-shape", "2,6"]
    # a missing checkpoint
    _one_line_error(_run("align", pair["pa"], t / "nope.safetensors", "-o", t / "o", "--model-code", code + ":make",
                         "--input-shape", "2,6"), "nope.safetensors", "no such file")
    # bad factories: no such module, no such function, not returning a module
    _one_line_error(_run(*base, "--model-code", "no_such_module_xyz:make"), "no_such_module_xyz", "cannot import")
    _one_line_error(_run(*base, "--model-code", code + ":nothing"), "has no function 'nothing'")
    _one_line_error(_run(*base, "--model-code", code + ":not_a_model"), "nn.Module", "int")
    _one_line_error(_run(*base, "--model-code", "make"), "MODULE:FACTORY")
    # an untraceable model (its forward fails on the example inputs)
    _one_line_error(_run(*base, "--model-code", code + ":broken"), "custom kernel missing")
    # no way to make example inputs; no architecture for a plain file
    _one_line_error(_run("align", pair["pa"], pair["pb"], "-o", t / "o", "--model-code", code + ":make"),
                    "--input-shape")
    _one_line_error(_run("align", pair["pa"], pair["pb"], "-o", t / "o", "--input-shape", "2,6"),
                    "--model-code")
    # weights of another architecture
    other = _save({"w": torch.zeros(3)}, t / "other.safetensors")
    _one_line_error(_run("align", pair["pa"], other, "-o", t / "o", "--model-code", code + ":make",
                         "--input-shape", "2,6"), "other.safetensors", "fc1.weight")
    # activation matching needs data
    _one_line_error(_run(*base, "--model-code", code + ":make", "--method", "activation"), "--data")
    assert not (t / "o").exists()


def test_cli_align_module_factory_from_cwd(pair, monkeypatch):
    """MODULE:FACTORY with an importable module name (resolved from the working directory)."""
    t = pair["tmp"]
    monkeypatch.chdir(t)
    monkeypatch.setattr(sys, "path", list(sys.path))
    r = _run("align", pair["pa"], pair["pb"], "-o", t / "o2", "--model-code", "netcode:make",
             "--input-shape", "2,6", "-q")
    assert r.returncode == 0, r.stderr
    assert r.stdout == ""
    p = load_permutation(t / "o2" / "b.permutation.safetensors", pair["spec"])
    assert all(torch.equal(p[g], pair["spec"].check(p)[g]) for g in p)


def test_cli_align_activation_with_npz_data(pair):
    import numpy as np
    t = pair["tmp"]
    np.savez(t / "data.npz", x=np.random.default_rng(0).normal(size=(64, 6)).astype(np.float32))
    r = _run("align", pair["pa"], pair["pb"], "-o", t / "o3", "--model-code", f"{t / 'netcode.py'}:make",
             "--method", "activation", "--data", t / "data.npz", "--batch-size", "16")
    assert r.returncode == 0, r.stderr
    p = load_permutation(t / "o3" / "b.permutation.safetensors", pair["spec"])
    back = permute(pair["spec"], pair["sb"], p)
    for k, v in pair["sa"].items():
        assert torch.equal(back[k], v), k


# ----------------------------------------------------------------------------- recipes
def test_recipe_align_section_aligns_before_merge(pair):
    from mergelab.merge import merge
    t = pair["tmp"]
    recipe = {"models": [{"model": str(pair["pa"]), "parameters": {"weight": 0.5}},
                         {"model": str(pair["pb"]), "parameters": {"weight": 0.5}}],
              "merge_method": "linear"}
    # without alignment, averaging A with a permuted copy of A is not A
    merge(recipe, t / "plain", quiet=True, checksums=False)
    plain = load_file(str(next((t / "plain").glob("*.safetensors"))))
    assert not torch.allclose(plain["fc1.weight"], pair["sa"]["fc1.weight"])
    recipe["align"] = {"method": "weight", "model_code": f"{t / 'netcode.py'}:make", "input_shape": [2, 6]}
    merge(recipe, t / "aligned", quiet=True, checksums=False)
    got = load_file(str(next((t / "aligned").glob("*.safetensors"))))
    for k, v in pair["sa"].items():
        torch.testing.assert_close(got[k], v, rtol=0, atol=1e-6)


def test_recipe_align_transfer(pair):
    """Non-local pipeline: expert of B read through the B->A permutation, expert of A as is."""
    from mergelab.merge import merge
    t = pair["tmp"]
    torch.manual_seed(2)
    d1 = {k: 0.01 * torch.randn_like(v) for k, v in pair["sa"].items()}
    d2 = {k: 0.01 * torch.randn_like(v) for k, v in pair["sa"].items()}
    ea = _save({k: v + d1[k] for k, v in pair["sa"].items()}, t / "ea.safetensors")
    eb = _save(permute(pair["spec"], {k: v + d2[k] for k, v in pair["sa"].items()}, pair["perm"]),
               t / "eb.safetensors")
    recipe = {"models": [{"model": str(ea), "parameters": {"weight": 0.5}},
                         {"model": str(eb), "parameters": {"weight": 0.5}}],
              "merge_method": "linear",
              "align": {"reference": str(pair["pa"]), "model_code": f"{t / 'netcode.py'}:make",
                        "input_shape": [2, 6], "transfer": {"foundation_b": str(pair["pb"]), "experts": [str(eb)]}}}
    merge(recipe, t / "out", quiet=True, checksums=False)
    got = load_file(str(next((t / "out").glob("*.safetensors"))))
    for k, v in pair["sa"].items():
        torch.testing.assert_close(got[k], v + (d1[k] + d2[k]) / 2, rtol=0, atol=1e-6)


def test_recipe_align_errors(pair):
    from mergelab.errors import MergelabError
    from mergelab.merge import merge
    from mergelab.recipe import Recipe
    t = pair["tmp"]
    base = {"models": [{"model": str(pair["pa"])}, {"model": str(pair["pb"])}], "merge_method": "linear"}
    with pytest.raises(MergelabError, match=r"unknown key 'foo' in 'align' \(supported: method"):
        Recipe.load({**base, "align": {"foo": 1}})
    with pytest.raises(MergelabError, match="align.method"):
        Recipe.load({**base, "align": {"method": "magic"}})
    with pytest.raises(MergelabError, match="is not one of the recipe's models"):
        merge({**base, "align": {"model_code": f"{t / 'netcode.py'}:make", "input_shape": [2, 6],
                                 "transfer": {"foundation_b": str(pair["pb"]), "experts": [str(t / "x.safetensors")]}}},
              t / "o", quiet=True, checksums=False)
    assert not (t / "o").exists()


def test_align_hf_folder_architecture_from_config(tmp_path):
    """A Hugging Face folder needs no factory: the class comes from config.json."""
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).parent))
    from align_models import bert_inputs, tiny_bert
    from mergelab.align.pipeline import run_align
    from mergelab.io import save_state
    m = tiny_bert()
    m.save_pretrained(str(tmp_path / "a"))
    spec = permutation_spec(m, bert_inputs())
    perm = spec.random_permutation(seed=3)
    sb = permute(spec, m.state_dict(), perm)
    save_state(sb, tmp_path / "b", like=tmp_path / "a")
    res, written = run_align(tmp_path / "a", [tmp_path / "b"], tmp_path / "out")
    assert len(res.spec.groups) == len(spec.groups) == 8   # see test_align: BertModel, 2 layers
    p = load_permutation(tmp_path / "out" / "b.permutation.safetensors", res.spec)
    back = permute(res.spec, sb, p)
    for k, v in m.state_dict().items():
        assert torch.equal(back[k], v), k
