from typing import Annotated, Literal

import pytest
import torch

from mergelab.errors import MergelabError
from mergelab.methods.registry import REGISTRY, Range, merge_method


@pytest.fixture
def toy():
    @merge_method("_toy_for_test")
    def toy(tensors, base, *, weight: Annotated[list[float], Range(0, None)] = 1.0,
            density: Annotated[list[float], Range(0, 1, lo_open=True)] = 1.0,
            lambda_: float = 1.0, mode: Literal["a", "b"] = "a"):
        return sum(w * t for w, t in zip(weight, tensors)) * lambda_

    yield toy
    del REGISTRY["_toy_for_test"]


def test_resolve_defaults_and_per_model(toy):
    kw = toy.resolve({"lambda": 2}, [{"weight": 0.5}, {}])
    assert kw == {"weight": [0.5, 1.0], "density": [1.0, 1.0], "lambda_": 2.0, "mode": "a"}
    out = toy([torch.ones(2), torch.ones(2)], None, **kw)
    assert torch.equal(out, torch.full((2,), 3.0))


@pytest.mark.parametrize("g,m,msg", [
    ({"bogus": 1}, [{}], "unknown parameter 'bogus'"),
    ({}, [{"density": 0.0}], "must be in (0, 1]"),
    ({}, [{"density": 1.5}], "must be in (0, 1]"),
    ({"weight": [1, 2, 3]}, [{}, {}], "has 3 values, expected 2"),
    ({"mode": "c"}, [{}], "must be one of a, b"),
    ({}, [{"lambda": 1}], "is global"),
])
def test_resolve_errors(toy, g, m, msg):
    with pytest.raises(MergelabError, match=msg.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[").replace("]", r"\]")):
        toy.resolve(g, m)
