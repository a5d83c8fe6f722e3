"""Weight matching streamed from checkpoints: tensors are read on demand, a few at a time.

:func:`weight_matching` holds both models' permuted tensors in float32 (a 7B pair: ~54 GB).
:func:`weight_matching_streamed` runs the same coordinate descent (same start, same units, same
LAPs, same stopping rule) but keeps no tensor between units: for the unit being solved it
reads the tensors that touch it (``Checkpoint.get``: one tensor, pread, no mmap), adds their
terms ``unfold(W_A) unfold(W_B with the other axes permuted)^T`` to the unit's float64 cost,
solves, and then, with the tensors still in memory and the unit's new permutation, adds each
tensor's term for the *next* unit it touches in the sweep to that unit's pending cost (exact:
that term depends only on the units solved before it, Gauss-Seidel as in memory).  A tensor
touching two units (every matrix of a Llama block: its block's unit and the residual stream)
is therefore read once per sweep.

Memory is the tensors of one unit (in their stored dtype, converted to float32 one product
at a time, products in row blocks), the unit's cost matrices, and the pending costs of the
units not solved yet.  With ``order="local"`` (units touched by few tensors first, hubs last)
the only pending costs are the hubs' (Llama: one hidden x hidden float64 matrix).  With
``order="random"`` (the in-memory default) every unit may hold a pending cost.

For the same ``order``, ``seed`` and ``init`` the permutations are those of
:func:`weight_matching` (costs summed in another order differ by float64 rounding only).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from ..errors import MergelabError
from .matching import _pieces, _signatures, _Units, unit_order
from .spec import Permutation, PermutationSpec


class _Reader:
    """``name -> tensor`` from a Checkpoint-like object (``get``/``shape``) or a mapping."""

    def __init__(self, src, what: str):
        self.src = src
        self.what = what
        self.bytes = 0
        self.reads = 0

    def shape(self, name: str) -> tuple:
        self._has(name)
        if hasattr(self.src, "shape") and callable(self.src.shape):
            return tuple(self.src.shape(name))
        return tuple(self._tensor(self.src[name], name).shape)

    def _has(self, name):
        if name not in self.src:
            raise MergelabError(f"{self.what}: state has no tensor {name!r} that the spec permutes")

    def _tensor(self, t, name):
        if not torch.is_tensor(t):
            try:
                t = torch.as_tensor(t)
            except (TypeError, ValueError, RuntimeError):
                raise MergelabError(f"{self.what}: {name!r} is a {type(t).__name__}, expected a tensor") from None
        return t

    def get(self, name: str) -> torch.Tensor:
        self._has(name)
        src = self.src
        t = src.get(name) if hasattr(src, "get") and not isinstance(src, Mapping) else src[name]
        t = self._tensor(t, name).detach()
        self.bytes += t.numel() * t.element_size()
        self.reads += 1
        return t


def _plan(spec: PermutationSpec, ra: _Reader, rb: _Reader, units: list):
    """Per tensor: its pieces' group axes (from the shapes alone) and the units it touches."""
    sizes = {n: g.size for n, g in spec.groups.items()}
    where = {g: i for i, u in enumerate(units) for g in (u[1], *u[2])}
    axes, touches = {}, {}
    for name in spec.axes:
        sa, sb = ra.shape(name), rb.shape(name)
        if sa != sb:
            raise MergelabError(f"weight_matching: reference and other differ in shape: {sa} vs {sb} "
                                f"(tensor {name!r})")
        try:
            pcs = _pieces(torch.empty(sa, device="meta"), spec.axes[name], sizes)
        except (IndexError, RuntimeError):
            raise MergelabError(f"{ra.what}: tensor {name!r} of shape {sa} does not fit the spec "
                                "(traced on another architecture or size?)") from None
        axes[name] = [ax for _, ax in pcs]
        touches[name] = sorted({where[g] for ax in axes[name] for g in ax if g is not None})
    return axes, touches


def _load(spec, name, ra, rb, device):
    sizes = {n: g.size for n, g in spec.groups.items()}
    ta, tb = ra.get(name), rb.get(name)
    if tuple(ta.shape) != tuple(tb.shape):
        raise MergelabError(f"weight_matching: reference and other differ in shape: {tuple(ta.shape)} "
                            f"vs {tuple(tb.shape)} (tensor {name!r})")
    ta, tb = ta.to(device=device), tb.to(device=device)
    return list(zip(_pieces(ta, spec.axes[name], sizes), _pieces(tb, spec.axes[name], sizes)))


def _f32(x):
    return x if x.dtype == torch.float32 else x.to(torch.float32)


