"""Per-block costs of the method kernels changed for speed, each beside the formulation it
replaced (written out here), on one thread, and whether both give the same values.

    python benchmarks/method_kernels.py [--repeat 20]

Blocks are the engine's size (2^18 float32 values, rows of 2048): SCE's variance across 2
models, DELLA's row ranks, the TIES trim's threshold ties, the two-model linear merge and model
stock's combination; and the TIES threshold of a whole 11.5M-value tensor of 2 models streamed
in such blocks, by the two exact radix passes and by the one window pass.  Prints milliseconds per block (median of ``--repeat``) and ``same``
(bit-identical) or the largest difference.  Numbers depend on the machine and its load.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mergelab.methods.select import _sce_var  # noqa: E402
from mergelab.methods.sparse import Trim, kth_largest_many, trim_keep  # noqa: E402
from mergelab.methods.sparsify import _row_ranks  # noqa: E402


def ms(f, repeat: int) -> float:
    f()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        f()
        times.append((time.perf_counter() - t) * 1e3)
    return statistics.median(times)


def compare(a: torch.Tensor, b: torch.Tensor) -> str:
    return "same" if torch.equal(a, b) else f"max diff {float((a.double() - b.double()).abs().max()):.3g}"


def old_ranks(a):
    order = torch.sort(a, dim=-1, stable=True).indices
    r = torch.empty_like(order)
    r.scatter_(-1, order, torch.arange(a.shape[-1]).expand_as(order))
    return r.float()


def old_trim_keep(tau, st):
    a = tau.abs()
    keep = a > st.threshold
    tie = torch.nonzero(a == st.threshold).squeeze(1)[:st.ties_left]
    keep[tie] = True
    return keep


def old_linear(a, b, w):
    out = a.clone()
    out.add_(torch.sub(b, a), alpha=w)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=20)
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)
    bf = lambda *s: (torch.randn(*s, generator=g) * 0.01).to(torch.bfloat16).float()  # noqa: E731
    base, x1, x2 = bf(128, 2048), bf(128, 2048), bf(128, 2048)
    d = torch.stack([x1 - base, x2 - base])
    tau = (x1 - base).reshape(-1)
    thr = float(tau.abs().median())
    rows = []

    rows.append(("SCE variance, 2 models", ms(lambda: d.var(dim=0, unbiased=False), args.repeat),
                 ms(lambda: _sce_var(d), args.repeat), compare(d.var(dim=0, unbiased=False), _sce_var(d))))
    a = d[0].abs()
    rows.append(("DELLA row ranks", ms(lambda: old_ranks(a), args.repeat), ms(lambda: _row_ranks(a), args.repeat),
                 compare(old_ranks(a), _row_ranks(a))))
    big = 1 << 40  # ties still to keep after this block: the common case inside a tensor
    rows.append(("TIES trim with threshold ties", ms(lambda: old_trim_keep(tau, Trim(thr, big)), args.repeat),
                 ms(lambda: trim_keep(tau, Trim(thr, big)), args.repeat),
                 compare(old_trim_keep(tau, Trim(thr, big)), trim_keep(tau, Trim(thr, big)))))
    rows.append(("linear, 2 models (w = 0.5)", ms(lambda: old_linear(x1, x2, 0.5), args.repeat),
                 ms(lambda: torch.lerp(x1, x2, 0.5), args.repeat), compare(old_linear(x1, x2, 0.5), torch.lerp(x1, x2, 0.5))))
    t = 0.37
    old_ms = lambda: (base.double() + t * ((d[0].double() + d[1].double()) / 2)).float()  # noqa: E731
    t32 = torch.tensor(t, dtype=torch.float32)
    new_ms = lambda: ((x1 + x2) / 2).mul_(t32).add_(base * (1 - t32))  # noqa: E731
    rows.append(("model stock combination", ms(old_ms, args.repeat), ms(new_ms, args.repeat), compare(old_ms(), new_ms())))

    # the TIES threshold of a whole 5632 x 2048 tensor (11.5M values, 2 models) streamed in 44
    # blocks of 2^18: the two exact radix passes vs the one window pass (values must agree)
    big_taus = [bf(5632, 2048).reshape(-1) - bf(5632, 2048).reshape(-1) for _ in range(2)]
    n = big_taus[0].numel()
    chunks = lambda: ([t[a:a + (1 << 18)].abs() for t in big_taus] for a in range(0, n, 1 << 18))  # noqa: E731
    ranks = [n // 2, n // 2]
    two = lambda: kth_largest_many(chunks, ranks)  # noqa: E731
    one = lambda: kth_largest_many(chunks, ranks, [n, n])  # noqa: E731
    rows.append(("TIES threshold, 2 x 11.5M values in 2^18 blocks (whole tensor)", ms(two, max(3, args.repeat // 10)),
                 ms(one, max(3, args.repeat // 10)), "same" if two() == one() else "DIFFERENT"))

    print("| kernel (per 2^18-value block, 1 thread) | before (ms) | now (ms) | values |")
    print("|---|---|---|---|")
    for name, before, now, same in rows:
        print(f"| {name} | {before:.2f} | {now:.2f} | {same} |")


if __name__ == "__main__":
    main()
