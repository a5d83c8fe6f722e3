"""Finding permutations: weight matching, activation matching, many-model alignment.

Both matchers solve, per *unit*, a linear assignment problem that maximises the agreement
between the reference model A and the permuted model B:

* a ``plain`` group (or a ``heads`` / shared ``within_head`` group with no per-head
  dimensions) is one LAP over a cost matrix C (n x n);
* a ``heads`` group with per-head ``within_head`` groups (attention) is solved jointly: for
  every pair (head h of A, head h' of B) the best within-head permutation of each inner group
  is one small LAP on the (h, h') block of that group's flat cost matrix; the head
  permutation is then the LAP over the summed block scores.  Heads therefore move whole,
  and query/key and value/output dims are permuted inside the head they belong to.

Weight matching (Git Re-Basin) uses C = sum over the unit's parameter axes of
unfold(W_A) unfold(W_B with all other axes permuted)^T and coordinate descent over units in
random order until a sweep improves nothing.  Activation matching uses the cross-model
Pearson correlation of the unit's activations, accumulated in float64 over the data.
"""
from __future__ import annotations

from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment
from torch import nn

from ..device import module_device, placed, resolve_device, to_device
from ..errors import MergelabError
from .apply import permute
from .spec import Permutation, PermutationSpec, compose_heads, expr_size, run_recorded
from .spec.rules import expr_groups


def _lap(c: np.ndarray) -> np.ndarray:
    return linear_sum_assignment(c, maximize=True)[1]


# ----------------------------------------------------------------------------- pieces
def _pieces(t: torch.Tensor, rules, sizes) -> list:
    """Split a tensor into pieces whose axes are each ``None`` or one group name.

    Product axes are reshaped into their parts, concatenations and segments are cut.
    """
    by_axis: dict[int, list] = {}
    for r in rules:
        by_axis.setdefault(r.axis, []).append(r)
    out = [(t, [("raw", a) for a in range(t.dim())])]
    # first cut segments
    for a, rs in by_axis.items():
        if len(rs) == 1 and rs[0].start == 0 and rs[0].length == t.shape[a]:
            continue
        new = []
        for x, ax in out:
            k = next(i for i, v in enumerate(ax) if v == ("raw", a))
            pos = 0
            for r in sorted(rs, key=lambda r: r.start):
                if r.start > pos:
                    new.append((x.narrow(k, pos, r.start - pos), ax[:k] + [None] + ax[k + 1:]))
                new.append((x.narrow(k, r.start, r.length), ax[:k] + [("e", r.expr)] + ax[k + 1:]))
                pos = r.start + r.length
            if pos < x.shape[k]:
                new.append((x.narrow(k, pos, x.shape[k] - pos), ax[:k] + [None] + ax[k + 1:]))
        out = new
    full = {a: rs[0].expr for a, rs in by_axis.items()
            if len(rs) == 1 and rs[0].start == 0 and rs[0].length == t.shape[a]}
    out = [(x, [("e", full[v[1]]) if v is not None and v[0] == "raw" and v[1] in full
                else None if v is not None and v[0] == "raw" else v for v in ax]) for x, ax in out]
    # then expand rules into simple axes
    done = []
    stack = out
    while stack:
        x, ax = stack.pop()
        k = next((i for i, v in enumerate(ax) if v is not None and v[0] == "e"), None)
        if k is None:
            done.append((x, ax))
            continue
        e = ax[k][1]
        if e[0] == "id":
            stack.append((x, ax[:k] + [None] + ax[k + 1:]))
        elif e[0] == "group":
            stack.append((x, ax[:k] + [("g", e[1])] + ax[k + 1:]))
        elif e[0] == "prod":
            shp = [expr_size(p, sizes) for p in e[1]]
            y = x.reshape(*x.shape[:k], *shp, *x.shape[k + 1:])
            stack.append((y, ax[:k] + [("e", p) for p in e[1]] + ax[k + 1:]))
        elif e[0] == "cat":
            pos = 0
            for p in e[1]:
                n = expr_size(p, sizes)
                stack.append((x.narrow(k, pos, n), ax[:k] + [("e", p)] + ax[k + 1:]))
                pos += n
        else:
            raise ValueError(e)
    return [(x, [v[1] if v is not None else None for v in ax]) for x, ax in done]


