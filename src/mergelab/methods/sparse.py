"""Sparse task-vector merges: ``ties``, ``dare_linear``, ``dare_ties``, ``tall_masks``, ``consensus``.

Building blocks (usable on their own):

* :func:`kth_largest` — exact k-th largest of non-negative float32 values streamed in chunks,
  by a two-level radix select on the float32 bit pattern (65,536-bin histograms of the high
  and then the low 16 bits), so memory does not grow with the number of values; with the
  stream's length known, usually in ONE pass (:func:`kth_largest_many`);
* :func:`trim_states` / :func:`trim_mask` — the TIES trim per tensor (mergekit: exactly
  max(1, ⌊k·n⌋) entries survive), from a streaming pass over the tensor's chunks, so the
  engine can merge a big tensor in row blocks;
* :func:`elect_sign` and :func:`disjoint_merge` — TIES sign election and disjoint merge;
* :func:`dare_keep` — DARE's seeded Bernoulli keep-mask of any flat range of a tensor: the
  same entries are dropped whatever the block size (one generator per fixed 2^20-entry chunk).

Work on big tensors is done in chunks of ``CHUNK`` entries so that the temporaries stay small:
peak memory is the inputs, the output and O(models × CHUNK).
"""
from __future__ import annotations

import math
import struct
import threading
import warnings
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Annotated, Callable, Iterable, Iterator, Literal, Sequence

import torch
from torch import Tensor

from ..errors import MergelabError
from .basic import weighted_task_sum
from .registry import Range, TensorContext, merge_method
from .seeds import derive_seed, tensor_seed  # noqa: F401  (tensor_seed: re-exported)

CHUNK = 1 << 20
# Random draws (DARE, DELLA) come from one generator per DRAW_CHUNK flat entries: the row blocks
# of the engine (2^18 values) then hold whole draw chunks and share at most the two at their
# ends (a Mersenne twister cannot skip ahead: with 2^20-entry chunks the 4 blocks of a chunk
# all waited for, or raced to redo, the whole chunk's draws).  Seeding costs ~3 us a chunk.
DRAW_CHUNK = 1 << 16
Density = Annotated[list[float], Range(0, 1, lo_open=True)]


# ------------------------------------------------------------------ radix select

def _bucket(counts: Tensor, rank: int) -> tuple[int, int]:
    """Index of the bucket holding the ``rank``-th largest value (1-based), and the rank inside it."""
    from_top = counts.flip(0).cumsum(0)
    i = int(torch.searchsorted(from_top, torch.tensor([rank], dtype=from_top.dtype, device=from_top.device)))
    above = int(from_top[i - 1]) if i > 0 else 0
    return counts.numel() - 1 - i, rank - above


def _bits(x: Tensor) -> Tensor:
    return x.detach().reshape(-1).to(torch.float32).view(torch.int32)


WINDOW = 2  # high-16-bit buckets on each side of the first chunk's estimate (about ±1.5% in value)
KEY_BATCH = 1 << 20  # values whose window bins are counted by one bincount (4 MiB of int32 bins a stream)


def kth_largest_many(chunks: Callable[[], Iterable[Sequence[Tensor]]],
                     ranks: Sequence[int | None],
                     sizes: Sequence[int | None] | None = None) -> list[tuple[float, int] | None]:
    """For S streams at once: the ``ranks[s]``-th largest (1-based) non-negative float32 value
    of stream s and how many values are strictly greater; ``None`` ranks are skipped.

    ``chunks()`` (called once, twice or three times: streaming passes) yields, per step, one
    chunk of every stream (``None`` for a skipped stream).  Non-negative IEEE floats order
    like their bit patterns read as integers, so a 65,536-bin histogram of the high 16 bits
    finds the bucket of the value, and a histogram of the low 16 bits of the values in that
    bucket the value itself; the result is exact.  A rank of 0 or larger than the stream's
    length is an error.

    ``sizes[s]`` (the stream's length, optional) makes it usually ONE pass: the first chunk's
    high-bit histogram places a window of ``2·WINDOW + 1`` high buckets around the bucket it
    puts at the same relative rank, and every value is then counted in one histogram of the
    window's bit patterns, with one bin for all values below it and one for all above
    (:func:`_window_pass`).  When the value falls inside the window, that histogram holds it;
    otherwise (the first chunk misled the estimate) the stream takes the two passes above.
    Without ``sizes``, two passes.  Exact either way.
    """
    S = len(ranks)
    live = [s for s in range(S) if ranks[s] is not None]
    out: list[tuple[float, int] | None] = [None] * S
    again = live
    if sizes is not None:
        again = _window_pass(chunks, ranks, sizes, live, out)
    if again:
        _two_passes(chunks, ranks, again, out)
    return out


