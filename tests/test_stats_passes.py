import pytest
import torch
from torch import nn

from _stats_models import cnn, image_batches, mlp, tiny_bert, token_batches, vector_batches
from mergelab.errors import MergelabError
from mergelab.stats import Stats, activation_stats, discover_sites, gram_matrices, resolve_sites


def _ref(rows):
    rows = rows.double()
    return rows.mean(0), rows.std(0, unbiased=False)


def test_discover_sites_mlp_cnn_bert():
    assert [s.name for s in discover_sites(mlp())] == ["0", "2", "4:input"]
    # conv directly followed by a norm in a Sequential: the norm output is the site
    assert [s.name for s in discover_sites(cnn())] == ["1", "4", "8", "10:input"]
    names = [s.name for s in discover_sites(tiny_bert())]
    assert names[-1] == "classifier:input"
    assert "bert.encoder.layer.0.intermediate.dense" in names
    assert "bert.encoder.layer.1.output.LayerNorm" in names
    assert not any(n.startswith("classifier") and n != "classifier:input" for n in names)


def test_activation_stats_mlp_and_cnn_match_brute_force():
    net = mlp()
    data = vector_batches(4)
    st = activation_stats(net, data, progress=False)
    x = torch.cat([b[0] for b in data])
    with torch.no_grad():
        h0 = net[0](x)
        h2 = net[2](net[1](h0))
    for site, h in (("0", h0), ("2", h2), ("4:input", net[3](h2))):
        m, s = _ref(h)
        torch.testing.assert_close(st.mean[site].double(), m, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.std[site].double(), s, rtol=1e-5, atol=1e-6)
        assert st.count[site].item() == 32

    for norm in ("bn", "ln"):
        net = cnn(norm=norm).eval()
        data = image_batches(3)
        st = activation_stats(net, data, progress=False)
        x = torch.cat([b[0] for b in data])
        with torch.no_grad():
            h = net[:2](x)                                   # (N, C, H, W): channels over N*H*W
        m, s = _ref(h.permute(0, 2, 3, 1).reshape(-1, h.shape[1]))
        torch.testing.assert_close(st.mean["1"].double(), m, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(st.std["1"].double(), s, rtol=1e-5, atol=1e-6)
        assert st.count["1"].item() == x.shape[0] * 25


def test_activation_stats_bert_ignores_padding():
    net = tiny_bert()
    data = token_batches(2)
    site = "bert.encoder.layer.0.output.LayerNorm"
    st = activation_stats(net, data, sites=[site, "classifier:input"], progress=False)
    rows, pooled = [], []
    with torch.no_grad():
        for b in data:
            out = net(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
            rows.append(out.hidden_states[1][b["attention_mask"].bool()])
            pooled.append(net.bert.pooler(out.hidden_states[-1]))
    m, s = _ref(torch.cat(rows))
    torch.testing.assert_close(st.mean[site].double(), m, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(st.std[site].double(), s, rtol=1e-5, atol=1e-6)
    assert st.count[site].item() == sum(int(b["attention_mask"].sum()) for b in data)
    m, s = _ref(torch.cat(pooled))
    torch.testing.assert_close(st.std["classifier:input"].double(), s, rtol=1e-5, atol=1e-6)


def test_stats_file_roundtrip(tmp_path):
    st = activation_stats(mlp(), vector_batches(2), progress=False)
    st.save(tmp_path / "a.safetensors")
    back = Stats.load(tmp_path / "a.safetensors")
    assert back.sites == st.sites
    for s in st.sites:
        assert torch.equal(back.mean[s], st.mean[s]) and torch.equal(back.std[s], st.std[s])
        assert back.count[s].dtype == torch.float64
    from safetensors import safe_open
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert f.metadata()["mergelab_kind"] == "activation_stats"
        assert set(f.keys()) == {f"{s}.{k}" for s in st.sites for k in ("mean", "std", "count")}


def test_gram_matches_brute_force_and_honours_mask(tmp_path):
    net = mlp()
    data = vector_batches(3)
    g = gram_matrices(net, data, progress=False)
    x = torch.cat([b[0] for b in data]).double()
    torch.testing.assert_close(g["0.weight"], x.T @ x)
    with torch.no_grad():
        h = net[1](net[0](x.float())).double()
    torch.testing.assert_close(g["2.weight"], h.T @ h, rtol=1e-6, atol=1e-6)
    assert g["0.weight"].dtype == torch.float64 and g.counts["0.weight"] == 24

    bert = tiny_bert()
    data = token_batches(2)
    g = gram_matrices(bert, data, layers=["bert.encoder.layer.0.attention.self.query"], progress=False)
    rows = []
    with torch.no_grad():
        for b in data:
            hs = bert(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                      output_hidden_states=True).hidden_states[0]
            rows.append(hs[b["attention_mask"].bool()].double())
    r = torch.cat(rows)
    torch.testing.assert_close(g["bert.encoder.layer.0.attention.self.query.weight"], r.T @ r,
                               rtol=1e-5, atol=1e-5)
    g.save(tmp_path / "g.safetensors")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "g.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["mergelab_kind"] == "gram"
    assert meta["count:bert.encoder.layer.0.attention.self.query.weight"] == str(r.shape[0])


def test_user_errors_are_one_line():
    net = mlp()
    with pytest.raises(MergelabError, match="no module named 'nope'"):
        resolve_sites(net, ["nope"])
    with pytest.raises(MergelabError, match="not an nn.Linear"):
        gram_matrices(net, vector_batches(1), layers=["1"], progress=False)
    with pytest.raises(MergelabError, match="batch: expected"):
        activation_stats(net, [42], progress=False)


class _Unknown(nn.Module):
    """A parameter-free module of a kind the site code cannot know: (N, C, H, W) -> same."""

    def forward(self, x):
        return x * 2.0


def test_channel_axis_is_structural_or_an_error():
    from mergelab.stats.sites import Site, channel_dim

    x4 = torch.zeros(2, 8, 8, 8)        # square: the shape alone cannot tell the axis
    assert channel_dim(Site("c"), nn.Conv2d(3, 8, 3), x4) == 1
    assert channel_dim(Site("b"), nn.BatchNorm2d(8), x4) == 1
    assert channel_dim(Site("l"), nn.Linear(4, 8), x4) == 3
    assert channel_dim(Site("t"), _Unknown(), torch.zeros(2, 5, 8)) == 2    # (N, T, C) tokens
    assert channel_dim(Site("u", channel_dim=1), _Unknown(), x4) == 1
    with pytest.raises(MergelabError, match=r"site 'u': cannot tell the channel axis of a \(2, 8, 8, 8\)"):
        channel_dim(Site("u"), _Unknown(), x4)
    with pytest.raises(MergelabError, match="channel_dim 4 is out of range"):
        channel_dim(Site("u", channel_dim=4), _Unknown(), x4)
    # through a statistics pass: one clear error, not statistics on the wrong axis
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), _Unknown(), nn.Flatten(), nn.Linear(4 * 36, 2))
    with pytest.raises(MergelabError, match="site '1'"):
        activation_stats(net, [(torch.randn(4, 1, 6, 6),)], sites=["1"], progress=False)
    st = activation_stats(net, [(torch.randn(4, 1, 6, 6),)], sites=[Site("1", channel_dim=1)], progress=False)
    assert st.mean["1"].shape == (4,)
