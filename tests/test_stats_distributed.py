"""A 2-process torchrun (gloo, CPU) pass equals the 1-process pass."""
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

HERE = pathlib.Path(__file__).parent


@pytest.mark.slow      # two fresh torch processes: ~15-20 s on the shared 2-core machine
def test_two_process_torchrun_equals_single_process(tmp_path):
    sys.path.insert(0, str(HERE))
    from _dist_worker import run

    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir(), two.mkdir()
    run(str(one))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "_dist_worker.py"), str(two)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240,
                       env={**__import__("os").environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    for name in ("act", "gram", "fisher", "fisher_s", "tact"):
        a, b = load_file(str(one / f"{name}.safetensors")), load_file(str(two / f"{name}.safetensors"))
        assert set(a) == set(b), name
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-7, msg=f"{name}:{k}")
        with safe_open(str(one / f"{name}.safetensors"), "pt") as f1, \
                safe_open(str(two / f"{name}.safetensors"), "pt") as f2:
            assert f1.metadata() == f2.metadata(), name