def _add(acc: dict, g: str, block_fn, n: int, block_rows: int):
    """acc[g] += the n x n float64 matrix whose rows [i, j) are ``block_fn(i, j)``."""
    c = acc.get(g)
    if c is None:
        c = acc[g] = np.zeros((n, n))
    for i in range(0, n, block_rows):
        j = min(n, i + block_rows)
        c[i:j] += block_fn(i, j)


def _term_b(xb: torch.Tensor, k: int, ax, perm) -> torch.Tensor:
    """B's piece with every other group axis permuted, axis ``k`` first, flattened to (n, rest),
    float32 contiguous: the matrix of ``matching._Entry`` (``b`` permuted and reshaped), built
    with the permutations applied in the stored dtype and one converting copy."""
    b = xb
    for j, og in enumerate(ax):
        if j != k and og is not None:
            b = b.index_select(j, perm[og].to(b.device))
    b = b.movedim(k, 0)
    out = torch.empty((b.shape[0], b[0].numel() if b.shape[0] else 0), dtype=torch.float32, device=b.device)
    out.view(b.shape).copy_(b)
    return out


def _add_terms(acc: dict, pieces: list, groups: set, perm, block_rows: int):
    """Weight-matching terms of one tensor's pieces for the groups of one unit: the products of
    ``matching._Entry`` (same float32 matrices, same products), with A converted a block of rows
    at a time, so that a tensor costs one float32 copy (B's) beside the stored ones."""
    for (xa, ax), (xb, _) in pieces:
        for k, g in enumerate(ax):
            if g is None or g not in groups:
                continue
            b = _term_b(xb, k, ax, perm)
            am = xa.movedim(k, 0)
            n = am.shape[0]

            def block(i, j, am=am, b=b):
                blk = torch.empty((j - i, b.shape[1]), dtype=torch.float32, device=b.device)
                blk.view(am[i:j].shape).copy_(am[i:j])
                return (blk @ b.T).cpu().numpy().astype(np.float64)
            _add(acc, g, block, n, block_rows)
            del b


def _piece_value(pieces: list, perm, block_rows: int = 2048) -> float:
    """sum over the pieces of <A, pi(B)> (every permuted axis of B permuted); float32 products
    summed in float64, a block of rows at a time."""
    tot = 0.0
    for (xa, ax), (xb, _) in pieces:
        b = xb
        for k, g in enumerate(ax):
            if g is not None:
                b = b.index_select(k, perm[g].to(b.device))
        if xa.dim() == 0:
            tot += float((_f32(xa) * _f32(b)).sum(dtype=torch.float64))
            continue
        for i in range(0, xa.shape[0], block_rows):
            tot += float((_f32(xa[i:i + block_rows]) * _f32(b[i:i + block_rows])).sum(dtype=torch.float64))
    return tot


def _trace(costs: dict, perm) -> float:
    return sum(float(c[np.arange(len(c)), perm[g].numpy()].sum()) for g, c in costs.items())


def _signature_start(spec, solver, order, touches, ra, rb, device, q, block_rows) -> dict:
    """:func:`signature_match` with each tensor read once: units in ``order``; a unit is solved
    as soon as every tensor touching it has been read (its signature costs are then complete)."""
    perm = dict(spec.identity())
    acc: dict[str, np.ndarray] = {}
    seen = set()
    for ui in order:
        u = solver.units[ui]
        for name in spec.axes:
            if ui not in touches[name] or name in seen:
                continue
            seen.add(name)
            for (xa, ax), (xb, _) in _load(spec, name, ra, rb, device):
                for k, g in enumerate(ax):
                    if g is None:
                        continue
                    sa, sb = _signatures(xa, k, q), _signatures(xb, k, q)
                    nb = (sb * sb).sum(1)[None, :]
                    _add(acc, g, lambda i, j: (2 * sa[i:j] @ sb.T - (sa[i:j] * sa[i:j]).sum(1)[:, None]
                                               - nb).cpu().numpy(), sa.shape[0], block_rows)
        cs = {n: acc.pop(n) for n in (u[1], *u[2]) if n in acc}
        if cs:
            new, _ = solver.solve(u, cs, perm)
            perm.update(new)
    return perm


