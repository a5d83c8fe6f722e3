"""The model card's input checksums: a plain SHA-256 of every whole input file (what
`sha256sum` prints), each file of each input, whatever the number of hashing threads."""
import hashlib
import re
import shutil
import subprocess

import pytest

from core_helpers import toy_family
from mergelab.merge import merge


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
def test_card_records_sha256_of_every_input_file(tmp_path, threads):
    paths, _ = toy_family(tmp_path, shards=2)
    base, a, b = paths
    recipe = {"models": [{"model": str(a), "parameters": {"weight": 0.5}},
                         {"model": str(b), "parameters": {"weight": 0.5}},
                         {"model": str(a), "parameters": {"weight": 0.0}}],  # a file shared by two inputs
              "base_model": str(base), "merge_method": "_core_wsum"}
    res = merge(recipe, tmp_path / "out", quiet=True, threads=threads)
    card, digests = _card_digests(res.outputs[0])
    assert "sha256sum" in card
    assert set(digests) == {str(p) for p in paths}
    for folder in paths:
        for f in sorted(folder.glob("*.safetensors")):
            want = hashlib.sha256(f.read_bytes()).hexdigest()
            hits = [d for files in digests.values() for n, d in files.items() if n == f.name and d == want]
            assert hits, (folder.name, f.name)
    # every recorded file of every input, against an independent hash of that input's file
    by_label = {str(p): p for p in paths}
    for label, files in digests.items():
        folder = by_label[label]   # the card labels an input by its path
        for name, d in files.items():
            assert hashlib.sha256((folder / name).read_bytes()).hexdigest() == d, (label, name)
    if shutil.which("sha256sum"):
        f = sorted(a.glob("*.safetensors"))[0]
        printed = subprocess.run(["sha256sum", str(f)], capture_output=True, text=True, check=True).stdout.split()[0]
        assert printed in card


def test_no_checksums_no_section(tmp_path):
    paths, _ = toy_family(tmp_path)
    base, a, b = paths
    recipe = {"models": [{"model": str(a)}, {"model": str(b)}], "base_model": str(base),
              "merge_method": "_core_wsum"}
    res = merge(recipe, tmp_path / "out", quiet=True, checksums=False)
    assert "sha256" not in (res.outputs[0] / "README.md").read_text()
