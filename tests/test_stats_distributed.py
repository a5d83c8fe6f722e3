"""Every statistics pass under torchrun (gloo, CPU) with 2 and 3 processes equals the
1-process pass, on data that the world size does not divide (29 examples in 5 batches) and on
data with fewer batches than ranks (a rank with no batch)."""
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

HERE = pathlib.Path(__file__).parent
FILES = ("act", "act_cnn", "act_few", "gram", "gram_few", "fisher", "fisher_e", "fisher_s",
         "fisher_vmap", "fisher_few", "repair_joint", "repair_sequential", "tact_joint",
         "tact_sequential", "tact_few")


def torchrun(script, n, *args, timeout=300, env=None):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(n),
           str(script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    sys.path.insert(0, str(HERE))
    from _dist_worker import run

    out = {}
    for n in (1, 2, 3):
        d = tmp_path_factory.mktemp(f"w{n}")
        if n == 1:           # one thread like the workers: the float32 kernels then match too
            threads = torch.get_num_threads()
            torch.set_num_threads(1)
            try:
                run(str(d))
            finally:
                torch.set_num_threads(threads)
        else:
            r = torchrun(HERE / "_dist_worker.py", n, d)
            assert r.returncode == 0, r.stderr[-3000:]
        out[n] = d
    return out


@pytest.mark.slow      # two torchrun launches (5 fresh torch processes): ~30 s on the shared 2-core machine
@pytest.mark.parametrize("n", [2, 3])
def test_every_pass_equals_single_process(runs, n):
    for name in FILES:
        one, many = runs[1] / f"{name}.safetensors", runs[n] / f"{name}.safetensors"
        a, b = load_file(str(one)), load_file(str(many))
        assert set(a) == set(b), name
        for k in a:
            assert b[k].dtype == a[k].dtype, (name, k)
            if a[k].dtype == torch.float64:       # the reduced float64 sums themselves
                torch.testing.assert_close(b[k], a[k], rtol=1e-12, atol=1e-12, msg=f"{name}:{k}")
            else:
                torch.testing.assert_close(b[k], a[k], rtol=2e-6, atol=1e-9, msg=f"{name}:{k}")
        with safe_open(str(one), "pt") as f1, safe_open(str(many), "pt") as f2:
            assert f1.metadata() == f2.metadata(), name


@pytest.mark.slow
@pytest.mark.parametrize("n", [1, 2, 3])
def test_no_example_counted_twice_or_dropped(runs, n):
    sys.path.insert(0, str(HERE))
    from _dist_worker import BATCH, N_EXAMPLES

    act = load_file(str(runs[n] / "act.safetensors"))
    counts = {k: float(v) for k, v in act.items() if k.endswith(".count")}
    assert counts and set(counts.values()) == {float(N_EXAMPLES)}
    cnn = load_file(str(runs[n] / "act_cnn.safetensors"))
    assert float(cnn["1.count"]) == float(cnn["4.count"]) == N_EXAMPLES * 25.0      # 5x5 maps
    few = load_file(str(runs[n] / "act_few.safetensors"))
    assert {float(v) for k, v in few.items() if k.endswith(".count")} == {2.0 * BATCH - 1}
    for name, rows in (("gram", N_EXAMPLES), ("gram_few", 2 * BATCH - 1)):
        with safe_open(str(runs[n] / f"{name}.safetensors"), "pt") as f:
            meta = f.metadata()
        assert {v for k, v in meta.items() if k.startswith("count:")} == {str(rows)}
    for name, rows in (("fisher", N_EXAMPLES), ("fisher_e", 26), ("fisher_few", 2 * BATCH - 1)):
        with safe_open(str(runs[n] / f"{name}.safetensors"), "pt") as f:
            assert f.metadata()["n_examples"] == str(rows), name


@pytest.mark.slow
def test_gram_equals_brute_force_sum(runs):
    """The 3-process Gram of the first layer is XᵀX of all 29 inputs, written in the test."""
    sys.path.insert(0, str(HERE))
    from _dist_worker import data

    x = torch.cat([b[0] for b in data()]).double()
    g = load_file(str(runs[3] / "gram.safetensors"))["0.weight"]
    torch.testing.assert_close(g, x.T @ x, rtol=1e-12, atol=1e-12)


@pytest.mark.slow      # one torchrun launch each (3 fresh torch processes)
@pytest.mark.parametrize("mode", ["implicit", "explicit"])
def test_group_destroyed_before_the_interpreter_ends(tmp_path, mode):
    """A script that never destroys its group (or destroys it itself) exits 0 on every rank,
    with the group destroyed by the time later atexit handlers run.  Left to interpreter
    teardown, gloo's worker threads sometimes abort the process (SIGABRT, "terminate called
    without an active exception")."""
    r = torchrun(HERE / "_dist_exit_worker.py", 3, tmp_path, mode)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "terminate called" not in r.stderr
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == {
        f"rank{k}.txt": "destroyed" for k in range(3)}
