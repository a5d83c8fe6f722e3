"""Issue 9 item 2: the NaN/Inf check runs on the STORED tensor, after the cast to the stored
dtype, for every stored variant; float16 overflow is an error naming the tensor, the dtype and
the largest magnitude, and suggesting bfloat16/float32 (unless allow_nonfinite)."""
import math

import pytest
import torch
import yaml
from click.testing import CliRunner

import mergelab as ml
from core_helpers import nothing_written, save_hf
from mergelab.cli import main
from mergelab.errors import MergelabError
from mergelab.io import open_checkpoint


def _big(tmp_path):
    t = {"small.weight": torch.ones(4, 4), "big.weight": torch.full((3, 5), 1.0e5), "n": torch.arange(3)}
    t["big.weight"][1, 2] = -2.5e5
    return [save_hf(tmp_path / n, {k: (v * s if v.is_floating_point() else v) for k, v in t.items()})
            for n, s in (("a", 1.0), ("b", 1.0))]


def _recipe(paths, **kw):
    return {"models": [{"model": str(p)} for p in paths], "merge_method": "linear", **kw}


def test_float16_overflow_is_an_error_naming_tensor_dtype_and_magnitude(tmp_path):
    paths = _big(tmp_path)
    with pytest.raises(MergelabError) as e:
        ml.merge(_recipe(paths, dtype="float16"), tmp_path / "o", quiet=True)
    msg = str(e.value)
    assert "'big.weight'" in msg and "float16" in msg and "250000" in msg
    assert "bfloat16" in msg and "float32" in msg and "\n" not in msg
    assert nothing_written(tmp_path / "o")
    # the same through --dtype, and in memory
    with pytest.raises(MergelabError, match="big.weight"):
        ml.merge(_recipe(paths), tmp_path / "o", dtype="float16", quiet=True)
    st = {"big.weight": torch.full((2, 2), 7.0e4)}
    with pytest.raises(MergelabError, match="float16"):
        ml.merge_states("linear", [st, st], dtype="float16")


def test_float16_overflow_cli_one_line_exit_2(tmp_path):
    paths = _big(tmp_path)
    rp = tmp_path / "r.yaml"
    rp.write_text(yaml.safe_dump(_recipe(paths, dtype="float16")))
    res = CliRunner().invoke(main, ["merge", str(rp), "-o", str(tmp_path / "o"), "-q"])
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "big.weight" in lines[0]
    assert nothing_written(tmp_path / "o")


def test_allow_nonfinite_writes_the_inf_and_wide_dtypes_are_fine(tmp_path):
    paths = _big(tmp_path)
    res = ml.merge(_recipe(paths, dtype="float16", allow_nonfinite=True), tmp_path / "o", quiet=True)
    got = open_checkpoint(res.outputs[0]).get("big.weight")
    assert got.dtype == torch.float16 and math.isinf(float(got[0, 0])) and float(got[1, 2]) == -math.inf
    for dt in ("bfloat16", "float32"):
        res = ml.merge(_recipe(paths, dtype=dt), tmp_path / dt, quiet=True)
        assert torch.isfinite(open_checkpoint(res.outputs[0]).get("big.weight").float()).all()


def test_nan_from_the_method_keeps_its_own_message(tmp_path):
    from mergelab.methods.registry import REGISTRY, merge_method

    @merge_method("_finite_nan")
    def _nan(tensors, base):
        return tensors[0] * math.nan

    try:
        paths = _big(tmp_path)
        with pytest.raises(MergelabError, match="method '_finite_nan' produced NaN or Inf for tensor"):
            ml.merge({"models": [{"model": str(paths[0])}], "merge_method": "_finite_nan"}, tmp_path / "o",
                     quiet=True)
    finally:
        del REGISTRY["_finite_nan"]


def test_stored_variants_of_stages_are_checked_after_the_cast(tmp_path):
    # TACT's per-task folded checkpoints and REPAIR's rewritten weights go through _like:
    # cast to the merged checkpoint's dtype, then checked
    from mergelab.repair.pipeline import _like

    folder = save_hf(tmp_path / "m", {"w": torch.ones(3, 3, dtype=torch.float16)})
    ck = open_checkpoint(folder)
    with pytest.raises(MergelabError, match=r"tensor 'w': tact task 'a' .*float16.*bfloat16"):
        _like(ck, {"w": torch.full((3, 3), 1e6)}, "tact task 'a'", allow_nonfinite=False)
    out = _like(ck, {"w": torch.full((3, 3), 1e6)}, "tact task 'a'", allow_nonfinite=True)
    assert out["w"].dtype == torch.float16 and torch.isinf(out["w"]).all()
    assert torch.equal(_like(ck, {"w": torch.full((3, 3), 2.0)}, "x", allow_nonfinite=False)["w"],
                       torch.full((3, 3), 2.0, dtype=torch.float16))