def _window_pass(chunks, ranks, sizes, live: list[int], out: list) -> list[int]:
    """The one-pass select of :func:`kth_largest_many` for the streams ``live``; fills ``out``
    and returns the streams it could not settle (their value lies outside the window, or
    their size is unknown).  Per value: one subtraction, one clamp and one bincount into
    ``span·2^16 + 2`` bins (bin 0: below the window, the last bin: above)."""
    span = 2 * WINDOW + 1
    width = span << 16
    lo: dict[int, int] = {}          # first high bucket of the window
    acc: dict[int, Tensor] = {}      # the window's histogram, bins 1..width, on the values' device
    # the bins of values not yet counted (KEY_BATCH at most, the first ``held`` of ``keys``): a
    # bincount makes and adds a table of width + 2 bins, so it runs once per batch, not per chunk
    keys: dict[int, Tensor] = {}
    held = {s: 0 for s in live}
    n = {s: 0 for s in live}         # values seen
    todo = [s for s in live if sizes[s]]

    def count(s: int) -> None:
        if held[s]:
            acc[s] += torch.bincount(keys[s][:held[s]], minlength=width + 2)
        held[s] = 0

    for xs in chunks():
        for s in todo:
            bits = _bits(xs[s])
            if not bits.numel():
                continue
            if s not in lo:  # the first non-empty chunk places the window
                c = torch.bincount(bits >> 16, minlength=1 << 16)
                r = min(bits.numel(), max(1, round(ranks[s] / sizes[s] * bits.numel())))
                lo[s] = max(0, _bucket(c, r)[0] - WINDOW)
                acc[s] = torch.zeros(width + 2, dtype=torch.int64, device=bits.device)
                keys[s] = torch.empty(min(KEY_BATCH, sizes[s]), dtype=torch.int32, device=bits.device)
            for a in range(0, bits.numel(), keys[s].numel()):  # a chunk larger than the batch: in parts
                part = bits[a:a + keys[s].numel()]
                if held[s] + part.numel() > keys[s].numel():
                    count(s)
                k = keys[s][held[s]:held[s] + part.numel()]
                torch.sub(part, (lo[s] << 16) - 1, out=k).clamp_(0, width + 1)
                held[s] += part.numel()
            n[s] += bits.numel()
    for s in acc:
        count(s)
    keys.clear()
    again = [s for s in live if s not in acc]
    for s in acc:
        if not 1 <= ranks[s] <= n[s]:
            raise ValueError(f"rank {ranks[s]} outside 1..{n[s]}")
        above = int(acc[s][-1])
        inside = acc[s][1:-1]
        r = ranks[s] - above
        if r < 1 or r > int(inside.sum()):
            again.append(s)
            continue
        j, _ = _bucket(inside, r)
        value = struct.unpack("<f", struct.pack("<I", (lo[s] << 16) + j))[0]
        out[s] = (value, above + int(inside[j + 1:].sum()))
    return sorted(again)


def _two_passes(chunks, ranks, live: list[int], out: list) -> None:
    """The two-pass select of :func:`kth_largest_many` for the streams ``live``: the high-16-bit
    histogram, then the low 16 bits of the values in the selected high bucket."""
    hi_counts: dict[int, Tensor] = {}  # on the values' device (made by bincount)
    n = {s: 0 for s in live}
    for xs in chunks():
        for s in live:
            bits = _bits(xs[s])
            c = torch.bincount(bits >> 16, minlength=1 << 16)
            hi_counts[s] = hi_counts[s] + c if s in hi_counts else c
            n[s] += bits.numel()
    hi, rank2 = {}, {}
    for s in live:
        if not 1 <= ranks[s] <= n[s]:
            raise ValueError(f"rank {ranks[s]} outside 1..{n[s]}")
        hi[s], rank2[s] = _bucket(hi_counts[s], ranks[s])
    lo_counts = {s: torch.zeros_like(hi_counts[s]) for s in live}
    for xs in chunks():
        for s in live:
            bits = _bits(xs[s])
            sel = bits[(bits >> 16) == hi[s]]
            if sel.numel():
                lo_counts[s] += torch.bincount(sel & 0xFFFF, minlength=1 << 16)
    for s in live:
        lo, _ = _bucket(lo_counts[s], rank2[s])
        value = struct.unpack("<f", struct.pack("<I", (hi[s] << 16) | lo))[0]
        greater = int(hi_counts[s][hi[s] + 1:].sum()) + int(lo_counts[s][lo + 1:].sum())
        out[s] = (value, greater)


def kth_largest(chunks: Callable[[], Iterable[Tensor]], rank: int) -> float:
    """The ``rank``-th largest (1-based) of the non-negative float32 values yielded by ``chunks()``
    (two streaming passes; see :func:`kth_largest_many`)."""
    return kth_largest_many(lambda: ((x,) for x in chunks()), [rank])[0][0]


def _flat_chunks(x: Tensor) -> Iterator[Tensor]:
    flat = x.reshape(-1)
    for s in range(0, flat.numel(), CHUNK):
        yield flat[s:s + CHUNK]


# ------------------------------------------------------------------ trim / elect / disjoint

def trim_keep_count(n: int, density: float) -> int:
    """mergekit's number of survivors of the magnitude trim: ``max(1, ⌊density·n⌋)``
    (all for density ≥ 1, none of an empty tensor)."""
    if n == 0:
        return 0
    return n if density >= 1.0 else max(1, int(density * n))


