"""When does permutation alignment help? Two MLPs trained from different random inits, either
on the same task (``--setting same``: MNIST-10k, 10 classes) or on two tasks (``split``:
MNIST-10k digits 0-4 and 5-9, 5 classes each, own heads: the suites' no-foundation setting), merged at the midpoint ½(A + π(B)) without alignment,
with weight matching and with activation matching (``mergelab.align``), over a grid of hidden
widths and depths, several seeds, 95 % Student-t intervals over seeds.

    python benchmarks/alignment_grid.py [--widths 64,128,256] [--depths 2,3] [--seeds 0,1,2]
        [--steps 400] [--setting same|split] [--json OUT.json]

Per (width, depth, seed): test accuracy of A, B and of the three midpoints (``split``: the merged
body with each expert's own head on its own task; heads are zeroed for weight matching and never
merged); normalised accuracy = merged / mean(A, B) (``split``: mean over the two tasks of merged /
expert); the paired differences (weight − none, activation − none) per seed.
Prints a markdown table (mean ± half-width over seeds) and the CPU time (user + system).
Runs on one thread with the CPU kernels pinned (``mergelab.experiments.determinism``).
"""
from __future__ import annotations

import argparse
import json
import resource
import time

import torch


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--widths", default="64,128,256")
    ap.add_argument("--depths", default="2,3")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--setting", choices=("same", "split"), default="same")
    ap.add_argument("--json")
    a = ap.parse_args()
    from mergelab.experiments.determinism import one_thread, pin_cpu_kernels

    pin_cpu_kernels()
    from mergelab.align import activation_matching, permutation_spec, permute, weight_matching
    from mergelab.experiments import data as D
    from mergelab.experiments import train as T
    from mergelab.experiments import zoo
    from mergelab.experiments.seeds import interval

    pool = D.image_pool("mnist")
    classes = [None, None] if a.setting == "same" else [(0, 1, 2, 3, 4), (5, 6, 7, 8, 9)]
    train = [pool.part("train", c) for c in classes]
    test = [list(T.batches(*pool.part("test", c), 512)) for c in classes]
    n_out = 10 if a.setting == "same" else 5
    # activation matching sees both models' inputs: the first 512 training images of each task
    act_x = torch.cat([torch.as_tensor(x[:512]) for x, _ in train]) if a.setting == "split" else torch.as_tensor(train[0][0][:1024])
    act_data = [(act_x[i:i + 256], torch.zeros(len(act_x[i:i + 256]), dtype=torch.long)) for i in range(0, len(act_x), 256)]
    rows = []
    t0, c0 = time.time(), cpu_s()
    with one_thread():
        for depth in [int(d) for d in a.depths.split(",")]:
            for width in [int(w) for w in a.widths.split(",")]:
                for seed in [int(s) for s in a.seeds.split(",")]:
                    models = []
                    for k in (1, 2):
                        s = 1000 * seed + 10 * k
                        x, y = train[k - 1]
                        m = zoo.build("mlp", seed=s, widths=(width,) * depth, n_classes=n_out)
                        T.train(m, T.array_sampler(x, y), steps=a.steps, batch_size=128, lr=0.05,
                                warmup=a.steps // 10, seed=s + 1, quiet=True)
                        models.append(m.eval())
                    ma, mb = models
                    sa, sb = dict(ma.state_dict()), dict(mb.state_dict())
                    spec = permutation_spec(ma, act_data[0][0][:4])
                    split = a.setting == "split"
                    nohead = (lambda st: {k: torch.zeros_like(v) if k.startswith("head.") else v
                                          for k, v in st.items()}) if split else (lambda st: st)
                    perms = {"none": None, "weight": weight_matching(spec, nohead(sa), nohead(sb)),
                             "activation": activation_matching(spec, ma, mb, act_data)}
                    acc = {"A": T.evaluate(ma, test[0])["acc"], "B": T.evaluate(mb, test[-1])["acc"]}
                    for name, perm in perms.items():
                        pb = sb if perm is None else dict(permute(spec, sb, perm))
                        mid = {k: 0.5 * (sa[k] + pb[k]) for k in sa}
                        if not split:
                            m = zoo.build("mlp", seed=0, widths=(width,) * depth, n_classes=n_out)
                            m.load_state_dict(mid)
                            acc[name] = T.evaluate(m.eval(), test[0])["acc"]
                            continue
                        per = []
                        for st, tl in ((sa, test[0]), (pb, test[1])):
                            m = zoo.build("mlp", seed=0, widths=(width,) * depth, n_classes=n_out)
                            m.load_state_dict({**mid, **{k: v for k, v in st.items() if k.startswith("head.")}})
                            per.append(T.evaluate(m.eval(), tl)["acc"])
                        acc[name] = per
                    rows.append({"width": width, "depth": depth, "seed": seed, "acc": acc})
                    print(json.dumps(rows[-1]), flush=True)
    cpu, wall = cpu_s() - c0, time.time() - t0
    out = ["| depth | width | experts (mean acc, %) | none | weight | activation | weight − none | activation − none |",
           "|---|---|---|---|---|---|---|---|"]

    def f(xs, pct=False):
        m, h = interval(xs)
        k = 100 if pct else 1
        return f"{k * m:.3f}" if h is None else (f"{k * m:.1f} ± {k * h:.1f}" if pct else f"{m:.3f} ± {h:.3f}")

    for depth in [int(d) for d in a.depths.split(",")]:
        for width in [int(w) for w in a.widths.split(",")]:
            rs = [r["acc"] for r in rows if r["width"] == width and r["depth"] == depth]
            ends = [0.5 * (r["A"] + r["B"]) for r in rs]
            if a.setting == "same":
                norm = {k: [r[k] / e for r, e in zip(rs, ends)] for k in ("none", "weight", "activation")}
            else:
                norm = {k: [0.5 * (r[k][0] / r["A"] + r[k][1] / r["B"]) for r in rs]
                        for k in ("none", "weight", "activation")}
            out.append(f"| {depth} | {width} | {f(ends, True)} | {f(norm['none'])} | {f(norm['weight'])} | "
                       f"{f(norm['activation'])} | {f([w - n for w, n in zip(norm['weight'], norm['none'])])} | "
                       f"{f([x - n for x, n in zip(norm['activation'], norm['none'])])} |")
    print("\n".join(out))
    print(f"CPU {cpu:.1f} s (user+sys), wall {wall:.1f} s")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"rows": rows, "table": out, "cpu_s": cpu, "wall_s": wall, "args": vars(a)}, fh, indent=1)


if __name__ == "__main__":
    main()
