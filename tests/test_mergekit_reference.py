"""mergelab against the real mergekit-yaml (0.1.5), tensor by tensor, on tiny Llama checkpoints.

Runs ``benchmarks/mergekit_compat.py``'s cases (every method mergekit 0.1.5 registers and the
recipe features: gradients, filters, normalize, int8_mask, lambda, rescale, slices, tokenizer
union/base, base+lora, out_dtype) in both tools and asserts the tolerances established there
(docs/mergekit.md, "Measured against mergekit-yaml").  Skipped unless mergekit-yaml is found
(``$MERGEKIT_YAML``, ``.venv-mergekit/`` from scripts/setup-mergekit.sh, or PATH).

Tolerances: ``identical`` = least share of bit-identical elements, ``ulps`` = largest
difference in bf16 ulps at the tensor's scale.  Setting ``float32`` (both tools compute in
float32): equal formulas give bit-identical outputs or 1-ulp float32 ordering differences;
``ties``, ``breadcrumbs*`` and ``sce`` differ only where equal magnitudes (variances) sit at
their cut (mergekit's unstable sort / top-k picks among them; ``tie_break: argsort`` makes
them identical).  Setting ``bfloat16``: mergekit computes in bf16, mergelab in float32, so
continuous methods differ by bf16 rounding and selection methods also in which entries cross a
cut.  Random methods (DARE, DELLA): per-tensor statistics of ``out − base``.
"""
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


from _mergekit import find_mergekit  # noqa: E402

MK = find_mergekit()
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MK is None, reason="mergekit-yaml not installed")]

EXACT = (1.0, 0.0)  # every element bit-identical
# case -> {setting: (least identical share, most tensor-scale bf16 ulps)}
TOL = {
    "linear": {"float32": (0.97, 1), "bfloat16": (0.97, 1)},
    "linear_nonorm": {"float32": (0.999, 0.1), "bfloat16": (0.999, 0.1)},
    "task_arithmetic": {"float32": EXACT, "bfloat16": (0.85, 1)},
    "task_arithmetic_norm": {"float32": EXACT, "bfloat16": (0.8, 1)},
    "ties": {"float32": (0.97, 16), "bfloat16": (0.85, 32)},
    "ties_int8_lambda": {"float32": (0.97, 16), "bfloat16": (0.8, 32)},
    "ties+argsort": {"float32": EXACT, "bfloat16": (0.85, 32)},
    "ties_int8_lambda+argsort": {"float32": EXACT, "bfloat16": (0.8, 32)},
    "slerp": {"float32": (0.999, 1), "bfloat16": (0.999, 1)},
    "breadcrumbs": {"float32": (0.97, 16), "bfloat16": (0.8, 32)},
    "breadcrumbs_rescale": {"float32": (0.97, 32), "bfloat16": (0.75, 48)},
    "breadcrumbs_ties": {"float32": (0.97, 24), "bfloat16": (0.85, 32)},
    "sce": {"float32": (0.97, 16), "bfloat16": (0.9, 32)},
    "breadcrumbs+argsort": {"float32": EXACT, "bfloat16": (0.8, 32)},
    "breadcrumbs_rescale+argsort": {"float32": (0.9999, 0.01), "bfloat16": (0.75, 48)},  # L1 sums: float64 vs float32
    "breadcrumbs_ties+argsort": {"float32": EXACT, "bfloat16": (0.85, 32)},
    "sce+argsort": {"float32": EXACT, "bfloat16": (0.9, 32)},
    "model_stock": {"float32": (0.999, 1), "bfloat16": (0.6, 2)},
    "nuslerp": {"float32": (0.999, 1), "bfloat16": (0.3, 3)},
    "nuslerp_base_rows": {"float32": EXACT, "bfloat16": (0.8, 2)},
    "multislerp": {"float32": (0.999, 1), "bfloat16": (0.75, 2)},
    "karcher": {"float32": (0.999, 1), "bfloat16": (0.4, 3)},
    "nearswap": {"float32": EXACT, "bfloat16": (0.65, 2)},
    "arcee_fusion": {"float32": EXACT, "bfloat16": (0.85, 32)},
    "ram": {"float32": EXACT, "bfloat16": (0.9, 1)},
    "ramplus_tl": {"float32": EXACT, "bfloat16": (0.4, 1)},
    "passthrough": {"float32": EXACT, "bfloat16": EXACT},
    "slices_passthrough": {"float32": EXACT, "bfloat16": EXACT},
    "slices_slerp": {"float32": EXACT, "bfloat16": EXACT},
    "tokenizer_union": {"float32": (0.999, 0.1), "bfloat16": (0.999, 0.1)},
    "tokenizer_union_ta": {"float32": EXACT, "bfloat16": (0.9, 1)},
    "tokenizer_base": {"float32": (0.999, 0.1), "bfloat16": (0.999, 0.1)},
    "lora": {"float32": EXACT, "bfloat16": EXACT},
    "lora_ta": {"float32": EXACT, "bfloat16": (0.9, 1)},
    "out_dtype_float16": {"float32": (0.999, 0.01), "bfloat16": (0.05, 1)},
}
RANDOM = ("dare_linear", "dare_linear_1", "dare_linear_norescale", "dare_ties",
          "della", "della_linear", "della_linear_1")
# mergekit writes float32 tensors for these with dtype: bfloat16 (its float mask promotes the
# result); mergelab writes the recipe's dtype: only names and shapes are compared structurally
MK_FLOAT32_OUT = {"arcee_fusion@bfloat16", "ramplus_tl@bfloat16"}


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    import mergekit_compat as mc

    return mc.run(MK, tmp_path_factory.mktemp("mk-ref"))


def test_every_registered_method_is_covered():
    import mergekit_compat as mc
    from mergelab.methods import get_method

    covered = {r["merge_method"] for r in mc.cases(
        {k: Path(k) for k in ("base", "a", "a2", "b", "lora")}, ("float32",)).values()}
    assert set(mc.MK_METHODS) <= covered
    for m in mc.MK_METHODS:
        assert get_method(m) is not None


def _case_ids():
    return [f"{c}@{s}" for c in [*TOL, *RANDOM] for s in ("float32", "bfloat16")]


@pytest.mark.parametrize("case", _case_ids())
def test_against_mergekit(results, case):
    s = results[case]
    assert "error" not in s, s
    name, setting = case.split("@")
    if case in MK_FLOAT32_OUT:
        assert s["elements"] > 0
    else:
        assert s["structure_ok"], s
    if name in RANDOM:
        # same distribution: kept fraction, mean and spread of the merged delta per tensor
        assert s["tensors_compared"] >= 20
        assert s["kept_z"] < 4.0 and s["std_z"] < 4.0 and s["mean_z"] < 4.5, s
        assert abs(s["std_ratio"] - 1) < 0.01, s
        return
    least, ulps = TOL[name][setting]
    assert s["identical"] >= least, s
    assert s["ulp_tensor"] <= ulps, s
