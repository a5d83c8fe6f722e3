"""Permutation specs derived from a traced model, and their self-test.

How a spec is built (:func:`permutation_spec`):

1. **Trace.** The model runs once on the example inputs under a dispatch mode that sees
   every ATen op with its real tensors (any Python control flow is fine, nothing is
   symbolic).  ``nn.MultiheadAttention`` is traced as one step (a module-level handler).
2. **Link axes.** Each op's handler (:mod:`mergelab.align.ops`) links tensor axes that must
   carry the same permutation; a union-find over ``(tensor, axis)`` merges them into classes.
   A reshape that splits an axis records a *product* structure (``768 = 12 heads x 64``), a
   concatenation a *cat* structure; classes with equal structure are merged, and so are the
   parts of a class split twice in the same way.
3. **Groups.** A class that holds a parameter axis becomes a group unless it touches a model
   input or output, an op that pins it (an embedding's rows, a slice, an unknown op), or has
   size 1.  Structured classes are not groups themselves; their permutation is composed
   from their parts.  Group kinds:

   * ``plain``: an ordinary hidden axis (a layer's units, a residual stream, conv channels);
   * ``heads``: the head axis of an attention block (size ``n_heads``): whole heads move;
   * ``within_head``: the dimensions inside a head (one for query/key, one for value/output).
     When every tensor that carries it also carries the head axis (true for SDPA-style and
     ``nn.MultiheadAttention`` attention) each head gets its own permutation
     (``per_head=True``) and the group's index vector is the *composed* permutation of the
     flat ``n_heads*head_dim`` axis (it is consistent with the head group's vector);
     otherwise one permutation is shared by all heads (a vector of ``head_dim``).
   GroupNorm's channel groups are represented the same way (``heads`` = the norm groups).
4. **Self-test, always.** A copy of the model is re-initialised at a larger scale (weights
   ``N(0, 1.5/sqrt(fan_in))``, norms and biases randomised) so that attention is far from
   uniform, a random permutation is drawn for every group, and the permuted copy is run
   again.  *Every* intermediate tensor of the trace must equal the original one permuted
   by the spec's rule for its axes (relative Frobenius difference <= 64 eps sqrt(1 + k), k the
   contracting ops (matmul, conv, norms, reductions) before it; float32 eps).  A spec that fails
   is never returned: :class:`MergelabError` names the op.

Unknown ops are never guessed: the axes they touch are left unpermuted, and their names
are listed in :attr:`PermutationSpec.unknown_ops`; :attr:`PermutationSpec.frozen` says, for
every parameter axis that is not permuted, why.
"""
from __future__ import annotations
from __future__ import annotations

from torch import nn

from ...errors import MergelabError
from .build import _Builder, _TraceInfo
from .extend import extend_spec, is_meta
from .objects import AxisPerm, Group, Permutation, PermutationSpec, compose_heads, split_heads
from .record import LEAF_MODULES, call_model, run_recorded
from .rules import apply_axis, apply_exprs, expr_groups, expr_size, expr_vector
from .selftest import _reinit, copy_model, self_test

__all__ = ["AxisPerm", "Group", "LEAF_MODULES", "Permutation", "PermutationSpec", "apply_axis",
           "apply_exprs", "call_model", "compose_heads", "expr_groups", "expr_size", "expr_vector",
           "permutation_spec", "run_recorded", "self_test", "split_heads", "_TraceInfo"]


def permutation_spec(model: nn.Module, example_inputs, seed: int = 0,
                     reduced: nn.Module | None = None) -> PermutationSpec:
    """Trace ``model`` on ``example_inputs`` and return its self-tested permutation spec.

    ``example_inputs``: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
    Use inputs that exercise every path (e.g. an attention mask with padding).

    ``reduced``: for models too large to hold (e.g. built under ``torch.device("meta")``),
    the same architecture with fewer repeated blocks and real weights (the same config with
    ``num_hidden_layers=2``).  The spec is traced and self-tested on ``reduced`` (on
    ``example_inputs``) and extended to ``model`` block by block
    (:mod:`mergelab.align.spec.extend`); ``model`` is never run.  Such a spec has no
    activation trace (``spec.trace is None``): weight matching and applying work, activation
    matching needs the model itself.
    """
    if not isinstance(model, nn.Module):
        raise MergelabError(f"permutation_spec: expected a torch.nn.Module, found {type(model).__name__}")
    if reduced is not None:
        return extend_spec(permutation_spec(reduced, example_inputs, seed=seed), reduced, model)
    if is_meta(model):
        raise MergelabError("permutation_spec: the model is on the meta device (no weights), so it cannot "
                            "be traced and self-tested; pass reduced=<the same architecture with fewer layers "
                            "and real weights>")
    work = copy_model(model).float().eval()
    _reinit(work, seed + 1)
    b = _Builder(work, example_inputs)
    try:
        b.trace(work, example_inputs)
    except MergelabError:
        raise
    except Exception as e:   # the model itself failed on these inputs
        raise MergelabError(f"permutation_spec: running the model on the example inputs failed: "
                            f"{type(e).__name__}: {e}") from e
    spec = b.build()
    self_test(spec, work, example_inputs, seed=seed, reinit=False)
    return spec
