"""The recipe stage protocol: one registry of (key, schema, phase, check, run) that recipe.py
builds its sections from and the engine runs; a new stage is one registration."""
import pytest
import torch
from pydantic import BaseModel, ConfigDict

import mergelab.engine.planning as plan_mod
import mergelab.engine.run as run_mod
import mergelab.recipe as recipe_mod
from core_helpers import nothing_written, save_hf
from mergelab import merge
from mergelab.errors import MergelabError
from mergelab.stages import STAGES, Stage, stages
from mergelab.stages.registry import register


def test_builtin_stages_and_their_order():
    assert [s.key for s in stages()] == ["align", "repair", "tact"]
    assert [s.key for s in stages("after")] == ["repair", "tact"]
    for s in stages():
        assert recipe_mod.Recipe.model_fields[s.key].default is None
    with pytest.raises(MergelabError, match=r"unknown key 'bogus' in 'repair' \(supported: .*data"):
        recipe_mod.Recipe.load({"models": [{"model": "x"}], "merge_method": "linear",
                                "repair": {"data": "d", "bogus": 1}})
    with pytest.raises(MergelabError, match=r"unknown key 'x' in 'align.transfer' \(supported: foundation_b"):
        recipe_mod.Recipe.load({"models": [{"model": "x"}], "merge_method": "linear",
                                "align": {"transfer": {"foundation_b": "a", "experts": ["b"], "x": 1}}})


def test_a_new_stage_is_one_registration(tmp_path, monkeypatch):
    class Stamp(BaseModel):
        model_config = ConfigDict(extra="forbid")
        text: str

    seen = []

    def check(sec, ctx):
        if not sec.text:
            raise MergelabError("recipe: stamp: 'text' is empty")
        seen.append(("check", ctx.plan.method.name))

    def run(sec, ctx):
        (ctx.folder / "STAMP").write_text(sec.text)  # inside the atomic output folder
        seen.append(("run", sorted(p.name for p in ctx.folder.iterdir() if p.suffix == ".safetensors")))

    register(Stage("stamp", Stamp, "after", check, run, order=99))
    try:
        cls = recipe_mod.recipe_model()
        monkeypatch.setattr(plan_mod, "Recipe", cls)
        monkeypatch.setattr(run_mod, "Recipe", cls)
        p = save_hf(tmp_path / "m", {"w": torch.ones(2, 2)})
        r = {"models": [{"model": str(p)}], "merge_method": "linear", "stamp": {"text": "hello"}}
        res = merge(r, tmp_path / "o", quiet=True)
        assert (res.outputs[0] / "STAMP").read_text() == "hello"
        assert seen == [("check", "linear"), ("run", ["model.safetensors"])]
        with pytest.raises(MergelabError, match="stamp: 'text' is empty"):
            merge({**r, "stamp": {"text": ""}}, tmp_path / "o2", quiet=True)
        assert nothing_written(tmp_path / "o2")
    finally:
        del STAGES["stamp"]