@dataclass
class Trim:
    """One model's per-tensor TIES trim: keep ``|τ| > threshold`` and, in flat order, the first
    ``ties_left`` entries with ``|τ| == threshold`` (consumed as chunks go by); or, with
    ``tie_break: argsort``, the whole tensor's flat keep-``mask``."""

    threshold: float = 0.0
    ties_left: int = 0
    mask: Tensor | None = None


def trim_states(tau_chunks: Callable[[], Iterable[Sequence[Tensor]]], density: Sequence[float],
                tie_break: str = "index", numel: int | None = None) -> list[Trim | None]:
    """The per-tensor TIES trim of several task vectors, from streaming passes.

    ``tau_chunks()`` yields, in flat order, one chunk of every model's τ per step.  Returns
    per model ``None`` (keep all, density ≥ 1) or a :class:`Trim` keeping exactly
    ``max(1, ⌊density·n⌋)`` entries of largest ``|τ|`` (mergekit's count).  Which of several
    entries of equal ``|τ|`` at the threshold survive: ``index`` keeps the lowest flat indices
    (two streaming passes of radix select, memory independent of the tensor size);
    ``argsort`` keeps the first k of ``torch.argsort(|τ|, descending=True)`` over the whole
    flattened tensor, exactly as mergekit 0.1.5 does (its unstable sort's order among ties is
    that of the installed torch build; holds the whole tensor's |τ| and indices in memory).
    """
    M = len(density)
    todo = [i for i in range(M) if density[i] < 1.0]
    if not todo:
        return [None] * M
    if tie_break == "argsort":
        out: list[Trim | None] = [None] * M
        for i in todo:
            a = torch.cat([taus[i].reshape(-1).abs() for taus in tau_chunks()])
            mask = torch.zeros(a.numel(), dtype=torch.bool, device=a.device)
            mask[torch.argsort(a, descending=True)[:trim_keep_count(a.numel(), density[i])]] = True
            out[i] = Trim(mask=mask)
        return out
    n = numel
    if n is None:  # one more pass, just to count
        n = sum(taus[todo[0]].numel() for taus in tau_chunks())
    ranks = [trim_keep_count(n, density[i]) if i in todo and n else None for i in range(M)]

    def abs_chunks():
        for taus in tau_chunks():
            yield [taus[i].abs() if ranks[i] is not None else None for i in range(M)]

    found = kth_largest_many(abs_chunks, ranks, [n] * M)
    return [None if f is None else Trim(f[0], ranks[i] - f[1]) for i, f in enumerate(found)]


def trim_keep(tau: Tensor, state: Trim, start: int = 0) -> Tensor:
    """The keep-mask of one flat chunk of τ starting at flat index ``start``; with a threshold,
    chunks must come in flat order (the state counts the ties still to keep)."""
    if state.mask is not None:
        return state.mask[start:start + tau.numel()]
    a = tau.abs()
    keep = a > state.threshold
    if state.ties_left > 0:
        # the first ties_left entries equal to the threshold, in flat order: a count per chunk,
        # and a cumulative sum only in the chunk where the ties to keep run out, instead of a
        # nonzero() per chunk (benchmarks/method_kernels.py)
        tie = a == state.threshold
        cnt = int(tie.sum())
        if cnt > state.ties_left:
            tie &= tie.cumsum(0) <= state.ties_left
            cnt = state.ties_left
        keep |= tie
        state.ties_left -= cnt
    return keep


def trim_mask(tau: Tensor, density: float, tie_break: str = "index") -> Tensor:
    """mergekit's per-tensor magnitude trim of one tensor as a bool mask (see :func:`trim_states`)."""
    (st,) = trim_states(lambda: ((c,) for c in _flat_chunks(tau)), [density], tie_break)
    if st is None:
        return torch.ones_like(tau, dtype=torch.bool)
    mask = torch.empty(tau.numel(), dtype=torch.bool, device=tau.device)
    for s, c in zip(range(0, tau.numel(), CHUNK), _flat_chunks(tau)):
        mask[s:s + c.numel()] = trim_keep(c, st, s)
    return mask.reshape(tau.shape)


def global_rank(n_total: int, density: float) -> int | None:
    """The rank (1-based, from the top) of the paper's global threshold, or None to keep all.

    The TIES reference keeps ``|τ| ≥ kthvalue(|τ|, n − ⌊n·k⌋)`` (k-th smallest), i.e. the
    ``(⌊n·k⌋ + 1)``-th largest magnitude of the whole flattened model, ties included."""
    keep = int(n_total * density)
    if keep >= n_total:
        return None
    return keep + 1


