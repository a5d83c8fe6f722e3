"""The merge engine: plan (planning.py) -> jobs (jobs.py) -> output (output.py) -> stages (stages.py),
around ONE per-tensor driver (driver.py) that every entry point uses: ``merge()`` from files
(run.py), ``merge_states()`` in memory (states.py), the experiment suites, ``fisher_merge`` and
``regmean_merge``.  Arrows: engine -> {io, methods, stages}."""
from ..methods.seeds import context_seed, tensor_seed
from .driver import DEFAULT_BLOCK_SIZE, Driver, math_device
from .planning import Plan, plan
from .run import MergeResult, merge
from .sources import Input, StateCheckpoint
from .states import merge_states

__all__ = ["merge", "merge_states", "plan", "Plan", "MergeResult", "Driver", "Input", "StateCheckpoint",
           "DEFAULT_BLOCK_SIZE", "math_device", "context_seed", "tensor_seed"]
