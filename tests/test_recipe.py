import pytest

from mergelab.errors import MergelabError
from mergelab.recipe import Recipe, Rule, evaluate, layer_index, layer_t, tensor_params

MERGEKIT_TIES = """
models:
  - model: psmathur/orca_mini_v3_13b
    parameters: {density: [1, 0.7, 0.1], weight: 1.0}
  - model: garage-bAInd/Platypus2-13B
    parameters: {density: 0.5, weight: [0, 0.3, 0.7, 1]}
  - model: WizardLM/WizardMath-13B-V1.0
    parameters:
      density: 0.33
      weight: [{filter: mlp, value: 0.5}, {value: 0}]
merge_method: ties
base_model: TheBloke/Llama-2-13B-fp16
parameters: {normalize: true, int8_mask: true}
dtype: float16
"""


def test_mergekit_example_parses():
    r = Recipe.load(MERGEKIT_TIES)
    assert r.merge_method == "ties" and r.dtype == "float16" and len(r.models) == 3
    assert r.models[0].parameters["density"] == [1, 0.7, 0.1]
    assert isinstance(r.models[2].parameters["weight"][0], Rule)
    assert r.seed == 0


@pytest.mark.parametrize("key", ["modules", "merge_method_sequence"])
def test_unsupported_mergekit_keys_named(key):
    with pytest.raises(MergelabError, match=f"mergekit key '{key}'"):
        Recipe.load({"models": [], "merge_method": "linear", key: "x"})


def test_unknown_keys_named():
    with pytest.raises(MergelabError, match="unknown key 'bogus'"):
        Recipe.load({"models": [{"model": "a"}], "merge_method": "linear", "bogus": 1})
    with pytest.raises(MergelabError, match="unknown key 'weight'"):
        Recipe.load({"models": [{"model": "a", "weight": 1}], "merge_method": "linear"})
    with pytest.raises(MergelabError, match="missing key 'merge_method'"):
        Recipe.load({"models": [{"model": "a"}]})
    with pytest.raises(MergelabError, match="invalid YAML"):
        Recipe.load("models: [\n  - {model: a\nmerge_method: x\n")


def _mergekit_gradient(values, t):
    # independent restatement of mergekit's rule: linear interpolation between neighbours
    if len(values) == 1:
        return values[0]
    x = t * (len(values) - 1)
    i = min(int(x), len(values) - 2)
    return values[i] + (x - i) * (values[i + 1] - values[i])


@pytest.mark.parametrize("values", [[1, 0.7, 0.1], [0, 0.3, 0.7, 1], [0.5], [2, -1]])
def test_gradient_matches_mergekit_rule(values):
    L = 7
    for i in range(L):
        name = f"model.layers.{i}.mlp.up_proj.weight"
        t = layer_t(name, L)
        assert t == pytest.approx(i / (L - 1))
        assert evaluate(values, name, t) == pytest.approx(_mergekit_gradient(values, t))
    assert layer_t("model.embed_tokens.weight", L) == 0.0  # before the layers: t = 0, as mergekit
    # after the layers: t = 0 too (mergekit 0.1.5's plan_module: ConfigReader(t=0) for post weights)
    assert layer_t("model.norm.weight", L) == 0.0 and layer_t("lm_head.weight", L) == 0.0
    assert evaluate(values, "lm_head.weight", 0.0) == values[0]


def test_filter_rules_first_match_and_fallback():
    rules = [Rule(filter="mlp", value=0.5), Rule(filter="self_attn", value=[0, 1]), Rule(value=0)]
    assert evaluate(rules, "model.layers.3.mlp.down_proj.weight", 0.3) == 0.5
    assert evaluate(rules, "model.layers.3.self_attn.q_proj.weight", 0.25) == pytest.approx(0.25)
    assert evaluate(rules, "model.norm.weight", 0.0) == 0
    only = tensor_params({"w": [Rule(filter="mlp", value=2.0)], "d": 0.5}, "attn.weight", 0)
    assert only == {"d": 0.5}  # no rule applies: the parameter stays unset at this level


def test_layer_index_forms():
    assert layer_index("model.layers.12.self_attn.q_proj.weight") == 12
    assert layer_index("encoder.layer.3.attention.self.query.weight") == 3
    assert layer_index("transformer.h.0.attn.c_attn.weight") == 0
    assert layer_index("embeddings.word_embeddings.weight") is None


def test_relative_paths_resolve_against_recipe_folder(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "r.yaml").write_text("models: [{model: m}]\nmerge_method: linear\n")
    monkeypatch.chdir("/")
    r = Recipe.load(tmp_path / "r.yaml")
    assert r.resolve_path("m") == tmp_path / "m"
    assert "merge_method: linear" in r.to_yaml()