def elect_sign(weighted: Sequence[Tensor], majority: str = "mass", zero_sign: float = 1.0) -> Tensor:
    """TIES sign election over the (weighted, trimmed) task vectors of one chunk.

    ``mass``: γ = sign(Σ_t τ_t); ``frequency``: γ = sign(Σ_t sign τ_t).  Entries whose sum is
    exactly 0 take ``zero_sign`` (+1 in mergekit; the paper uses the sign of the whole
    model's sum of elected signs, 0 leaves them unmerged)."""
    if majority == "mass":
        # the same sums, in the same order, as stack(...).sum(0); the first one makes the buffer
        s = torch.add(weighted[0], weighted[1]) if len(weighted) > 1 else weighted[0].clone()
        for x in weighted[2:]:
            s += x
    elif majority == "frequency":
        s = torch.zeros_like(weighted[0])
        for x in weighted:
            s += torch.sign(x)
    else:
        raise MergelabError(f"majority must be 'mass' or 'frequency', found {majority!r}")
    gamma = s.sign_()
    if zero_sign != 0.0:
        gamma.add_(gamma == 0, alpha=zero_sign)  # 0 -> zero_sign
    return gamma


def disjoint_merge(weighted: Sequence[Tensor], weights: Sequence[float], gamma: Tensor,
                   normalize: bool) -> Tensor:
    """Sum of the non-zero weighted entries whose sign equals γ; with ``normalize`` divided by
    the sum of the weights of those entries (1 where none agree), i.e. the disjoint mean."""
    num = torch.zeros_like(gamma)
    den = torch.zeros_like(gamma) if normalize else None
    for w, x in zip(weights, weighted):
        keep = torch.mul(x, gamma).gt_(0)  # 1.0 where non-zero and of the elected sign, else 0.0
        num.addcmul_(x, keep)
        if den is not None:
            den.add_(keep, alpha=w)
    if den is not None:
        den.add_(den == 0)  # 0 -> 1
        num /= den
    return num


# ------------------------------------------------------------------ DARE mask

def _chunk_seed(seed: int, chunk: int) -> int:
    return derive_seed(seed, int(chunk))


def dare_keep(start: int, stop: int, density: float, seed: int, device: torch.device | str | None = None,
              total: int | None = None) -> Tensor:
    """DARE's Bernoulli(density) keep-mask of the flat entries ``start:stop`` of a tensor, on ``device``.

    Entry j is kept when the ``(j mod 2^16)``-th draw of a CPU ``torch.Generator`` (Mersenne
    twister) seeded with ``derive_seed(seed, j // 2^16)`` is below ``density``: the mask of an
    entry does not depend on how the tensor is cut into blocks, nor on the device: the draws
    are always made on the CPU and the mask is moved to ``device`` (CUDA's Philox generator
    gives other numbers for the same seed, so drawing there would make GPU merges differ from
    CPU ones).  ``seed`` is :func:`tensor_seed` (``ctx.seed``, tensor name, model index).

    ``total`` (the whole tensor's number of entries, optional) lets a call on a row block
    draw its whole chunk once (up to the tensor's end) and keep its mask in a small cache
    (:data:`_KEEP_CACHE`) for the other blocks of the same chunk: the generator cannot skip
    ahead, so without it the k-th block of a chunk redraws the k - 1 blocks before it.  The
    values are the same either way.
    """
    if total is None:
        keep = uniforms(start, stop, seed) < density
    else:
        keep = chunk_draws(start, stop, total, seed, _KEEP_CACHE, (density,),
                           lambda lo, hi: uniforms(lo, hi, seed) < density, torch.bool)
    return keep if device is None else keep.to(device)


def chunk_draws(start: int, stop: int, total: int, seed: int, cache: "_ChunkCache", extra: tuple,
                draw: Callable[[int, int], Tensor], dtype: torch.dtype) -> Tensor:
    """``draw(start, stop)`` (a function of each entry's own draw, see :func:`uniforms`) for the
    flat entries ``start:stop`` of a tensor of ``total`` entries, on the CPU, drawing each
    2^16-entry chunk that the range only partly covers once, up to the tensor's end, and
    keeping it in ``cache`` (key: seed, chunk, length, ``extra``) for the other row blocks of
    the chunk: the generator cannot skip ahead, so without it the k-th block of a chunk redraws
    the k - 1 blocks before it (2.5 times the draws for four blocks).  Same values either way."""
    out = torch.empty(max(0, stop - start), dtype=dtype, device="cpu")
    pos = start
    while pos < stop:
        c = pos // DRAW_CHUNK
        end = min((c + 1) * DRAW_CHUNK, total)
        hi = min(stop, end)
        if pos == c * DRAW_CHUNK and hi == end:  # the whole chunk: nothing to share
            out[pos - start:hi - start] = draw(pos, hi)
        else:
            whole = cache.get((seed, c, end - c * DRAW_CHUNK) + extra, lambda: draw(c * DRAW_CHUNK, end))
            out[pos - start:hi - start] = whole[pos - c * DRAW_CHUNK:hi - c * DRAW_CHUNK]
        pos = hi
    return out


