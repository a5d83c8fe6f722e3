import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from _stats_models import cnn, mlp, tiny_bert
from mergelab.cli import main
from mergelab.stats import activation_stats, diagonal_fisher
from mergelab.stats.data import load_data

FACTORY = """
import sys
sys.path.insert(0, {tests!r})
from _stats_models import mlp, cnn
def make_mlp():
    return mlp(7)
def make_cnn():
    return cnn(7)
"""


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    import pathlib
    (tmp_path / "mymodels.py").write_text(FACTORY.format(tests=str(pathlib.Path(__file__).parent)))
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def invoke(args):
    r = CliRunner().invoke(main, args, catch_exceptions=False)
    return r.exit_code, r.output


def test_fisher_from_npz_and_checkpoint(workdir):
    net = mlp(7)
    save_file(net.state_dict(), "m.safetensors")
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(20, 10, generator=g), torch.randint(0, 3, (20,), generator=g)
    np.savez("d.npz", x=x.numpy(), y=y.numpy())
    code, out = invoke(["stats", "fisher", "m.safetensors", "--model-code", "mymodels:make_mlp",
                        "--data", "d.npz", "-o", "f.safetensors", "--mode", "empirical",
                        "--batch-size", "8", "--quiet"])
    assert code == 0, out
    assert "over 20 examples" in out
    assert "(hooks)" in out                     # auto picks the closed-form backend for an MLP
    want = diagonal_fisher(net, [(x[i:i + 8], y[i:i + 8]) for i in range(0, 20, 8)], mode="empirical",
                           backend="vmap", progress=False)
    got = load_file("f.safetensors")
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-8)
    code, out = invoke(["stats", "fisher", "m.safetensors", "--model-code", "mymodels:make_mlp",
                        "--data", "d.npz", "-o", "v.safetensors", "--mode", "empirical",
                        "--batch-size", "8", "--backend", "vmap", "--quiet"])
    assert code == 0 and "(vmap)" in out, out


def test_activations_from_image_folder(workdir):
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in ("cat", "dog"):
        (workdir / "imgs" / c).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (6, 6, 3), dtype=np.uint8)).save(workdir / "imgs" / c / f"{i}.png")
    data = load_data("imgs", batch_size=4)
    xs = [b for b in data]
    assert [tuple(b[0].shape) for b in xs] == [(4, 3, 6, 6), (2, 3, 6, 6)]
    assert xs[0][1].tolist() == [0, 0, 0, 1] and float(xs[0][0].max()) <= 1.0
    net = cnn(7)
    torch.save(net.state_dict(), "m.pt")
    code, out = invoke(["stats", "activations", "m.pt", "--model-code", "mymodels:make_cnn",
                        "--data", "imgs", "-o", "a.safetensors", "--quiet"])
    assert code == 0, out
    want = activation_stats(net, data, progress=False)
    got = load_file("a.safetensors")
    for s in want.sites:
        torch.testing.assert_close(got[f"{s}.std"], want.std[s])
        assert got[f"{s}.count"].item() == want.count[s].item()


def test_gram_from_hf_folder_and_jsonl(workdir):
    from transformers import BertTokenizerFast

    words = [f"w{i}" for i in range(30)]
    (workdir / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words))
    tok = BertTokenizerFast(vocab_file=str(workdir / "vocab.txt"))
    net = tiny_bert(3)
    net.save_pretrained("hf")
    tok.save_pretrained("hf")
    rows = [{"text": " ".join(words[i: i + 2 + i % 4]), "label": ["neg", "pos", "mid"][i % 3]} for i in range(6)]
    (workdir / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    layer = "bert.encoder.layer.0.attention.self.query"
    code, out = invoke(["stats", "gram", "hf", "--data", "t.jsonl", "-o", "g.safetensors",
                        "--layer", layer, "--batch-size", "4", "--quiet"])
    assert code == 0, out
    n_tokens = sum(len(r["text"].split()) + 2 for r in rows)           # + [CLS], [SEP]; no padding
    with safe_open("g.safetensors", "pt") as f:
        assert f.metadata()["count:" + layer + ".weight"] == str(n_tokens)
        g = f.get_tensor(layer + ".weight")
    assert g.dtype == torch.float64 and g.shape == (16, 16)
    # labels: strings mapped in sorted order when the model has no label names of its own
    batches = list(load_data("t.jsonl", tokenizer=tok, batch_size=6))
    assert batches[0]["labels"].tolist() == [1, 2, 0, 1, 2, 0]


def test_user_errors_exit_2_with_one_line(workdir):
    code, out = invoke(["stats", "gram", "missing", "--data", "d.npz", "-o", "x.safetensors"])
    assert code == 2 and out.strip() == "error: model 'missing': no such file or folder"
    save_file(mlp(7).state_dict(), "m.safetensors")
    np.savez("bad.npz", a=np.zeros(3))
    code, out = invoke(["stats", "gram", "m.safetensors", "--model-code", "mymodels:make_mlp",
                        "--data", "bad.npz", "-o", "x.safetensors"])
    assert code == 2 and "expected an array named 'x', found a" in out
    code, out = invoke(["stats", "gram", "m.safetensors", "--model-code", "mymodels:make_cnn",
                        "--data", "bad.npz", "-o", "x.safetensors"])
    assert code == 2 and "weights do not fit" in out and len(out.strip().splitlines()) == 1


def test_cli_entry_point_subprocess(workdir):
    r = subprocess.run([sys.executable, "-m", "mergelab", "stats", "fisher", "nope", "--data", "x.npz",
                        "-o", "f.safetensors"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: model 'nope': no such file or folder"
