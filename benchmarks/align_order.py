"""Unit order of weight matching's sweeps, "random" (Git Re-Basin) vs "local" (hubs last, the
order the streamed matcher needs to hold only the hubs' costs): final objective on independent
pairs of every zoo model (two scaled initialisations), identity and signature starts.

    OMP_NUM_THREADS=1 python benchmarks/align_order.py      (from the repository root)
"""
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import mergelab as ml  # noqa: E402
from mergelab.align.spec import _reinit  # noqa: E402
from zoo_models import ZOO  # noqa: E402

for name, make in ZOO.items():
    m, x = make()
    spec = ml.permutation_spec(m, x)
    a, b = copy.deepcopy(m), copy.deepcopy(m)
    _reinit(a, 1)
    _reinit(b, 2)
    sa = {k: v.detach().clone() for k, v in a.state_dict().items()}
    sb = {k: v.detach().clone() for k, v in b.state_dict().items()}
    row = [name]
    for init in ("identity", "signature"):
        r = {}
        for order in ("random", "local"):
            t = time.time()
            w = ml.weight_matching(spec, sa, sb, init=init, order=order, seed=0)
            r[order] = (w.history[-1], len(w.history) - 1, time.time() - t)
        rel = (r["local"][0] - r["random"][0]) / abs(r["random"][0])
        row.append(f"{init}: random {r['random'][0]:.6g} ({r['random'][1]} sweeps) local {r['local'][0]:.6g} "
                   f"({r['local'][1]} sweeps) rel {rel:+.2e}")
    print(" | ".join(row), flush=True)