class _ChunkCache:
    """A small thread-safe LRU cache of whole-chunk draws (at most ``size`` entries): the row
    blocks of one chunk are merged by neighbouring jobs, often at the same time on two worker
    threads, so a chunk being drawn is waited for, not drawn again (two threads racing for
    each chunk's draws doubled them: 44% of a 1.1B dare_ties merge's CPU went to ``uniforms``)."""

    def __init__(self, size: int = 8):
        self.size = size
        self.lock = threading.Lock()
        self.items: OrderedDict[tuple, Tensor] = OrderedDict()
        self.drawing: dict[tuple, Future] = {}

    def get(self, key: tuple, make: Callable[[], Tensor]) -> Tensor:
        with self.lock:
            m = self.items.get(key)
            if m is not None:
                self.items.move_to_end(key)
                return m
            fut = self.drawing.get(key)
            mine = fut is None
            if mine:
                fut = self.drawing[key] = Future()
        if not mine:
            return fut.result()  # another thread draws it (its error is raised here too)
        try:
            m = make()  # outside the lock: different chunks draw in parallel
        except BaseException as e:
            with self.lock:
                del self.drawing[key]
            fut.set_exception(e)
            raise
        with self.lock:
            del self.drawing[key]
            self.items[key] = m
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        fut.set_result(m)
        return m


_KEEP_CACHE = _ChunkCache(16)     # DARE keep-masks: bool, 64 KiB each
UNIFORM_CACHE = _ChunkCache(16)   # DELLA's uniforms: float32, 256 KiB each


def uniforms(start: int, stop: int, seed: int, device=None) -> Tensor:
    """Uniform [0, 1) draws for the flat entries ``start:stop`` of a tensor: entry j takes the
    ``(j mod 2^16)``-th draw of a CPU generator seeded with ``(seed, j // 2^16)``, so an entry's
    draw does not depend on how the tensor is cut into blocks, nor on the device (DARE's and
    DELLA's randomness)."""
    out = torch.empty(max(0, stop - start), dtype=torch.float32, device="cpu")
    g = torch.Generator(device="cpu")
    pos = start
    while pos < stop:
        c = pos // DRAW_CHUNK
        lo, hi = pos - c * DRAW_CHUNK, min(stop - c * DRAW_CHUNK, DRAW_CHUNK)
        g.manual_seed(_chunk_seed(seed, c))
        out[pos - start:pos - start + hi - lo] = torch.rand(hi, generator=g, device="cpu")[lo:]
        pos = c * DRAW_CHUNK + hi
    return out if device is None else out.to(device)


# ------------------------------------------------------------------ the shared core

def _resolve_normalize(normalize: bool, merge: str) -> bool:
    return {"auto": normalize, "mean": True, "sum": False}[merge]


def sparse_task_merge(tensors: list[Tensor], base: Tensor, *, weight: list[float], density: list[float],
                      sparsify: str, consensus: bool, normalize: bool, majority: str = "mass",
                      rescale: bool = True, thresholds: Sequence[float] | None = None,
                      zero_sign: float = 1.0, name: str = "", seed: int = 0,
                      trim: list | None = None, offset: int = 0, tie_break: str = "index",
                      total_numel: int | None = None) -> Tensor:
    """The merged task vector ``τ_m`` of the generalized task-arithmetic family.

    ``sparsify``: ``"magnitude"`` (TIES trim; per tensor unless ``thresholds`` gives each
    model's global magnitude threshold), ``"random"`` (DARE) or ``"none"``.  Then the
    trimmed deltas are multiplied by their weights; with ``consensus`` the signs are elected
    and only agreeing entries are merged (:func:`disjoint_merge`), otherwise all are summed
    (divided by Σw when ``normalize``, as in mergekit).

    Called on a block of a bigger tensor: ``trim`` is the tensor's :func:`trim_states`
    (consumed in flat order), ``offset`` the block's first flat index and ``total_numel`` the
    whole tensor's number of entries (DARE's masks; see :func:`dare_keep`).
    """
    n_models = len(tensors)
    numel = base.numel()
    flat_base = base.reshape(-1)
    flat = [t.reshape(-1) for t in tensors]
    trim_at = offset  # flat index of this call's first entry in the trim's frame
    if sparsify == "magnitude" and thresholds is None and trim is None:
        trim_at = 0
        trim = trim_states(lambda: ([f[s:s + CHUNK] - flat_base[s:s + CHUNK] for f in flat]
                                    for s in range(0, numel, CHUNK)), density, tie_break, numel)
    dare_seeds = [tensor_seed(seed, name, i) if sparsify == "random" and density[i] < 1.0 else None
                  for i in range(n_models)]

    parts = []  # one chunk's result per CHUNK entries (a row block of the engine is one chunk)
    total = math.fsum(weight)
    for s in range(0, numel, CHUNK):
        e = min(s + CHUNK, numel)
        b = flat_base[s:e]
        weighted = []
        for i in range(n_models):
            tau = torch.sub(flat[i][s:e], b)  # a fresh temporary: masked and scaled in place
            if trim is not None and trim[i] is not None:
                tau.mul_(trim_keep(tau, trim[i], trim_at + s))  # (mul by a bool mask: 4x faster than masked_fill_)
            elif thresholds is not None and thresholds[i] is not None:
                tau.mul_(tau.abs() >= thresholds[i])
            elif dare_seeds[i] is not None:
                tau.mul_(dare_keep(offset + s, offset + e, density[i], dare_seeds[i], tau.device,
                                   total=total_numel))
                if rescale:
                    tau.div_(density[i])
            if weight[i] != 1.0:
                tau.mul_(weight[i])
            weighted.append(tau)
        if consensus:
            gamma = elect_sign(weighted, majority, zero_sign)
            parts.append(disjoint_merge(weighted, weight, gamma, normalize))
        else:
            acc = weighted[0]  # a fresh temporary (above): summed into in place
            for x in weighted[1:]:
                acc += x
            if normalize and abs(total) >= 1e-8 and total != 1.0:
                acc /= total
            parts.append(acc)
    if not parts:
        return torch.empty_like(base, dtype=torch.float32)
    # float32 whatever the inputs' dtype (a no-op for the engine's float32 blocks)
    return (parts[0] if len(parts) == 1 else torch.cat(parts)).reshape(base.shape).to(torch.float32)


