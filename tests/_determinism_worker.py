"""Train one smoke expert of nonlocal-vision in a fresh process and print the sha256 of its
weights: ``python _determinism_worker.py THREADS CACHE_DIR [--no-pin]``.

``torch.set_num_threads(THREADS)`` is set before training, as a user's machine might; the
suite's own settings (one training thread, pinned CPU kernels) must make the result the same.
``--no-pin`` leaves the CPU kernels to the machine (to show what pinning changes)."""
import hashlib
import sys

import torch


def weights_hash(model) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().contiguous().cpu().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    threads, cache = int(sys.argv[1]), sys.argv[2]
    from mergelab.experiments import determinism

    if "--no-pin" not in sys.argv:
        determinism.pin_cpu_kernels()
    torch.set_num_threads(threads)
    from mergelab.experiments import train as T
    from mergelab.experiments.suites import nonlocal_vision as nlv

    p = nlv.PROFILES["smoke"]
    data = nlv.TaskData(p)
    tr = nlv.Trainer(p, data, T.ExpertCache(cache), quiet=True)
    foundation = tr.foundation(0)
    expert, _ = tr.expert(nlv.TASKS[0], "A", 0, foundation)
    print(weights_hash(expert), torch.backends.cpu.get_cpu_capability())


if __name__ == "__main__":
    main()
