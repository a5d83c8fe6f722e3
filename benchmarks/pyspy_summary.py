"""Summarise a py-spy raw profile: the share of samples per line (leaf) and per function
(inclusive), over all threads.

    py-spy record -f raw -r 100 --threads --nonblocking -o prof.txt -- \\
        python -m mergelab merge recipe.yaml -o out/ --quiet
    python benchmarks/pyspy_summary.py prof.txt [--top 25]

py-spy (``pip install py-spy``, not a mergelab dependency) samples running threads only, so
the shares are of CPU time, not wall time (a thread waiting for a core still counts).
"""
from __future__ import annotations

import argparse
import collections


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("profile")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    leaf: collections.Counter = collections.Counter()
    incl: collections.Counter = collections.Counter()
    total = 0
    with open(args.profile) as f:
        for line in f:
            stack, n = line.rstrip("\n").rsplit(" ", 1)
            n = int(n)
            total += n
            frames = stack.split(";")
            leaf[frames[-1]] += n
            for fr in set(fr.split(":")[0] for fr in frames):  # function (file), once per sample
                incl[fr] += n
    print(f"{total} samples")
    for title, c in (("line (leaf)", leaf), ("function (inclusive)", incl)):
        print(f"--- {title}")
        for k, v in c.most_common(args.top):
            print(f"{v:7d} {100 * v / total:5.1f}%  {k[:140]}")


if __name__ == "__main__":
    main()