def _finish(base: Tensor, tau: Tensor, lam: float) -> Tensor:
    """``θ_0 + λ τ`` in place of ``τ`` (a fresh tensor of sparse_task_merge)."""
    if lam == 0.0:
        return base.clone()
    if lam != 1.0:
        tau.mul_(lam)
    return tau.add_(base)  # a + b == b + a exactly


# ------------------------------------------------------------------ TIES

def _stream_passes(stream):
    """A zero-argument callable that restarts ``stream`` (engine streams are re-iterable).
    A one-shot iterator is materialised once (memory grows with the model; warned)."""
    if iter(stream) is stream:
        warnings.warn("prepass got a one-shot iterator; holding every tensor in memory for the"
                      " extra passes (give a re-iterable stream to keep memory bounded)")
        items = list(stream)
        return lambda: iter(items)
    return lambda: iter(stream)


def global_ties_prepass(params: dict, stream) -> dict | None:
    """Prepass for ``scope: global`` (the TIES paper's top-k over the whole flattened model).

    Streams the model three times with bounded memory: two passes of radix select give each
    model's exact magnitude threshold (:func:`global_rank`), a third sums the elected signs
    over the whole model, whose sign resolves entries whose delta sum is exactly 0 (the
    reference ``resolve_zero_signs``).  Returns ``{"thresholds": [...], "zero_sign": ±1|0}``.
    For ``scope: per_tensor`` it returns None without reading anything.
    """
    if params.get("scope", "per_tensor") != "global":
        return None
    passes = _stream_passes(stream)
    density = params["density"]
    n_models = len(density)
    n_total = None
    thresholds: list[float | None] = []
    for i in range(n_models):
        if n_total is None:
            n_total = sum(base.numel() for _ctx, base, _ts in passes())
        rank = global_rank(n_total, density[i])
        if rank is None:
            thresholds.append(None)
            continue

        def chunks(i=i):
            for _ctx, base, ts in passes():
                d = ts[i] - base
                yield from (c.abs() for c in _flat_chunks(d))

        thresholds.append(kth_largest(chunks, rank))
    weight = params.get("weight", [1.0] * n_models)
    majority = params.get("majority", "mass")
    sign_sum = 0.0
    for _ctx, base, ts in passes():
        for s in range(0, base.numel(), CHUNK):
            b = base.reshape(-1)[s:s + CHUNK]
            weighted = []
            for i, t in enumerate(ts):
                tau = t.reshape(-1)[s:s + CHUNK] - b
                if thresholds[i] is not None:
                    tau = torch.where(tau.abs() >= thresholds[i], tau, 0.0)
                weighted.append(tau * weight[i])
            sign_sum += float(elect_sign(weighted, majority, zero_sign=0.0).sum(dtype=torch.float64))
    zero_sign = 1.0 if sign_sum > 0 else -1.0 if sign_sum < 0 else 0.0
    return {"thresholds": thresholds, "zero_sign": zero_sign}


def _global_state(ctx: TensorContext, method: str) -> dict:
    if not isinstance(ctx.prepass, dict) or "thresholds" not in ctx.prepass:
        raise MergelabError(f"{ctx.name}: method '{method}' with scope: global needs its prepass"
                            " (the engine runs it; call the prepass yourself when calling the function directly)")
    return ctx.prepass


def ties_tensor_prepass(params: dict, blocks) -> list | None:
    """Per-tensor state of ``scope: per_tensor``: each model's trim threshold over the whole
    tensor (:func:`trim_states`), from a stream of row blocks; None for ``scope: global``."""
    if params.get("scope", "per_tensor") == "global":
        return None

    numel = []

    def taus():
        for ctx, base, ts in blocks():
            if not numel:
                numel.append(ctx.numel if ctx.numel is not None else None)
            fb = base.reshape(-1)
            for s in range(0, fb.numel(), CHUNK):
                yield [t.reshape(-1)[s:s + CHUNK] - fb[s:s + CHUNK] for t in ts]

    if all(d >= 1.0 for d in params["density"]):
        return [None] * len(params["density"])  # keep all (None would mean "not computed")
    next(iter(taus()), None)  # reads one block only: the whole tensor's size from its ctx
    return trim_states(taus, params["density"], params.get("tie_break", "index"), numel[0] if numel else None)


