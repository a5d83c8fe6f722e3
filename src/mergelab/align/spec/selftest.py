"""The self-test: a re-initialised copy, run with and without a random permutation of every
group; every traced intermediate must equal the original permuted by the spec."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ...errors import MergelabError
from .build import _TraceInfo
from .objects import PermutationSpec
from .record import run_recorded
from .rules import apply_exprs, expr_groups


def _reinit(model: nn.Module, seed: int, gain: float = 1.5) -> None:
    gen = torch.Generator().manual_seed(seed)
    seen = set()
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if id(t) in seen or not t.is_floating_point() or t.numel() == 0:
                continue
            seen.add(id(t))
            r = torch.randn(t.shape, generator=gen, dtype=torch.float32)
            if name.endswith("running_var"):
                v = torch.rand(t.shape, generator=gen) + 0.5
            elif t.dim() >= 2:
                v = r * (gain / math.sqrt(t[0].numel()))
            elif name.endswith("bias") or name.endswith("running_mean"):
                v = r * 0.3
            else:
                v = 1.0 + 0.3 * r
            t.copy_(v.to(t.dtype))


def copy_model(model: nn.Module) -> nn.Module:
    """``copy.deepcopy`` that also copies modules holding computed (non-leaf) tensors as
    attributes (``torch.nn.utils.weight_norm`` keeps ``weight`` so; deepcopy refuses them):
    such attributes are copied detached (the module recomputes them in its forward)."""
    memo = {}
    for m in model.modules():
        for v in vars(m).values():
            if isinstance(v, torch.Tensor) and not v.is_leaf:
                memo[id(v)] = v.detach().clone()
    return copy.deepcopy(model, memo)


# ops after which rounding differences between the two runs can grow (reductions over a
# permuted axis sum in another order)
_CONTRACTING = ("aten.mm", "aten.addmm", "aten.bmm", "aten.baddbmm", "aten.convolution", "aten.matmul",
                "aten.linear", "aten._scaled_dot_product", "aten.native_layer_norm", "aten.native_group_norm",
                "aten.native_batch_norm", "aten._native_batch_norm", "aten.sum", "aten.mean", "module:")

EPS32 = float(torch.finfo(torch.float32).eps)


def tolerances(op_names: list[str]) -> list[float]:
    """Relative tolerance per op: ``64 eps sqrt(1 + k)`` with k the contracting ops so far
    (float32 rounding differences grow roughly like a random walk through the layers)."""
    out, k = [], 0
    for n in op_names:
        if n.startswith(_CONTRACTING):
            k += 1
        out.append(64 * EPS32 * math.sqrt(1 + k))
    return out


def rel_error(exp: torch.Tensor, b: torch.Tensor) -> float:
    """``||exp - b|| / ||exp||`` over the finite entries (inf if the non-finite ones differ)."""
    fin = torch.isfinite(exp)
    if not bool(fin.all()):
        if not torch.equal(fin, torch.isfinite(b)) or not torch.equal(
                torch.nan_to_num(exp[~fin], nan=0.0), torch.nan_to_num(b[~fin], nan=0.0)):
            return float("inf")
        exp, b = exp[fin], b[fin]
    if exp.numel() == 0:
        return 0.0
    wide = torch.complex128 if exp.is_complex() else torch.float64
    e, b = exp.to(wide), b.to(wide)
    num = float(torch.linalg.vector_norm(e - b))
    den = float(torch.linalg.vector_norm(e))
    if num == 0.0:
        return 0.0
    return num / den if den > 0 else float("inf")


def _compare(ref_vals, new_vals, info: _TraceInfo, perm, names2):
    tols = tolerances(info.op_names)
    for i, (outs_a, outs_b) in enumerate(zip(ref_vals, new_vals)):
        for j, (a, b) in enumerate(zip(outs_a, outs_b)):
            if a is None or b is None:   # a view of a parameter
                if (a is None) != (b is None):
                    return i, j, float("inf"), 0.0
                continue
            ex = info.act_exprs[i][j]
            exp = apply_exprs(a, ex, perm) if any(e is not None for e in ex) else a
            if exp.shape != b.shape:
                return i, j, float("inf"), 0.0
            if not (a.is_floating_point() or a.is_complex()):
                if not torch.equal(exp, b):
                    return i, j, float("inf"), 0.0
                continue
            if a.numel() == 0:
                continue
            r = rel_error(exp, b)
            if not r <= tols[i]:
                return i, j, r, tols[i]
    if len(ref_vals) != len(new_vals):
        return min(len(ref_vals), len(new_vals)), 0, float("inf"), 0.0
    return None


def self_test(spec: PermutationSpec, model: nn.Module, example_inputs, seed: int = 0, reinit: bool = True):
    """Check ``spec`` on ``model``: every traced activation permutes as the spec says.

    Raises :class:`MergelabError` naming the first op whose output disagrees.
    """
    from ..apply import permute
    if reinit:
        m1 = copy_model(model).float().eval()
        _reinit(m1, seed + 1)
    else:   # the caller's own float copy
        m1 = model.eval()
    rec1, _ = run_recorded(m1, example_inputs, keep="values")
    if rec1.names != spec.trace.op_names:
        raise MergelabError("self-test: the model ran a different sequence of ops than when traced "
                            "(data-dependent control flow?)")
    perm = spec.random_permutation(seed)
    state = {k: v.detach() for k, v in m1.state_dict().items()}
    m2 = copy_model(m1)
    m2.load_state_dict(permute(spec, state, perm))
    rec2, _ = run_recorded(m2, example_inputs, keep="values")
    bad = _compare(rec1.values, rec2.values, spec.trace, perm, None)
    if bad is not None:
        i, j, d, tol = bad
        groups = sorted(set().union(*[expr_groups(e) for e in spec.trace.act_exprs[i][j] if e is not None])) \
            if i < len(spec.trace.act_exprs) and j < len(spec.trace.act_exprs[i]) else []
        raise MergelabError(f"permutation spec self-test failed at op #{i} {rec1.names[i]} output {j}: "
                            f"relative difference {d:.3g} (tolerance {tol:.2g}); groups on that tensor: {groups or 'none'}")
