import copy

import pytest
import torch
from torch import nn

from _stats_models import cnn, image_batches, tiny_bert, token_batches
from mergelab.errors import MergelabError
from mergelab.repair import load_corrections, tact
from mergelab.stats import activation_stats


class Fixed(nn.Module):
    """A task-conditioned model with the task fixed, so activation_stats can run it."""

    def __init__(self, tcm, task):
        super().__init__()
        self.tcm, self.task = tcm, task

    def forward(self, *args, **kwargs):
        return self.tcm(*args, task=self.task, **kwargs)


def average(models):
    out = copy.deepcopy(models[0])
    sds = [m.state_dict() for m in models]
    out.load_state_dict({k: (sum(sd[k].float() for sd in sds) / len(sds)).to(sds[0][k].dtype)
                         for k in sds[0]})
    return out


def setup(kind):
    if kind == "bert":
        experts = {"a": tiny_bert(1), "b": tiny_bert(2)}
        data = {"a": token_batches(2, seed=1), "b": token_batches(2, seed=2)}
    else:
        experts = {"a": cnn(1, kind), "b": cnn(2, kind)}
        data = {"a": image_batches(3, seed=1), "b": image_batches(3, seed=2, shift=0.5)}
    return average(list(experts.values())), experts, data


def call(model, batch, **kw):
    if isinstance(batch, dict):
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], **kw)
    return model(batch[0], **kw)


def logits(out):
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("kind", ["bn", "ln", "bert"])
def test_tact_sites_match_expert_statistics_and_fold(kind, tmp_path):
    merged, experts, data = setup(kind)
    # ε = 0: with ε > 0 the corrected std is σ_e·σ̂/√(σ̂² + ε) by construction, short of σ_e by
    # ε/(2σ̂²) relative (tiny BERT's attention-output sites have σ̂² ~ 1e-7).
    # "sequential" is exact over several batches; "joint" is exact with one calibration batch
    # (and is faster for BERT, whose sequential run takes one pass per site).
    if kind == "bert":
        data = {t: d[:1] for t, d in data.items()}
    tcm = tact(merged, experts, data, mode="joint" if kind == "bert" else "sequential", eps=0.0,
               progress=False)
    site_names = [s.name for s in tcm.sites]
    assert site_names[-1] == "classifier:input" if kind == "bert" else site_names[-1] == "10:input"
    for task, expert in experts.items():
        want = activation_stats(expert, data[task], site_names, progress=False)
        got = activation_stats(Fixed(tcm, task), data[task], [f"tcm.model.{s}" for s in site_names],
                               progress=False)
        for s in site_names:
            scale = want.std[s].double()     # 0 for a dead ReLU unit at the head input: then abs 1e-7
            err_m = (got.mean[f"tcm.model.{s}"].double() - want.mean[s].double()).abs() - 1e-4 * scale
            err_s = (got.std[f"tcm.model.{s}"].double() - scale).abs() - 1e-4 * scale
            assert err_m.max() <= 1e-7 and err_s.max() <= 1e-7, (task, s, float(err_m.max()), float(err_s.max()))
        # the folded plain model computes the same function as the task-conditioned model
        folded = tcm.folded_model(task).eval()
        tcm.eval()
        with torch.no_grad():
            for batch in data[task]:
                torch.testing.assert_close(logits(call(folded, batch)), logits(call(tcm, batch, task=task)),
                                           rtol=1e-5, atol=1e-5)
    # the merged model given to tact is untouched, and the corrections file round-trips
    assert all(torch.equal(a, b) for a, b in zip(merged.state_dict().values(),
                                                  average(list(experts.values())).state_dict().values()))
    tcm.save(tmp_path / "out")
    corr, meta = load_corrections(tmp_path / "out" / "corrections.safetensors")
    assert meta["mergelab_kind"] == "tact_corrections" and set(corr) == {"a", "b"}
    for t in corr:
        for s in site_names:
            assert torch.equal(corr[t][s][0], tcm.corrections[t][s][0])
    assert (tmp_path / "out" / "a" / "model.safetensors").exists()


def test_joint_pass_is_exact_with_one_calibration_batch():
    merged, experts, data = setup("bn")
    one = {t: d[:1] for t, d in data.items()}
    j = tact(merged, experts, one, mode="joint", progress=False)
    s = tact(merged, experts, one, mode="sequential", progress=False)
    for t in experts:
        for site in j.sites:
            for k in (0, 1):
                # the joint pass applies its per-batch affine to the float32 centred tensor, the
                # sequential one to the raw activations: equal up to float32 rounding (~1e-7
                # relative) that the shift b = mu* - a mu_hat can amplify by cancellation
                torch.testing.assert_close(j.corrections[t][site.name][k], s.corrections[t][site.name][k],
                                           rtol=1e-4, atol=5e-5)


