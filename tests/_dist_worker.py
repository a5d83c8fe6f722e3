"""Every statistics pass, run by test_stats_distributed under torchrun (and in-process with
world size 1).  Data of 29 examples in batches of 6 (6, 6, 6, 6, 5): 2 ranks own 3 and 2
batches, 3 ranks own 2, 2 and 1; ``few`` has 2 batches, so a third rank owns none."""
import sys

import torch
from safetensors.torch import save_file

from _stats_models import cnn, mlp
from mergelab.repair import repair, tact
from mergelab.stats import activation_stats, diagonal_fisher, distributed, gram_matrices
from mergelab.stats.data import TensorBatches

N_EXAMPLES, BATCH = 29, 6


def data(n=N_EXAMPLES, shape=(10,), seed=0, n_classes=3, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g) + shift
    return TensorBatches(x, torch.randint(0, n_classes, (n,), generator=g), BATCH)


def _state(out, name, model):
    if distributed.is_writer():
        save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, f"{out}/{name}.safetensors")


def run(out):
    torch.manual_seed(0)
    vec, img = data(), data(shape=(3, 5, 5), n_classes=4)
    few = data(n=2 * BATCH - 1)
    net, conv = mlp(), cnn()
    activation_stats(net, vec, progress=False).save(f"{out}/act.safetensors")
    activation_stats(conv, img, progress=False).save(f"{out}/act_cnn.safetensors")
    activation_stats(net, few, progress=False).save(f"{out}/act_few.safetensors")
    gram_matrices(net, vec, progress=False).save(f"{out}/gram.safetensors")
    gram_matrices(net, few, progress=False).save(f"{out}/gram_few.safetensors")
    diagonal_fisher(net, vec, progress=False).save(f"{out}/fisher.safetensors")
    diagonal_fisher(net, vec, mode="empirical", n_examples=26, progress=False).save(f"{out}/fisher_e.safetensors")
    diagonal_fisher(net, vec, mode="sampled", seed=2, progress=False).save(f"{out}/fisher_s.safetensors")
    diagonal_fisher(conv, img, backend="vmap", progress=False).save(f"{out}/fisher_vmap.safetensors")
    diagonal_fisher(net, few, progress=False).save(f"{out}/fisher_few.safetensors")
    experts = [cnn(1), cnn(2)]
    for mode in ("joint", "sequential"):
        _state(out, f"repair_{mode}", repair(conv, experts, img, mode=mode, progress=False))
        t = tact(mlp(1), {"a": mlp(2), "b": mlp(3)}, {"a": vec, "b": data(seed=1, shift=0.5)},
                 mode=mode, progress=False)
        t.save_corrections(f"{out}/tact_{mode}.safetensors")
    tact(mlp(1), {"a": mlp(2)}, {"a": few}, mode="sequential",
         progress=False).save_corrections(f"{out}/tact_few.safetensors")


if __name__ == "__main__":
    torch.set_num_threads(1)
    distributed.init()
    run(sys.argv[1])
