"""Merges run by test_merge_distributed, in one process or in each process of a torchrun job.

``python _merge_worker.py all ROOT``: every recipe of :func:`recipes` into ROOT/<name>;
``python _merge_worker.py kill ROOT TENSOR``: a linear merge whose input kills its own process
(SIGKILL) when asked for TENSOR, so only the rank that owns TENSOR dies;
``python _merge_worker.py hang ROOT TENSOR``: the same, but that rank sleeps instead."""
import os
import signal
import sys
import time

import torch

import mergelab as ml
from mergelab.io import open_checkpoint

SHARD, BLOCK = "1500B", "256B"      # several shards, and row blocks for the elementwise methods


def recipes(root):
    e = [f"{root}/in/e{i}.safetensors" for i in (1, 2, 3)]
    base = f"{root}/in/base.safetensors"
    m = [f"{root}/in/m{i}.safetensors" for i in (1, 2)]
    return {
        "linear": {"models": [{"model": p, "parameters": {"weight": w}} for p, w in zip(e, (0.5, 0.3, 0.2))],
                   "merge_method": "linear", "dtype": "bfloat16"},
        "ties_global": {"models": [{"model": p} for p in e], "base_model": base, "merge_method": "ties",
                        "parameters": {"density": 0.4, "weight": 1.0, "scope": "global"}},
        "tall_masks": {"models": [{"model": p} for p in e], "base_model": base, "merge_method": "tall_masks",
                       "parameters": {"lambda": 0.6, "base_merge": "ties", "density": 0.5, "scope": "global"}},
        "tact": {"models": [{"model": p} for p in m], "merge_method": "linear",
                 "tact": {"model_code": "_stats_models:mlp", "batch_size": 6, "mode": "sequential",
                          "tasks": {"a": {"model": m[0], "data": f"{root}/in/a.npz"},
                                    "b": {"model": m[1], "data": f"{root}/in/b.npz"}}}},
    }


class Trap:
    """A checkpoint that kills (or stalls) its process when ``name`` is read."""

    def __init__(self, ck, name, how):
        self.ck, self.name, self.how = ck, name, how

    def __getattr__(self, k):
        return getattr(self.ck, k)

    def __contains__(self, k):
        return k in self.ck

    def _trip(self, name):
        if name == self.name:
            if self.how == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            time.sleep(120)

    def get(self, name):
        self._trip(name)
        return self.ck.get(name)

    def get_rows(self, name, a, b):
        self._trip(name)
        return self.ck.get_rows(name, a, b)


def main(what, root, *rest):
    torch.set_num_threads(1)
    if what == "all":
        for name, r in recipes(root).items():
            res = ml.merge(r, f"{root}/{name}", shard_size=SHARD, block_size=BLOCK, quiet=True)
            sys.stdout.write(res.rank_line() + "\n")    # one write: lines of several ranks do not mix
            sys.stdout.flush()
        return
    r = recipes(root)["linear"]
    first = r["models"][0]["model"]
    r["models"][0]["model"] = "trap"
    ml.merge(r, f"{root}/out", shard_size=SHARD, block_size=BLOCK, quiet=True,
             inputs={"trap": Trap(open_checkpoint(first), rest[0], what)})


if __name__ == "__main__":
    main(*sys.argv[1:])