@merge_method("ties", needs_base=True, prepass=global_ties_prepass, elementwise=True,
              tensor_prepass=ties_tensor_prepass)
def ties(tensors: list[Tensor], base: Tensor, *, ctx: TensorContext,
         weight: list[float] = 1.0, density: Density = 1.0, lambda_: float = 1.0,
         normalize: bool = True, majority: Literal["mass", "frequency"] = "mass",
         scope: Literal["per_tensor", "global"] = "per_tensor",
         merge: Literal["auto", "mean", "sum"] = "auto", int8_mask: bool = False,
         tie_break: Literal["index", "argsort"] = "index") -> Tensor:
    """TIES-merging: trim each task vector to its top-``density`` magnitudes, elect a sign per
    entry, merge the agreeing entries, ``θ_0 + λ·τ_m``.

    ``scope: per_tensor`` (mergekit): ⌊density·n⌋ entries kept per tensor; a zero sign sum
    elects +.  ``scope: global`` (paper): one threshold per model over the whole model from
    the prepass, ties kept; a zero sign sum takes the whole model's majority sign.
    ``merge``: ``mean`` (dis-mean: divided by the weights of the agreeing entries), ``sum``
    (dis-sum), ``auto`` follows ``normalize`` (mergekit's key).
    ``tie_break`` (per_tensor): which entries of equal ``|τ|`` at the trim threshold survive:
    ``index`` the lowest flat indices (streamed, bounded memory), ``argsort`` mergekit's exact
    choice (``torch.argsort`` over the whole tensor; see :func:`trim_states`).
    """
    thresholds, zero_sign = None, 1.0
    if scope == "global":
        st = _global_state(ctx, "ties")
        thresholds, zero_sign = st["thresholds"], st["zero_sign"]
    tau = sparse_task_merge(tensors, base, weight=weight, density=density, sparsify="magnitude",
                            consensus=True, normalize=_resolve_normalize(normalize, merge),
                            majority=majority, thresholds=thresholds, zero_sign=zero_sign,
                            trim=ctx.tensor_state if scope != "global" else None,
                            offset=ctx.offset, tie_break=tie_break)
    return _finish(base, tau, lambda_)


# ------------------------------------------------------------------ DARE

@merge_method("dare_linear", needs_base=True, elementwise=True)
def dare_linear(tensors: list[Tensor], base: Tensor, *, ctx: TensorContext,
                weight: list[float] = 1.0, density: Density = 1.0, lambda_: float = 1.0,
                rescale: bool = True, normalize: bool = False, int8_mask: bool = False) -> Tensor:
    """DARE then task arithmetic: each delta entry is kept with probability ``density``
    (drop rate p = 1 − density) and, with ``rescale``, divided by ``density``; then
    ``θ_0 + λ Σ w_i τ̃_i`` (÷ Σw with ``normalize``).  The mask is seeded by the recipe seed,
    the tensor name and the model index: same inputs, same bytes."""
    tau = sparse_task_merge(tensors, base, weight=weight, density=density, sparsify="random",
                            consensus=False, normalize=normalize, rescale=rescale,
                            name=ctx.name, seed=ctx.seed, offset=ctx.offset,
                            total_numel=ctx.numel if ctx.numel is not None else base.numel())
    return _finish(base, tau, lambda_)


@merge_method("dare_ties", needs_base=True, elementwise=True)
def dare_ties(tensors: list[Tensor], base: Tensor, *, ctx: TensorContext,
              weight: list[float] = 1.0, density: Density = 1.0, lambda_: float = 1.0,
              rescale: bool = True, normalize: bool = False,
              majority: Literal["mass", "frequency"] = "mass", int8_mask: bool = False) -> Tensor:
    """DARE then TIES sign election and disjoint merge (mergekit's ``dare_ties``: normalize
    defaults to false, a zero sign sum elects +)."""
    tau = sparse_task_merge(tensors, base, weight=weight, density=density, sparsify="random",
                            consensus=True, normalize=normalize, rescale=rescale, majority=majority,
                            name=ctx.name, seed=ctx.seed, offset=ctx.offset,
                            total_numel=ctx.numel if ctx.numel is not None else base.numel())
    return _finish(base, tau, lambda_)


# ------------------------------------------------------------------ TALL masks and consensus

def multitask_vector(tensors: list[Tensor], base: Tensor, base_merge: str, density: list[float],
                     merge: str, ctx: TensorContext) -> Tensor:
    """τ_MTL: the unscaled task-arithmetic sum Σ τ_t, or TIES (dis-``merge``, per tensor or,
    when the prepass ran, global scope).  On a row block, the per-tensor trim is
    ``ctx.tensor_state`` (:func:`_tall_tensor_prepass`) and the block starts at ``ctx.offset``."""
    n = len(tensors)
    if base_merge == "task_arithmetic":
        return weighted_task_sum(tensors, base, [1.0] * n, normalize=False)
    thresholds, zero_sign = None, 1.0
    if isinstance(ctx.prepass, dict) and "thresholds" in ctx.prepass:
        thresholds, zero_sign = ctx.prepass["thresholds"], ctx.prepass["zero_sign"]
    return sparse_task_merge(tensors, base, weight=[1.0] * n, density=density, sparsify="magnitude",
                             consensus=True, normalize=(merge == "mean"), thresholds=thresholds,
                             zero_sign=zero_sign, trim=ctx.tensor_state if thresholds is None else None,
                             offset=ctx.offset)


