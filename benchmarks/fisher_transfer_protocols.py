"""The fisher suite's transfer claim under different protocols (an investigation, not a test).

Quick-profile models of ``mergelab reproduce fisher`` (foundation, donor and targets come from
the expert cache, or are trained): for each target size in argv[1] (comma-separated, default
20) and target seeds 0-2, merge the target's body with the donor's as an average and as a
Fisher merge whose *target* Fisher (expected, over the model's predictive distribution) is
estimated on (a) the target's labelled examples, (b) 1024 unlabelled images of the target's
training pool, (c) 1024 validation images; each with and without norm-normalisation, λ_target
chosen on validation on the 51-point grid and on that grid plus 1 - {1e-4 .. 1e-2} ("fine").
Prints one JSON row per (size, seed): (λ_target, val, test) per variant, and the Fisher norms.

    PYTHONPATH=src OMP_NUM_THREADS=1 python benchmarks/fisher_transfer_protocols.py 20,100,500
"""
import sys, time, copy, json
import numpy as np, torch
torch.set_num_threads(1)
from mergelab.experiments.suites import fisher as F
from mergelab.experiments import train as T, data as D, zoo
from mergelab.methods.fisher import fisher_merge
from mergelab.methods.search import coefficient_search, pairwise_grid
from mergelab.stats import diagonal_fisher

p = dict(F.PROFILES["quick"])
ns = [int(x) for x in sys.argv[1].split(",")] if len(sys.argv) > 1 else [20]
seeds = [0, 1, 2]
data = F.Data(p)
cache = T.ExpertCache(D.cache_dir() / "experts")
base_cfg = {"suite": "fisher", "widths": list(p["widths"]), "batch": p["batch"], "splits": data.split_hashes(),
            "train_limit": p["train_limit"]}
def fit_fn(x, y, steps, lr, seed, val):
    def fit(m):
        T.train(m, T.array_sampler(x, y), steps=steps, batch_size=p["batch"], lr=lr,
                warmup=min(50, steps // 10), seed=seed, quiet=True)
        return {"val": T.evaluate(m, F._loader(val))}
    return fit
fx, fy = data.pretrain()
foundation, _ = cache.get_or_train({**base_cfg, "kind": "foundation", "seed": 0, "steps": p["pre_steps"], "lr": p["lr"]},
    lambda: zoo.build("mlp", seed=0, widths=tuple(p["widths"]), n_classes=20),
    fit_fn(fx, fy, p["pre_steps"], p["lr"], 0, data.pretrain("val")))
def finetune(task, x, y, steps, seed, extra, init=None):
    cfg = {**base_cfg, "kind": "finetune", "task": task, "seed": seed, "steps": steps, "lr": p["ft_lr"], **extra}
    return cache.get_or_train(cfg, lambda: zoo.replace_head(copy.deepcopy(foundation), 5, seed=seed),
                              fit_fn(x, y, steps, p["ft_lr"], seed + 1, data.task(task, "val")))[0]
dx, dy = data.task(F.DONOR_TASK, "train")
donor = finetune(F.DONOR_TASK, dx, dy, p["donor_steps"], 500, {})
val = F._loader(data.task(F.TARGET_TASK, "val")); test = F._loader(data.task(F.TARGET_TASK, "test"))
body = [k for k in donor.state_dict() if not k.startswith("head.")]
dstate = {k: v for k, v in donor.state_dict().items() if k in body}
xt_all, _ = data.fm.part("train", (5, 6, 7, 8, 9))
def fis(m, x, n, mode):
    t0 = time.time()
    f = dict(diagonal_fisher(m, F._loader((x, np.zeros(len(x), dtype=np.int64)), 64), mode=mode, n_examples=n, seed=0, progress=False))
    return {k: v for k, v in f.items() if k in body}, time.time() - t0
t0=time.time()
dF_exp, tt = fis(donor, dx, 1024, "expected"); print("donor expected fisher 1024:", round(tt,1), "s", flush=True)
dF_smp, _ = fis(donor, dx, 1024, "sampled")
def norm(f): return float(sum(v.double().square().sum() for v in f.values()) ** 0.5)
print("donor |F| exp", norm(dF_exp), "smp", norm(dF_smp))
vx, _ = data.task(F.TARGET_TASK, "val")
out = []
grid = pairwise_grid(51)
# finer grid near λ_target = 1 (the Fisher scales differ by orders of magnitude)
fine = sorted(set([g for g in grid] + [(1 - e, e) for e in [1e-4, 3e-4, 1e-3, 3e-3, 1e-2]]), reverse=True)
for n in ns:
  for s in seeds:
    rng = np.random.default_rng(s); x_all, y_all = data.fm.part("train", (5, 6, 7, 8, 9))
    idx = rng.permutation(len(y_all))[:n]; tx, ty = x_all[idx], y_all[idx]
    target = finetune(F.TARGET_TASK, tx, ty, p["target_steps"], s, {"target_n": n, "subset_seed": s})
    ts = {k: v for k, v in target.state_dict().items() if k in body}
    def with_body(b):
        m = copy.deepcopy(target); m.load_state_dict({**target.state_dict(), **b}); return m.eval()
    row = {"n": n, "seed": s, "alone": T.evaluate(target, test)["acc"], "alone_val": T.evaluate(target, val)["acc"]}
    unl = np.random.default_rng(100 + s).permutation(len(xt_all))[:1024]
    tF = {"lab-exp": fis(target, tx, None, "expected")[0],
          "unl1024-exp": fis(target, xt_all[unl], 1024, "expected")[0],
          "val-exp": fis(target, vx, 1024, "expected")[0]}
    row["tnorm"] = {k: norm(v) for k, v in tF.items()}
    merges = {"average": lambda c: with_body(F.parameter_average([ts, dstate], list(c)))}
    for name, f in tF.items():
        for nm in (False, True):
            merges[f"fisher[{name}{',norm' if nm else ''}]"] = (lambda c, f=f, nm=nm: with_body(
                fisher_merge([ts, dstate], [f, dF_exp], weights=list(c), normalize=nm)))
    for meth, fn in merges.items():
        for gname, g in (("g51", grid), ("fine", fine)):
            if gname == "fine" and "norm" in meth: continue
            r = coefficient_search(fn, 2, lambda m: T.evaluate(m, val)["acc"], grid=g)
            lam = r.best_coefficients
            row[f"{meth}/{gname}"] = (round(lam[0], 4), round(r.best_score, 4), T.evaluate(fn(lam), test)["acc"])
    print(json.dumps(row), flush=True); out.append(row)
json.dump(out, open(f"fisher_transfer_{'_'.join(map(str,ns))}.json", "w"), indent=1)
print("total", time.time() - t0)