def _state_pieces(spec: PermutationSpec, state: Mapping[str, torch.Tensor], what: str,
                  device: torch.device | None = None) -> list:
    sizes = {n: g.size for n, g in spec.groups.items()}
    res = []
    for name in spec.axes:
        if name not in state:
            raise MergelabError(f"{what}: state has no tensor {name!r} that the spec permutes")
        t = state[name]
        if not torch.is_tensor(t):
            try:
                t = torch.as_tensor(t)
            except (TypeError, ValueError, RuntimeError):
                raise MergelabError(f"{what}: {name!r} is a {type(t).__name__}, expected a tensor") from None
        try:
            res.extend(_pieces(t.detach().to(device=device, dtype=torch.float32), spec.axes[name], sizes))
        except (IndexError, RuntimeError):  # fewer dims or smaller axes than the traced model's
            raise MergelabError(f"{what}: tensor {name!r} of shape {tuple(t.shape)} does not fit the spec "
                                "(traced on another architecture or size?)") from None
    return res


def _permute_piece(x, ax, perm, skip=None):
    for k, g in enumerate(ax):
        if g is not None and k != skip:
            x = x.index_select(k, perm[g].to(x.device))
    return x


# ----------------------------------------------------------------------------- units
class _Units:
    """Which groups are solved jointly (heads with their per-head within groups)."""

    def __init__(self, spec: PermutationSpec):
        self.spec = spec
        inner = {}
        for n, g in spec.groups.items():
            if g.kind == "within_head" and g.per_head:
                inner.setdefault(g.head_group, []).append(n)
        self.inner = inner
        self.units = []   # (kind, head or group name, [inner names])
        for n, g in spec.groups.items():
            if g.kind == "within_head" and g.per_head:
                continue
            self.units.append(("joint", n, inner[n]) if n in inner else ("plain", n, []))

    def solve_each(self, costs: dict) -> dict:
        """Every unit solved once from the identity, on its groups' matrices in ``costs``
        (costs that do not depend on the other groups: signatures, activation correlations)."""
        perm = dict(self.spec.identity())
        for u in self.units:
            cs = {n: costs[n] for n in (u[1], *u[2]) if n in costs}
            if cs:
                new, _ = self.solve(u, cs, perm)
                perm.update(new)
        return perm

    def solve(self, unit, costs: dict, perm: dict):
        """Best permutation(s) for one unit given cost matrices; returns (new dict, gain)."""
        kind, n, inners = unit
        if kind == "plain":
            c = costs.get(n)
            if c is None:
                return {}, 0.0
            idx = np.arange(len(c))
            old = float(c[idx, perm[n].numpy()].sum())
            new_p = _lap(c)
            new = float(c[idx, new_p].sum())
            return {n: torch.as_tensor(new_p, dtype=torch.int64)}, new - old
        H = self.spec.groups[n].size
        score = np.zeros((H, H)) if costs.get(n) is None else costs[n].copy()
        old = 0.0
        if costs.get(n) is not None:
            old += float(costs[n][np.arange(H), perm[n].numpy()].sum())
        taus = {}
        for i in inners:
            c = costs.get(i)
            g = self.spec.groups[i]
            d = g.head_dim
            if c is None:
                continue
            old += float(c[np.arange(H * d), perm[i].numpy()].sum())
            t = {}
            for h in range(H):
                for h2 in range(H):
                    blk = c[h * d:(h + 1) * d, h2 * d:(h2 + 1) * d]
                    p = _lap(blk)
                    score[h, h2] += blk[np.arange(d), p].sum()
                    t[h, h2] = p
            taus[i] = t
        sigma = _lap(score)
        new = float(score[np.arange(H), sigma].sum())
        out = {n: torch.as_tensor(sigma, dtype=torch.int64)}
        for i in inners:
            g = self.spec.groups[i]
            if i in taus:
                # composed vector: new slot h takes old head sigma[h] with tau fitted for (h, sigma[h])
                tl = [None] * H
                for h in range(H):
                    tl[int(sigma[h])] = torch.as_tensor(taus[i][h, int(sigma[h])], dtype=torch.int64)
                out[i] = compose_heads(out[n], tl, g.head_dim)
            else:   # no cost for this inner group: keep each head's current inner order
                d = g.head_dim
                cur = perm[i].view(H, d)
                old_heads = (cur[:, 0] // d).tolist()
                tl = [None] * H
                for h, s in enumerate(old_heads):
                    tl[s] = cur[h] - s * d
                out[i] = compose_heads(out[n], tl, d)
        return out, new - old


def unit_order(spec: PermutationSpec, units: list, kind: str, rng: np.random.Generator) -> list[int]:
    """The order in which one sweep of coordinate descent visits ``units``.

    ``"random"``: a fresh random order per sweep (Git Re-Basin; drawn from ``rng``).
    ``"local"``: a fixed order, units touched by few tensors first and the hubs (residual
    streams, touched by every block) last, ties in spec order.  With it, each tensor is read
    once per sweep by the streamed matcher and only the hubs hold a cost matrix across units
    (see :func:`mergelab.align.stream.weight_matching_streamed`)."""
    if kind == "random":
        return [int(u) for u in rng.permutation(len(units))]
    if kind != "local":
        raise MergelabError(f"weight_matching: order must be 'random' or 'local', found {kind!r}")
    count = [0] * len(units)
    where = {g: i for i, u in enumerate(units) for g in (u[1], *u[2])}
    for rules in spec.axes.values():
        touched = {where[g] for r in rules for g in expr_groups(r.expr) if g in where}
        for i in touched:
            count[i] += 1
    return sorted(range(len(units)), key=lambda i: (count[i], i))


class _Entry:
    """One (tensor piece, group axis) term of a group's weight-matching cost.

    ``a`` is A's piece unfolded with the group axis first (fixed); ``b`` is B's piece with
    the group axis moved first (contiguous, never permuted on that axis); ``others`` are
    the (axis of ``b``, group) pairs that are permuted by the current permutation before
    the product.  The term C[i, j] = <A row i, B row j with the other axes permuted> is in
    B's original index space for the group axis, so a group's cost does not change when
    only that group's own permutation changes (unless it also sits on another axis).
    """

    __slots__ = ("group", "a", "b", "others", "key", "value")

    def __init__(self, group, xa, xb, k, ax):
        n = xa.shape[k]
        self.group = group
        self.a = xa.movedim(k, 0).reshape(n, -1).contiguous()
        self.b = xb.movedim(k, 0).contiguous()
        order = [k] + [j for j in range(len(ax)) if j != k]
        self.others = [(pos, ax[j]) for pos, j in enumerate(order) if pos > 0 and ax[j] is not None]
        self.key = None
        self.value = None

    def versions(self, ver) -> tuple:
        return tuple(ver[g] for _, g in self.others)

    def cost(self, perm, ver) -> np.ndarray:
        """The term for the current permutation (recomputed only when another axis changed)."""
        key = self.versions(ver)
        if key != self.key:
            b = self.b
            for pos, g in self.others:
                b = b.index_select(pos, perm[g].to(b.device))
            self.value = (self.a @ b.reshape(b.shape[0], -1).T).cpu().numpy().astype(np.float64)
            self.key = key
        return self.value


def _sorted_rows(moved: torch.Tensor) -> torch.Tensor:
    """``moved`` (the unit axis first) flattened to (units, rest), each row sorted ascending.

    On the CPU: one float32 (float64 for float64 input) copy, sorted in place by NumPy's
    vectorised sort. torch's CPU sort does 8 M float32 values/s on this 2-core VM against
    NumPy's 92 M (an 11008 x 4096 matrix: 5.5 s vs 0.49 s), and a 7B model's signatures sort
    54 G values. The sorted values are the same (NaN last in both; -0.0 and 0.0 may trade
    places, which no signature cost can see)."""
    n = moved.shape[0]
    m = 1
    for d in moved.shape[1:]:
        m *= int(d)
    if moved.device.type != "cpu":
        return moved.reshape(n, m).sort(dim=1).values
    out = torch.empty((n, m), dtype=torch.float64 if moved.dtype == torch.float64 else torch.float32)
    out.view(moved.shape).copy_(moved.detach())   # layout and dtype in one copy (exact for bf16/fp16)
    out.numpy().sort(axis=1)
    return out


def _signatures(x: torch.Tensor, k: int, q: int = 64) -> torch.Tensor:
    """Per-unit signature along axis ``k``: the unit's row (every other axis) sorted, sampled
    at ``q`` evenly spaced ranks.  Sorting makes it invariant to any permutation of the other
    axes, so a unit keeps its signature whatever the other groups do."""
    rows = _sorted_rows(x.movedim(k, 0))
    L = rows.shape[1]
    if L > q:
        rows = rows[:, torch.linspace(0, L - 1, q).round().long()]
    return rows.double()


def signature_match(spec: PermutationSpec, reference_state: Mapping[str, torch.Tensor],
                    other_state: Mapping[str, torch.Tensor], q: int = 64) -> Permutation:
    """A one-shot weight-statistics match (no coordinate descent): per group, the LAP that
    minimises the summed squared distance between the units' signatures (each parameter row
    along the group's axis, sorted, at ``q`` ranks) of the reference and the other model.

    Every group is solved independently of the others, so a randomly permuted copy is
    recovered exactly in one step (the signatures of matching units are equal).  Attention
    heads are solved jointly with their per-head inner groups, as in weight matching.  Used
    as weight matching's starting point (``init="signature"``)."""
    if isinstance(reference_state, nn.Module):
        reference_state = reference_state.state_dict()
    if isinstance(other_state, nn.Module):
        other_state = other_state.state_dict()
    pa = _state_pieces(spec, reference_state, "signature_match (reference)")
    pb = _state_pieces(spec, other_state, "signature_match (other)")
    return _signature_match(spec, pa, pb, q)


def _signature_match(spec: PermutationSpec, pa: list, pb: list, q: int = 64) -> Permutation:
    costs: dict[str, np.ndarray] = {}
    for (xa, ax), (xb, _) in zip(pa, pb):
        if xa.shape != xb.shape:
            raise MergelabError(f"signature_match: reference and other differ in shape: {tuple(xa.shape)} "
                                f"vs {tuple(xb.shape)}")
        for k, g in enumerate(ax):
            if g is None:
                continue
            sa, sb = _signatures(xa, k, q), _signatures(xb, k, q)
            c = (2 * sa @ sb.T - (sa * sa).sum(1)[:, None] - (sb * sb).sum(1)[None, :]).numpy()
            costs[g] = costs[g] + c if g in costs else c
    return spec.check(_Units(spec).solve_each(costs))


def _head_of(spec: PermutationSpec, g: str) -> str:
    grp = spec.groups[g]
    return grp.head_group if grp.kind == "within_head" and grp.per_head else g


def _piece_objective(xa, xb, ax, perm) -> float:
    return float((xa * _permute_piece(xb, ax, perm)).sum(dtype=torch.float64))


def weight_matching(spec: PermutationSpec, reference_state: Mapping[str, torch.Tensor],
                    other_state: Mapping[str, torch.Tensor], max_iter: int = 100, seed: int = 0,
                    init: "Mapping[str, torch.Tensor] | str" = "signature", verbose: bool = False,
                    groups: Sequence[str] | None = None,
                    device: str | torch.device | None = None, order: str = "random") -> Permutation:
    """Permutation of ``other_state`` that best matches ``reference_state`` (Git Re-Basin).

    Starts from ``init``: ``"signature"`` (default: :func:`signature_match`, a one-shot match
    of sorted-weight signatures that solves every group independently, so the descent does
    not start where coupled groups hold each other in a poor local optimum; ViT-style stacks
    started from the identity stop ~26% below the true permutation's objective), ``"identity"``
    (Git Re-Basin's start), or a permutation.  Then coordinate descent over groups in random
    order (seeded), one LAP per group (or per head unit), until a sweep improves nothing (gain <= 1e-12 x max(1, |objective|)) or
    ``max_iter`` sweeps.  ``permute(spec, other_state, result)`` is then aligned to the
    reference.  ``result.history`` holds the objective sum <W_A, pi(W_B)> after each sweep
    (index 0: before the first sweep).  ``groups`` restricts the search to some groups
    (the others keep their ``init`` value).

    Each cost term (a tensor piece times one of its group axes) is computed once per
    change of the permutations of the piece's *other* axes and cached; a unit whose terms
    are all unchanged since it was last solved is skipped (its LAP would return the same
    answer).  The gain of a step is <C, P_new> - <C, P_old> from the same float64 C, so
    float noise cannot produce spurious improvements.

    ``device``: where the cost matrices are computed (default: the reference tensors'
    device); the linear assignments run on the CPU (scipy) on float64 copies.

    ``order``: the order of the units in a sweep, ``"random"`` (default) or ``"local"`` (hubs
    last; :func:`unit_order`).  :func:`mergelab.align.stream.weight_matching_streamed` reads
    checkpoints from disk instead and gives the same permutations for the same ``order``.
    """
    if order not in ("random", "local"):
        raise MergelabError(f"weight_matching: order must be 'random' or 'local', found {order!r}")
    dev = resolve_device(device, "weight_matching device")
    if isinstance(reference_state, nn.Module):
        reference_state = reference_state.state_dict()
    if isinstance(other_state, nn.Module):
        other_state = other_state.state_dict()
    if dev is None:
        first = next((reference_state[n] for n in spec.axes if n in reference_state), None)
        dev = first.device if torch.is_tensor(first) else None
    pa = _state_pieces(spec, reference_state, "weight_matching (reference)", dev)
    pb = _state_pieces(spec, other_state, "weight_matching (other)", dev)
    for (xa, _), (xb, _) in zip(pa, pb):
        if xa.shape != xb.shape:
            raise MergelabError(f"weight_matching: reference and other differ in shape: {tuple(xa.shape)} "
                                f"vs {tuple(xb.shape)}")
    if init is None or (isinstance(init, str) and init == "identity"):
        perm = dict(spec.identity())
    elif isinstance(init, str) and init == "signature":
        perm = dict(_signature_match(spec, pa, pb))
        if groups is not None:   # only the searched groups start from the signature match
            perm = {g: (v if g in groups or _head_of(spec, g) in groups else torch.arange(len(v)))
                    for g, v in perm.items()}
    elif isinstance(init, str):
        raise MergelabError(f"weight_matching: init must be 'signature', 'identity' or a permutation, "
                            f"found {init!r}")
    else:
        perm = dict(spec.check(init))
    units = _Units(spec)
    todo = [u for u in units.units if groups is None or u[1] in groups]

    const = 0.0                       # pieces with no permuted axis
    entries: list[_Entry] = []
    piece_entries: list[tuple] = []   # per permuted piece: (xa, xb, ax, its entries)
    for (xa, ax), (xb, _) in zip(pa, pb):
        if all(g is None for g in ax):
            const += float((xa * xb).sum(dtype=torch.float64))
            continue
        mine = [_Entry(g, xa, xb, k, ax) for k, g in enumerate(ax) if g is not None]
        entries.extend(mine)
        piece_entries.append((xa, xb, ax, mine))
    del pa, pb
    ver = {g: 0 for g in spec.groups}
    # terms with no other permuted axis never change: one summed matrix per group
    fixed: dict[str, np.ndarray] = {}
    for e in entries:
        if not e.others:
            c = e.cost(perm, ver)
            fixed[e.group] = fixed[e.group] + c if e.group in fixed else c.copy()
    by_unit = [[e for e in entries if e.others and e.group in (u[1], *u[2])] for u in todo]
    fixed_by_unit = [{g: c for g, c in fixed.items() if g in (u[1], *u[2])} for u in todo]

    def objective() -> float:
        tot = const
        for xa, xb, ax, mine in piece_entries:
            # a current cached term gives <A, pi(B)> as its trace under the group's permutation
            e = next((e for e in mine if e.key == e.versions(ver)), None)
            if e is not None:
                tot += float(e.value[np.arange(len(e.value)), perm[e.group].numpy()].sum())
            else:
                tot += _piece_objective(xa, xb, ax, perm)
        return tot

    rng = np.random.default_rng(seed)
    history = [objective()]
    solved_at: dict[int, tuple] = {}
    for sweep in range(max_iter):
        improved = False
        for ui in unit_order(spec, todo, order, rng):
            key = tuple(e.versions(ver) for e in by_unit[ui])
            if solved_at.get(ui) == key:
                continue          # same costs as at its last solve: same answer
            costs = dict(fixed_by_unit[ui])
            for e in by_unit[ui]:
                c = e.cost(perm, ver)
                costs[e.group] = costs[e.group] + c if e.group in costs else c
            new, gain = units.solve(todo[ui], costs, perm)
            solved_at[ui] = key
            if gain > 1e-12 * max(1.0, abs(history[-1])):
                improved = True
                for g, v in new.items():
                    if not torch.equal(v, perm[g]):
                        perm[g] = v
                        ver[g] += 1
        history.append(objective())
        if verbose:
            print(f"weight_matching: sweep {sweep + 1}: objective {history[-1]:.6g}")
        if not improved:
            break
    return Permutation(spec.check(perm), history=history)


# ----------------------------------------------------------------------------- activations
def _default_input(batch):
    if isinstance(batch, (tuple, list)):
        return batch[0]
    return batch


# ops whose outputs serve as activation-matching sites: layers, norms, nonlinearities
SITE_OPS = {"aten.addmm", "aten.mm", "aten.bmm", "aten.convolution", "aten.native_layer_norm",
            "aten.native_batch_norm", "aten._native_batch_norm_legit_no_training", "aten.native_group_norm",
            "aten._fused_rms_norm", "aten.relu", "aten.gelu", "aten.tanh", "aten.sigmoid", "aten.silu",
            "aten.hardtanh", "aten.leaky_relu", "aten.elu", "module:MultiheadAttention"}


def activation_sites(spec: PermutationSpec) -> dict[str, list[tuple]]:
    """group -> [((op name, occurrence), output index, axis)] of traced layer/norm/activation
    outputs that carry the group on one axis."""
    if spec.trace is None:
        raise MergelabError("activation matching needs a spec built by permutation_spec() "
                            "(a loaded spec has no trace)")
    sites: dict[str, list] = {}
    counts: dict[str, int] = {}
    for name, outs in zip(spec.trace.op_names, spec.trace.act_exprs):
        k = counts.get(name, 0)
        counts[name] = k + 1
        if name not in SITE_OPS and not name.startswith("aten.relu"):
            continue
        for j, ex in enumerate(outs):
            for a, e in enumerate(ex):
                if e is not None and e[0] == "group":
                    sites.setdefault(e[1], []).append(((name, k), j, a))
    return sites


def activation_matching(spec: PermutationSpec, reference_model: nn.Module, other_model: nn.Module,
                        data: Iterable, input_fn: Callable | None = None, max_batches: int | None = None,
                        seed: int = 0, device: str | torch.device | None = None) -> Permutation:
    """Permutation of ``other_model`` matching ``reference_model`` by activation correlation.

    Runs both models on each batch of ``data`` (``input_fn(batch)`` gives the model input;
    default: a tensor or dict is the input, a tuple/list's first element is), and
    accumulates, per group and per traced site carrying it, float64 sums for the
    cross-model Pearson correlation (conv maps: flattened over batch and space).  Dead
    channels (zero variance) give NaN, set to 0.  One LAP per group (joint for attention
    heads).  Groups with no traced activation (e.g. inside nn.MultiheadAttention, which is
    traced as one step) are then weight-matched with all other groups held fixed.
    ``device``: where both models run and the correlations accumulate (each model moves
    there for the pass and back after; default: where the models are).
    """
    dev = resolve_device(device, "activation_matching device")
    with placed(reference_model, dev), placed(other_model, dev):
        return _activation_matching(spec, reference_model, other_model, data, input_fn, max_batches,
                                    seed)


def _activation_matching(spec, reference_model, other_model, data, input_fn, max_batches, seed):
    sites = activation_sites(spec)
    want: dict[int, list[int]] = {}
    for lst in sites.values():
        for i, j, _ in lst:
            want.setdefault(i, [])
            if j not in want[i]:
                want[i].append(j)
    input_fn = input_fn or _default_input
    stats: dict = {}
    ref = reference_model.eval()
    oth = other_model.eval()
    nb = 0
    for batch in data:
        if max_batches is not None and nb >= max_batches:
            break
        nb += 1
        x = to_device(input_fn(batch), module_device(ref))
        try:
            ra, _ = run_recorded(ref, x, keep="want", want=want)
            rb, _ = run_recorded(oth, x, keep="want", want=want)
        except MergelabError:
            raise
        except Exception as e:  # noqa: BLE001 - whatever the models raise on inputs they cannot take
            first = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            raise MergelabError(f"activation_matching: the models cannot run on batch {nb - 1}:"
                                f" {type(e).__name__}: {first}") from None
        va = {i: dict(zip(want[i], v)) for i, v in ra.values}
        vb = {i: dict(zip(want[i], v)) for i, v in rb.values}
        if len(va) != len(want) or len(vb) != len(want):
            raise MergelabError("activation_matching: a model did not run the layers the spec traced "
                                "(another architecture, or inputs unlike the example inputs)")
        for g, lst in sites.items():
            for (i, j, a) in lst:
                xa = va[i][j].movedim(a, -1).reshape(-1, va[i][j].shape[a]).double()
                xb = vb[i][j].movedim(a, -1).reshape(-1, vb[i][j].shape[a]).double()
                s = stats.get((i, j, a))
                if s is None:
                    n = xa.shape[1]
                    s = stats[(i, j, a)] = [0, *(xa.new_zeros(n) for _ in range(4)), xa.new_zeros(n, n)]
                s[0] += xa.shape[0]
                s[1] += xa.sum(0); s[2] += xb.sum(0)
                s[3] += (xa * xa).sum(0); s[4] += (xb * xb).sum(0)
                s[5] += xa.T @ xb
    if nb == 0:
        raise MergelabError("activation_matching: data gave no batches")
    corr: dict[str, np.ndarray] = {}
    for g, lst in sites.items():
        for key in lst:
            n, sa, sb, saa, sbb, sab = stats[key]
            ma, mb = sa / n, sb / n
            cov = sab / n - ma[:, None] * mb[None, :]
            sda = (saa / n - ma * ma).clamp_min(0).sqrt()
            sdb = (sbb / n - mb * mb).clamp_min(0).sqrt()
            c = cov / (sda[:, None] * sdb[None, :])
            c = torch.nan_to_num(c, nan=0.0, posinf=0.0, neginf=0.0).cpu().numpy()
            corr[g] = corr[g] + c if g in corr else c
    units = _Units(spec)
    perm = units.solve_each(corr)
    unmatched = [u[1] for u in units.units if not any(n in corr for n in (u[1], *u[2]))]
    history = []
    if unmatched:
        wm = weight_matching(spec, ref.state_dict(), oth.state_dict(), init=perm, groups=unmatched, seed=seed)
        perm, history = dict(wm), wm.history
    return Permutation(spec.check(perm), history=history)


# ----------------------------------------------------------------------------- many models
def _state(x):
    return x.state_dict() if isinstance(x, nn.Module) else x


def align_to_reference(spec: PermutationSpec, reference, others: Sequence, method: str = "weight",
                       data: Iterable | None = None, **kw) -> list[Permutation]:
    """Align each of ``others`` to ``reference``; returns one permutation per model.

    ``method="weight"`` takes states or models; ``"activation"`` takes models and ``data``.
    """
    if method == "weight":
        return [weight_matching(spec, _state(reference), _state(o), **kw) for o in others]
    if method == "activation":
        if data is None:
            raise MergelabError("align_to_reference: method 'activation' needs data")
        data = list(data)
        return [activation_matching(spec, reference, o, data, **kw) for o in others]
    raise MergelabError(f"align_to_reference: unknown method {method!r}; expected 'weight' or 'activation'")


def transfer_permutation(spec: PermutationSpec, permutation: Mapping[str, torch.Tensor], states: Sequence) -> list[dict]:
    """Apply one permutation (found between two foundation models) to every expert
    fine-tuned from the permuted foundation model (the non-local merging pipeline)."""
    return [permute(spec, _state(s), permutation) for s in states]


def merge_many(spec: PermutationSpec, states: Sequence, max_iter: int = 20, seed: int = 0,
               verbose: bool = False) -> list[Permutation]:
    """MergeMany-style alignment of N models to a common frame.

    Repeatedly (models in random order) weight-match each model to the mean of the others
    (each permuted by its current permutation) until no permutation changes.  Returns one
    permutation per model; merging ``permute(spec, s_i, p_i)`` averages aligned models.
    """
    states = [{k: v.detach().float() for k, v in _state(s).items()} for s in states]
    if len(states) < 2:
        raise MergelabError(f"merge_many: needs at least 2 models, found {len(states)}")
    perms = [spec.identity() for _ in states]
    current = [dict(s) for s in states]
    rng = np.random.default_rng(seed)
    for it in range(max_iter):
        changed = False
        for i in rng.permutation(len(states)):
            others = [current[j] for j in range(len(states)) if j != i]
            mean = {k: sum(o[k] for o in others) / len(others) for k in spec.axes}
            p = weight_matching(spec, mean, states[i], seed=int(rng.integers(1 << 31)), init=perms[i])
            if any(not torch.equal(p[k], perms[i][k]) for k in p):
                changed = True
                perms[i] = p
                current[i] = permute(spec, states[i], p)
        if verbose:
            print(f"merge_many: round {it + 1}: {'changed' if changed else 'stable'}")
        if not changed:
            break
    return perms


__all__ = ["weight_matching", "signature_match", "activation_matching", "activation_sites", "align_to_reference",
           "transfer_permutation", "merge_many"]

