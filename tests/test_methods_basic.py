"""linear, task_arithmetic, slerp: identities (bit-exact), formulas, and recipe errors."""
import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from mergelab.errors import MergelabError
from mergelab.methods import TensorContext, get_method


def run(name, tensors, base=None, g=None, m=None, ctx=None):
    spec = get_method(name)
    kw = spec.resolve(g or {}, m if m is not None else [{} for _ in tensors])
    return spec(tensors, base, ctx=ctx or TensorContext(name="layer.weight", seed=0), **kw)


def same_bytes(a, b):
    return a.dtype == b.dtype and a.shape == b.shape and a.numpy().tobytes() == b.numpy().tobytes()


def test_linear_one_model_weight_one_is_the_model():
    x = torch.randn(7, 5)
    assert same_bytes(run("linear", [x], m=[{"weight": 1.0}]), x)


@settings(max_examples=40, deadline=None)
@given(ws=st.lists(st.floats(0.01, 10.0), min_size=1, max_size=5), normalize=st.booleans())
def test_linear_of_identical_models_is_the_model(ws, normalize):
    x = torch.randn(6, 4)
    out = run("linear", [x.clone() for _ in ws], g={"normalize": True}, m=[{"weight": w} for w in ws])
    assert same_bytes(out, x)
    # without normalize the result is (Σw)·θ
    out = run("linear", [x.clone() for _ in ws], g={"normalize": False}, m=[{"weight": w} for w in ws])
    torch.testing.assert_close(out, x * math.fsum(ws), rtol=1e-6, atol=1e-6)


def test_linear_matches_formula():
    xs = [torch.randn(10, 3) for _ in range(3)]
    ws = [0.2, 0.5, 1.3]
    ref = sum(w * x for w, x in zip(ws, xs)) / sum(ws)
    torch.testing.assert_close(run("linear", xs, m=[{"weight": w} for w in ws]), ref)
    ref = sum(w * x for w, x in zip(ws, xs))
    torch.testing.assert_close(run("linear", xs, g={"normalize": False}, m=[{"weight": w} for w in ws]), ref)


def test_linear_zero_weight_sum_is_an_error():
    with pytest.raises(MergelabError, match="sum to 0"):
        run("linear", [torch.ones(2), torch.ones(2)], m=[{"weight": 1.0}, {"weight": -1.0}])


def test_task_arithmetic_lambda_zero_is_base():
    base = torch.randn(8, 8)
    xs = [base + torch.randn(8, 8) for _ in range(3)]
    assert same_bytes(run("task_arithmetic", xs, base, g={"lambda": 0.0}), base)


def test_task_arithmetic_one_model_is_base_plus_task_vector():
    base, x = torch.randn(9), torch.randn(9)
    assert same_bytes(run("task_arithmetic", [x], base), base + (x - base))


def test_task_arithmetic_formula():
    base = torch.randn(5, 5)
    xs = [base + torch.randn(5, 5) for _ in range(3)]
    ws, lam = [1.0, 0.5, -0.3], 0.7
    taus = [x - base for x in xs]
    ref = base + lam * sum(w * t for w, t in zip(ws, taus))
    torch.testing.assert_close(run("task_arithmetic", xs, base, g={"lambda": lam}, m=[{"weight": w} for w in ws]),
                               ref)
    ref = base + lam * sum(w * t for w, t in zip(ws, taus)) / sum(ws)
    torch.testing.assert_close(
        run("task_arithmetic", xs, base, g={"lambda": lam, "normalize": True}, m=[{"weight": w} for w in ws]), ref)


def test_task_arithmetic_needs_base():
    with pytest.raises(MergelabError, match="needs a base_model"):
        run("task_arithmetic", [torch.ones(2)], None)


@pytest.mark.parametrize("t", [0.0, 1.0])
def test_slerp_endpoints_return_the_models(t):
    a, b = torch.randn(4, 6), torch.randn(4, 6)
    out = run("slerp", [a, b], g={"t": t})
    assert same_bytes(out, a if t == 0 else b)
    # one model + base: the base is the t=0 end (mergekit)
    out = run("slerp", [b], base=a, g={"t": t}, m=[{}])
    assert same_bytes(out, a if t == 0 else b)


def test_slerp_follows_the_great_circle():
    a = torch.zeros(4); a[0] = 1.0
    b = torch.zeros(4); b[1] = 1.0
    for t in [0.1, 0.25, 0.5, 0.9]:
        out = run("slerp", [a, b], g={"t": t})
        ref = torch.tensor([math.cos(t * math.pi / 2), math.sin(t * math.pi / 2), 0.0, 0.0])
        torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)


def test_slerp_colinear_falls_back_to_lerp():
    a = torch.randn(50)
    b = 2.0 * a
    torch.testing.assert_close(run("slerp", [a, b], g={"t": 0.3}), 0.7 * a + 0.3 * b)


def test_slerp_base_listed_second_is_the_t0_end():
    a, b = torch.randn(10), torch.randn(10)
    out = run("slerp", [a, b], base=b, g={"t": 0.0})
    assert same_bytes(out, b)


@pytest.mark.parametrize("method,g,m,msg", [
    ("ties", {}, [{"density": 0.0}], r"must be in \(0, 1\]"),
    ("ties", {}, [{"density": 1.5}], r"must be in \(0, 1\]"),
    ("dare_ties", {"density": 0.0}, [{}, {}], r"must be in \(0, 1\]"),
    ("linear", {"weight": [1, 2, 3]}, [{}, {}], "has 3 values, expected 2"),
    ("slerp", {}, [{}, {}, {}], "takes 1 to 2 models"),
    ("slerp", {"t": 1.5}, [{}, {}], r"must be in \[0, 1\]"),
    ("ties", {"majority": "vote"}, [{}], "must be one of mass, frequency"),
    ("task_arithmetic", {"density": 0.5}, [{}], "unknown parameter 'density'"),
])
def test_recipe_errors_are_one_line(method, g, m, msg):
    with pytest.raises(MergelabError, match=msg) as e:
        get_method(method).resolve(g, m)
    assert "\n" not in str(e.value)