@pytest.mark.parametrize("kind", ["bn", "bert"])
def test_tact_of_a_single_expert_is_identity_and_uses_each_head(kind):
    _, experts, data = setup(kind)
    a = experts["a"]
    b = copy.deepcopy(a)                               # same body, its own head
    head = b.classifier if kind == "bert" else b[10]
    torch.nn.init.normal_(head.weight)
    cal = data["a"][:1] if kind == "bert" else data["a"]    # joint with one batch is exact too
    tcm = tact(a, {"a": a, "b": b}, {"a": cal, "b": cal}, mode="joint" if kind == "bert" else "sequential",
               eps=0.0, progress=False).eval()
    a.eval(), b.eval()
    for task, expert in (("a", a), ("b", b)):
        for site, (sc, sh) in tcm.corrections[task].items():
            torch.testing.assert_close(sc, torch.ones_like(sc), rtol=0, atol=1e-4)
        with torch.no_grad():
            for batch in data["a"]:
                torch.testing.assert_close(logits(call(tcm, batch, task=task)), logits(call(expert, batch)),
                                           rtol=1e-4, atol=1e-5)


def test_tact_errors_are_one_line():
    merged, experts, data = setup("bn")
    with pytest.raises(MergelabError, match="same tasks"):
        tact(merged, experts, {"a": data["a"]}, progress=False)
    tcm = tact(merged, {"a": experts["a"]}, {"a": data["a"]}, n_batches=1, progress=False).eval()
    with pytest.raises(MergelabError, match="task 'zzz': expected one of a"):
        tcm(data["a"][0][0], task="zzz")
    # a deep copy is independent and computes the same; the folded model carries no hooks
    twin = copy.deepcopy(tcm)
    x = data["a"][0][0]
    with torch.no_grad():
        torch.testing.assert_close(twin(x, task="a"), tcm(x, task="a"))
        folded = tcm.folded_model("a")
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in folded.modules())
        torch.testing.assert_close(folded(x), tcm(x, task="a"), rtol=1e-5, atol=1e-5)
    with pytest.raises(MergelabError, match="no module named"):
        tact(merged, experts, data, sites=["nope"], progress=False)


def test_joint_step_matches_float64_reference_in_every_layout():
    """The joint pass's per-site step (statistics + correction in one go) against a float64
    computation written here: conv maps, token rows, channel-last 4-D, bfloat16 input."""
    from mergelab.repair.correct import _normalise_batch
    from mergelab.stats.moments import Moments

    g = torch.Generator().manual_seed(0)
    for shape, dim, dtype in [((8, 6, 5, 7), 1, torch.float32), ((40, 6), 1, torch.float32),
                              ((4, 9, 6), 2, torch.float32), ((3, 5, 4, 6), 3, torch.float32),
                              ((8, 6, 5, 7), 1, torch.bfloat16), ((40, 6), 1, torch.bfloat16)]:
        x = (torch.randn(shape, generator=g) * 3 + 20).to(dtype)   # |mean|/std ~ 7: cancellation-prone
        mu_t, std_t = torch.randn(6, generator=g).double(), torch.rand(6, generator=g).double() + 0.5
        mom = Moments()
        y = _normalise_batch(mom, x, dim, mu_t, std_t, 1e-5)
        xd = x.double().movedim(dim, -1).reshape(-1, 6)
        m, v = xd.mean(0), xd.var(0, unbiased=False)
        want = ((xd - m) / (v + 1e-5).sqrt() * std_t + mu_t)
        assert y.dtype == dtype and y.shape == x.shape
        got = y.double().movedim(dim, -1).reshape(-1, 6)
        tol = 1e-5 if dtype == torch.float32 else 2e-2 * float(want.abs().max())
        assert float((got - want).abs().max()) <= tol
        torch.testing.assert_close(mom.mean, m, rtol=1e-6, atol=0)
        torch.testing.assert_close(mom.var, v, rtol=1e-5, atol=0)


def test_joint_step_with_a_token_mask_uses_only_the_masked_tokens():
    from mergelab.repair.correct import _normalise_batch
    from mergelab.stats.moments import Moments

    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 7, 6, generator=g) * 2 + 5
    mask = (torch.arange(7)[None] < torch.tensor([7, 3, 5, 1])[:, None]).long()
    mu_t, std_t = torch.randn(6, generator=g).double(), torch.rand(6, generator=g).double() + 0.5
    for eps in (1e-5, 0.0):
        mom = Moments()
        y = _normalise_batch(mom, x, 2, mu_t, std_t, eps, mask)
        rows = x.double()[mask.bool()]
        m, v = rows.mean(0), rows.var(0, unbiased=False)
        want = (x.double() - m) / (v + eps).sqrt() * std_t + mu_t      # every token, masked stats
        assert float((y.double() - want).abs().max()) <= 1e-5
        torch.testing.assert_close(mom.mean, m, rtol=1e-6, atol=0)
        torch.testing.assert_close(mom.var, v, rtol=1e-5, atol=0)
        assert mom.count.item() == int(mask.sum())
