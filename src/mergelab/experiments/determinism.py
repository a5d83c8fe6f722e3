"""Same seed, same profile, same torch version: the same expert weights and report numbers on
any x86-64 machine with AVX2 of the same CPU vendor (an AMD EPYC and an Intel Xeon give other
last bits with the same pinned kernels: docs/reproduce.md).

What made two machines differ, and what pins it here:

* **CPU kernels chosen by instruction set.** torch picks its vectorised ATen kernels, its MKL
  GEMMs and its oneDNN convolutions by what the CPU offers (AVX-512 on one machine, AVX2 on
  another); each sums in a different order, so the last bits of a step differ and training
  drifts apart (0.8 points of expert accuracy after a few hundred steps). :func:`pin_cpu_kernels`
  sets ``ATEN_CPU_CAPABILITY=avx2``, ``MKL_CBWR=AVX2`` and ``ONEDNN_MAX_CPU_ISA=AVX2`` (unless
  already set) before the first kernel runs, so every machine runs the AVX2 code paths.
* **The intra-op thread count.** A reduction split over 2 threads adds in another order than
  over 1 or 16. :func:`one_thread` runs training (``train.train``) and whole suites
  (``run_suite``) on one intra-op thread, whatever ``torch.set_num_threads`` or
  ``OMP_NUM_THREADS`` said.
* Data order and initialisations come from seeded ``torch.Generator`` / ``numpy`` generators
  only (never from the global RNG state or from hash order).

:func:`cpu_report` records what actually ran (a process that ran kernels before pinning keeps
its first choice), so a report says when its numbers came from other kernels.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import torch

PINNED_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pin_cpu_kernels() -> dict[str, str]:
    """Set the kernel-choice variables (keeping any the user set); returns their values."""
    for k, v in PINNED_ENV.items():
        os.environ.setdefault(k, v)
    return {k: os.environ[k] for k in PINNED_ENV}


@contextmanager
def one_thread() -> Iterator[None]:
    """Run the block on one intra-op thread (reductions in one fixed order)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def cpu_report() -> dict[str, str]:
    return {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
            **{k: os.environ.get(k, "") for k in PINNED_ENV}}