def weight_matching_streamed(spec: PermutationSpec, reference: Any, other: Any, max_iter: int = 100,
                             seed: int = 0, init: "Mapping[str, torch.Tensor] | str" = "signature",
                             order: str = "local", verbose: bool = False, q: int = 64,
                             block_rows: int = 2048, device: str | torch.device | None = None,
                             stats: dict | None = None) -> Permutation:
    """Weight matching of two checkpoints read tensor by tensor (see the module docstring).

    ``reference`` / ``other``: anything with ``get(name)`` and ``shape(name)`` (a
    :class:`mergelab.io.Checkpoint`, a :class:`~mergelab.align.PermutedCheckpoint`) or a
    mapping ``name -> tensor``; only the tensors the spec permutes are read.  ``init``,
    ``max_iter``, ``seed``, the stopping rule and ``result.history`` are those of
    :func:`weight_matching`; ``order`` (default ``"local"``, hubs last) is the unit order of a
    sweep.  ``block_rows``: rows of a cost matrix computed at a time (float32 product).
    ``stats`` (a dict, filled): ``bytes_read``, ``tensor_reads``, ``sweeps``, per-sweep
    ``reads_per_sweep``.
    """
    from ..device import resolve_device
    if order not in ("random", "local"):
        raise MergelabError(f"weight_matching: order must be 'random' or 'local', found {order!r}")
    dev = resolve_device(device, "weight_matching device")
    ra = _Reader(reference, "weight_matching (reference)")
    rb = _Reader(other, "weight_matching (other)")
    units = _Units(spec)
    todo = units.units
    axes, touches = _plan(spec, ra, rb, todo)
    rng = np.random.default_rng(seed)
    local = unit_order(spec, todo, "local", rng)

    if init is None or (isinstance(init, str) and init == "identity"):
        perm = dict(spec.identity())
    elif isinstance(init, str) and init == "signature":
        perm = _signature_start(spec, units, local, touches, ra, rb, dev, q, block_rows)
    elif isinstance(init, str):
        raise MergelabError(f"weight_matching: init must be 'signature', 'identity' or a permutation, "
                            f"found {init!r}")
    else:
        perm = dict(spec.check(init))
    groups_of = [set((u[1], *u[2])) for u in todo]

    # the objective at the start (one read of every tensor, no products): the stopping rule
    # of the first sweep compares its gains with it, as in memory
    history: list[float] = [sum(_piece_value(_load(spec, n, ra, rb, dev), perm) for n in spec.axes)]
    const = 0.0
    for name in spec.axes:          # tensors no unit touches only add a constant
        if not touches[name]:
            const += _piece_value(_load(spec, name, ra, rb, dev), perm)
    reads_per_sweep = []
    for sweep in range(max_iter):
        reads0 = ra.reads
        seq = unit_order(spec, todo, order, rng)
        pos = {u: i for i, u in enumerate(seq)}
        seq_of = {n: sorted(t, key=pos.__getitem__) for n, t in touches.items()}
        obj = const
        pend_last: dict[int, dict] = {}     # terms of tensors whose last unit this is (objective: trace)
        pend_other: dict[int, dict] = {}
        pending = set()                     # (tensor, unit) terms already added to a pending cost
        improved = False
        for ui in seq:
            gs = groups_of[ui]
            last_terms = pend_last.pop(ui, {})
            costs = {g: c.copy() for g, c in last_terms.items()}
            for g, c in pend_other.pop(ui, {}).items():
                if g in costs:
                    costs[g] += c
                else:
                    costs[g] = c
            loaded = []
            for name in spec.axes:
                if ui not in touches[name] or (name, ui) in pending:
                    continue
                pieces = _load(spec, name, ra, rb, dev)
                _add_terms(costs, pieces, gs, perm, block_rows)
                loaded.append((name, pieces))
            new, gain = units.solve(todo[ui], costs, perm)
            del costs
            if gain > 1e-12 * max(1.0, abs(history[-1])):
                improved = True
                for g, v in new.items():
                    if not torch.equal(v, perm[g]):
                        perm[g] = v
            obj += _trace(last_terms, perm)
            del last_terms
            for name, pieces in loaded:
                s = seq_of[name]
                i = s.index(ui)
                if i == len(s) - 1:
                    obj += _piece_value(pieces, perm)
                    continue
                nxt = s[i + 1]
                is_last = i + 1 == len(s) - 1
                # the trace of the terms gives <A, pi(B)> only if every piece has exactly one
                # axis in the last unit
                if is_last and any(sum(g in groups_of[nxt] for g in ax if g is not None) != 1
                                   for ax in axes[name]):
                    continue      # read again when ``nxt`` is solved
                _add_terms((pend_last if is_last else pend_other).setdefault(nxt, {}), pieces,
                           groups_of[nxt], perm, block_rows)
                pending.add((name, nxt))
            del loaded
        history.append(obj)
        reads_per_sweep.append(ra.reads - reads0)
        if verbose:
            print(f"weight_matching_streamed: sweep {sweep + 1}: objective {obj:.6g}, "
                  f"{ra.reads - reads0} tensor reads per model", flush=True)
        if not improved:
            break
    if stats is not None:
        stats.update(bytes_read=ra.bytes + rb.bytes, tensor_reads=ra.reads + rb.reads,
                     sweeps=len(history) - 1, reads_per_sweep=reads_per_sweep)
    return Permutation(spec.check(perm), history=history)


__all__ = ["weight_matching_streamed"]
