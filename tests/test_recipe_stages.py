"""Recipe stages after the merge: ``repair:`` folds REPAIR into the merged weights, ``tact:``
writes per-task corrections and folded per-task checkpoints. Each must equal the library
functions called directly on the same models and data."""
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mergelab as ml
from mergelab.errors import MergelabError
from mergelab.io import open_checkpoint
from mergelab.stats.data import load_data

FACTORY = textwrap.dedent("""
    import torch
    from torch import nn

    def make():
        return nn.Sequential(
            nn.Conv2d(1, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3))
""")


@pytest.fixture
def family(tmp_path):
    code = tmp_path / "stage_models.py"
    code.write_text(FACTORY)
    ns: dict = {}
    exec(FACTORY, ns)
    paths = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        m = ns["make"]()
        with torch.no_grad():  # non-trivial BN statistics and affine
            m[1].running_mean.normal_(); m[1].running_var.uniform_(0.5, 2); m[1].weight.uniform_(0.5, 2)
        p = tmp_path / f"expert{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(p))
        paths.append(p)
    rng = np.random.default_rng(0)
    data = {}
    for task in ("a", "b"):
        x = rng.normal(size=(48, 1, 8, 8)).astype(np.float32) + (1.0 if task == "b" else 0.0)
        np.savez(tmp_path / f"{task}.npz", x=x, y=rng.integers(0, 3, 48))
        data[task] = tmp_path / f"{task}.npz"
    return ns["make"], f"{code}:make", paths, data


def _load(make, path):
    m = make()
    ck = open_checkpoint(path)
    m.load_state_dict({k: ck.get(k) for k in ck.keys()})
    return m.eval()


def test_repair_stage_equals_library_call(tmp_path, family):
    make, code, (e1, e2), data = family
    recipe = {"models": [{"model": str(e1)}, {"model": str(e2)}], "merge_method": "linear",
              "repair": {"data": str(data["a"]), "model_code": code, "batch_size": 16}}
    plain = ml.merge({k: v for k, v in recipe.items() if k != "repair"}, tmp_path / "plain", quiet=True)
    ml.merge(recipe, tmp_path / "out", quiet=True)
    merged = _load(make, tmp_path / "plain")
    want = ml.repair(merged, [_load(make, e1), _load(make, e2)], load_data(data["a"], batch_size=16),
                     mode="sequential", progress=False)
    got = open_checkpoint(tmp_path / "out")
    assert plain is not None
    changed = 0
    for k, v in want.state_dict().items():
        torch.testing.assert_close(got.get(k), v, rtol=0, atol=1e-6, msg=k)
        changed += not torch.equal(v, open_checkpoint(tmp_path / "plain").get(k))
    assert changed > 0  # REPAIR did change the merged weights


def test_tact_stage_writes_corrections_and_folded_models(tmp_path, family):
    make, code, (e1, e2), data = family
    recipe = {"models": [{"model": str(e1)}, {"model": str(e2)}], "merge_method": "linear",
              "tact": {"model_code": code, "batch_size": 16, "head": "7",
                       "tasks": {"a": {"model": str(e1), "data": str(data["a"])},
                                 "b": {"model": str(e2), "data": str(data["b"])}}}}
    ml.merge(recipe, tmp_path / "out", quiet=True)
    out = tmp_path / "out"
    assert (out / "tact" / "corrections.safetensors").is_file()
    merged = _load(make, out)  # the merged weights themselves are untouched by tact:
    tcm = ml.tact(merged, {"a": _load(make, e1), "b": _load(make, e2)},
                  {t: load_data(data[t], batch_size=16) for t in "ab"}, head="7", mode="sequential",
                  progress=False)
    x = torch.from_numpy(np.load(data["a"])["x"][:8])
    for task in "ab":
        folded = _load(make, out / "tact" / task)
        with torch.no_grad():
            torch.testing.assert_close(folded(x), tcm(x, task=task), rtol=0, atol=1e-5)


@pytest.mark.parametrize("section,msg", [
    ({"tact": {"model_code": "X", "tasks": {"a": {"model": "nope", "data": "a.npz"}}}},
     "is not one of the recipe's models"),
    ({"repair": {"data": "missing.npz", "model_code": "X"}}, "no such file"),
    ({"repair": {"data": "a.npz", "bogus": 1}}, "bogus"),
])
def test_stage_errors_write_nothing(tmp_path, family, section, msg):
    make, code, (e1, e2), data = family
    for s in section.values():
        if s.get("model_code") == "X":
            s["model_code"] = code
        if s.get("data") == "a.npz":
            s["data"] = str(data["a"])
        for t in s.get("tasks", {}).values():
            t["data"] = str(data["a"])
    recipe = {"models": [{"model": str(e1)}, {"model": str(e2)}], "merge_method": "linear", **section}
    with pytest.raises(MergelabError, match=msg):
        ml.merge(recipe, tmp_path / "out", quiet=True)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if "mergelab-tmp" in p.name]
