"""The model card's input checksums: a plain digest of every whole input file (BLAKE3 by
default, what `b3sum` prints; SHA-256 with `checksums="sha256"`, what `sha256sum` prints),
each file of each input, whatever the number of hashing threads."""
import hashlib
import re
import shutil
import subprocess
import sys

import pytest
from hypothesis import given, settings, strategies as st

from core_helpers import toy_family
from mergelab.errors import MergelabError
from mergelab.io.checksums import file_digest, resolve_checksums
from mergelab.merge import merge

blake3 = pytest.importorskip("blake3")

HASH = {"sha256": lambda b: hashlib.sha256(b).hexdigest(), "blake3": lambda b: blake3.blake3(b).hexdigest()}
TOOL = {"sha256": "sha256sum", "blake3": "b3sum"}


def _card_digests(folder):
    card = (folder / "README.md").read_text()
    out, label = {}, None
    for line in card.splitlines():
        m = re.fullmatch(r"- `(.+)`", line)
        if m:
            label = m.group(1)
        m = re.fullmatch(r"  - `(.+)`: `([0-9a-f]{64})`", line)
        if m:
            out.setdefault(label, {})[m.group(1)] = m.group(2)
    return card, out


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("algo", ["default", "sha256", "blake3"])
def test_card_records_digest_of_every_input_file(tmp_path, threads, algo):
    paths, _ = toy_family(tmp_path, shards=2)
    base, a, b = paths
    recipe = {"models": [{"model": str(a), "parameters": {"weight": 0.5}},
                         {"model": str(b), "parameters": {"weight": 0.5}},
                         {"model": str(a), "parameters": {"weight": 0.0}}],  # a file shared by two inputs
              "base_model": str(base), "merge_method": "_core_wsum"}
    kw = {} if algo == "default" else {"checksums": algo}
    res = merge(recipe, tmp_path / "out", quiet=True, threads=threads, **kw)
    name = "blake3" if algo == "default" else algo
    h = HASH[name]
    card, digests = _card_digests(res.outputs[0])
    assert f"## Inputs ({name})" in card and TOOL[name] in card
    assert set(digests) == {str(p) for p in paths}
    for folder in paths:
        for f in sorted(folder.glob("*.safetensors")):
            want = h(f.read_bytes())
            hits = [d for files in digests.values() for n, d in files.items() if n == f.name and d == want]
            assert hits, (folder.name, f.name)
    # every recorded file of every input, against an independent hash of that input's file
    by_label = {str(p): p for p in paths}
    for label, files in digests.items():
        folder = by_label[label]   # the card labels an input by its path
        for fn, d in files.items():
            assert h((folder / fn).read_bytes()) == d, (label, fn)
    if shutil.which(TOOL[name]):
        f = sorted(a.glob("*.safetensors"))[0]
        printed = subprocess.run([TOOL[name], str(f)], capture_output=True, text=True, check=True).stdout.split()[0]
        assert printed in card


@pytest.mark.parametrize("off", [False, "none"])
def test_no_checksums_no_section(tmp_path, off):
    paths, _ = toy_family(tmp_path)
    base, a, b = paths
    recipe = {"models": [{"model": str(a)}, {"model": str(b)}], "base_model": str(base),
              "merge_method": "_core_wsum"}
    res = merge(recipe, tmp_path / "out", quiet=True, checksums=off)
    card = (res.outputs[0] / "README.md").read_text()
    assert "## Inputs" not in card and "sha256" not in card and "blake3" not in card


@settings(max_examples=25, deadline=None)
@given(data=st.binary(min_size=0, max_size=70000), chunk=st.integers(1, 5000))
def test_file_digest_covers_every_byte(tmp_path_factory, data, chunk):
    f = tmp_path_factory.mktemp("d") / "x.bin"
    f.write_bytes(data)
    assert file_digest(f, "sha256", chunk=chunk) == hashlib.sha256(data).hexdigest()
    assert file_digest(f, "blake3") == blake3.blake3(data).hexdigest()


def test_bad_checksums_value_is_one_line(tmp_path):
    with pytest.raises(MergelabError, match="--checksums: expected blake3, sha256 or none, found 'md5'"):
        resolve_checksums("md5")


def test_cli_checksums_option(tmp_path):
    paths, _ = toy_family(tmp_path)
    base, a, b = paths
    rp = tmp_path / "r.yaml"
    rp.write_text(f"models:\n- model: {a}\n- model: {b}\nbase_model: {base}\nmerge_method: task_arithmetic\n")
    cli = [sys.executable, "-m", "mergelab", "merge", str(rp), "-q"]
    p = subprocess.run(cli + ["-o", str(tmp_path / "o1"), "--checksums", "sha256"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "## Inputs (sha256)" in (tmp_path / "o1" / "README.md").read_text()
    p = subprocess.run(cli + ["-o", str(tmp_path / "o2"), "--checksums", "sha256", "--no-checksums"],
                       capture_output=True, text=True)
    assert p.returncode == 2 and p.stderr.startswith("error:") and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not (tmp_path / "o2").exists()