def tall_mask(tau_t: Tensor, tau_mtl: Tensor, lam: float) -> Tensor:
    """TALL mask of one task: ``|τ_t| ≥ λ_t·|τ_MTL − τ_t|`` (tact-merge's ≥)."""
    return tau_t.abs() >= lam * (tau_mtl - tau_t).abs()


def _tall_prepass(params: dict, stream):
    if params.get("base_merge") == "ties":
        return global_ties_prepass(params, stream)
    return None


def _tall_tensor_prepass(params: dict, blocks):
    """The per-tensor TIES trim of τ_MTL (``base_merge: ties``, ``scope: per_tensor``) over the
    row blocks; None otherwise.  With it, TALL masks and consensus are elementwise: each mask
    entry needs the entry of τ_MTL and of each τ_t only."""
    if params.get("base_merge") != "ties":
        return None
    return ties_tensor_prepass(params, blocks)


def _variant_names(ctx: TensorContext, n: int) -> list[str]:
    # the last path component of each model name (the engine writes one folder per variant)
    names = [str(x).replace("\\", "/").rstrip("/").rsplit("/", 1)[-1] for x in ctx.model_names]
    if len(names) != n or len(set(names)) != n or not all(names):
        names = [str(i) for i in range(n)]
    return names


@merge_method("tall_masks", needs_base=True, multi_output=True, prepass=_tall_prepass, elementwise=True,
              tensor_prepass=_tall_tensor_prepass)
def tall_masks(tensors: list[Tensor], base: Tensor, *, ctx: TensorContext,
               lambda_: list[float] = 1.0,
               base_merge: Literal["task_arithmetic", "ties"] = "task_arithmetic",
               density: Density = 1.0, merge: Literal["sum", "mean"] = "sum",
               scope: Literal["per_tensor", "global"] = "per_tensor",
               output: Literal["models", "masks"] = "models") -> dict[str, Tensor]:
    """TALL masks: τ_MTL from ``base_merge``; per task t the mask
    ``m_t = |τ_t| ≥ λ_t |τ_MTL − τ_t|``; ``output: models`` gives one model per task,
    ``θ_0 + m_t ⊙ τ_MTL``; ``output: masks`` the boolean masks.  Variants are named after the
    models (``ctx.model_names``) or their indices."""
    tau_mtl = multitask_vector(tensors, base, base_merge, density, merge, ctx)
    out = {}
    fb, fm = base.reshape(-1), tau_mtl.reshape(-1)
    for name, lam, t in zip(_variant_names(ctx, len(tensors)), lambda_, tensors):
        res = torch.empty_like(base, dtype=torch.bool if output == "masks" else base.dtype)
        fr, ft = res.view(-1), t.reshape(-1)
        for a in range(0, fb.numel(), CHUNK):  # elementwise, by chunks: no whole-size temporaries
            b = a + CHUNK
            m = tall_mask(ft[a:b] - fb[a:b], fm[a:b], lam)
            fr[a:b] = m if output == "masks" else fb[a:b] + torch.where(m, fm[a:b], 0.0)
        out[name] = res
    return out


@merge_method("consensus", needs_base=True, prepass=_tall_prepass, elementwise=True,
              tensor_prepass=_tall_tensor_prepass)
def consensus(tensors: list[Tensor], base: Tensor, *, ctx: TensorContext,
              k: Annotated[int, Range(0, None)] = 2, alpha: float = 1.0,
              lambda_: list[float] = 1.0,
              base_merge: Literal["task_arithmetic", "ties"] = "task_arithmetic",
              density: Density = 1.0, merge: Literal["sum", "mean"] = "sum",
              scope: Literal["per_tensor", "global"] = "per_tensor") -> Tensor:
    """Consensus merging: count the TALL masks ``c = Σ_t m_t`` and keep the entries active in
    at least ``k`` tasks: ``θ_0 + α·1{c ≥ k} ⊙ τ_MTL``."""
    tau_mtl = multitask_vector(tensors, base, base_merge, density, merge, ctx)
    fb, fm = base.reshape(-1), tau_mtl.reshape(-1)
    for a in range(0, fb.numel(), CHUNK):  # elementwise, by chunks, in place of τ_MTL
        b = a + CHUNK
        count = torch.zeros_like(fb[a:b], dtype=torch.int32)
        for lam, t in zip(lambda_, tensors):
            count += tall_mask(t.reshape(-1)[a:b] - fb[a:b], fm[a:b], lam)
        fm[a:b] = torch.where(count >= k, fm[a:b], 0.0)
    return _finish(base, tau_mtl, alpha)
