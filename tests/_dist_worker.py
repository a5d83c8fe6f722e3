"""Run by test_stats_distributed under torchrun (and in-process with world size 1)."""
import sys

import torch

from _stats_models import mlp, vector_batches
from mergelab.repair import tact
from mergelab.stats import activation_stats, diagonal_fisher, distributed, gram_matrices


def run(out):
    torch.manual_seed(0)
    net, data = mlp(), vector_batches(5, bs=6)        # 5 batches: ranks get 3 and 2
    activation_stats(net, data, progress=False).save(f"{out}/act.safetensors")
    gram_matrices(net, data, progress=False).save(f"{out}/gram.safetensors")
    diagonal_fisher(net, data, n_examples=26, progress=False).save(f"{out}/fisher.safetensors")
    diagonal_fisher(net, data, mode="sampled", seed=2, progress=False).save(f"{out}/fisher_s.safetensors")
    t = tact(mlp(1), {"a": mlp(2)}, {"a": data}, mode="sequential", progress=False)
    t.save_corrections(f"{out}/tact.safetensors")


if __name__ == "__main__":
    torch.set_num_threads(1)
    distributed.init()
    run(sys.argv[1])
