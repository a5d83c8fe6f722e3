"""The diagonal Fisher of a decoder-only causal LM, one decoder layer at a time.

For a model larger than memory.  The objective and its normalisation are those of the
whole-model pass (:mod:`mergelab.stats.causal`, :func:`mergelab.stats.diagonal_fisher`): per
sequence the teacher-forced log-likelihood ``Σ_t m_t log p(y_t | x_≤t)`` (``empirical``: ``y_t``
the observed next token; ``sampled``: drawn from the model with the generator seeded by
``(seed, batch index)``), its gradient squared per sequence, summed over sequences and divided
by their number.  Only the stages change:

1. **embeddings** (no grad): the model's own forward runs on each batch with every decoder
   layer replaced by a recorder (:mod:`mergelab.stats.layered`), which keeps layer 0's input
   hidden states and every layer's arguments (the model's causal mask with padding, rotary
   position embeddings);
2. **layers forward** (no grad): layer ``l`` alone is read from the checkpoint, every batch's
   hidden states go through it, its outputs are kept as the next boundary;
3. **head**: the final norm and the LM head run through the ``*ForCausalLM``'s own forward
   (so a model's logit scaling or soft-capping is applied as in the whole-model pass), the
   log-likelihood's gradient is taken with respect to the head's parameters (per sequence) and
   to the last boundary;
4. **layers backward**, ``l = L-1 … 0``: layer ``l`` is read again, its forward recomputed from
   the saved boundary with grad enabled, the incoming gradient back-propagated to its
   parameters (per sequence) and to its input, which is passed down;
5. **embeddings backward**: the embedding forward is recomputed and the gradient of layer 0's
   input back-propagated to the embedding matrix.

Per-sequence gradients come from the hooks backend (:mod:`mergelab.stats.persample`): Linear and
Embedding in closed form, any other leaf module (the models' own RMSNorm classes) by ``vmap``
over that module alone; they are formed ``chunk_size`` sequences at a time.  A parameter used in
two stages (a tied LM head is the embedding matrix) gets its per-sequence gradients summed
before squaring: the head stage adds ``Σ_n G_n²`` (dense) and keeps ``G_n`` on the rows of the
tokens sequence ``n`` contains; the embedding stage, whose gradient ``E_n`` lives on those rows
only, adds ``(E_n + G_n)² − G_n²`` there.

**Every batch goes through one stage before the next** (the layer is read twice in all, not
twice per batch).  Boundaries (``B × T × hidden`` float per batch and layer), gradients and
layer arguments are spilled to a temporary folder (``spill_dir``, default the system's) and
read back memory-mapped; a boundary is deleted as soon as the backward no longer needs it, and
each finished layer's Fisher is written there and mapped, so the resident memory is one
layer's weights, its float64 sums, one batch's activations and ``chunk_size`` per-sequence
gradients of its largest tensor (the vocabulary-sized sums of a tied embedding matrix are
kept from the head stage to the last).  Disk: ``(L + 1) × tokens × hidden × 4`` bytes at most.
"""
from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterable

import torch
from torch import Tensor, nn

from ..errors import MergelabError
from ..progress import progress as progress_bar
from . import causal, distributed, persample
from .batch import batch_len, logits_of, split_batch, take
from .fisher import MODES, Fisher
from .layered import _Loader, _parts, _release, record_layers, skeleton

LAYERED_MODES = ("empirical", "sampled")
BLOCK = 1 << 23        # floats of per-sequence Linear weight gradients formed at once (32 MiB)


class _Spill:
    """The pass's tensors on disk, one file per key, read back memory-mapped."""

    def __init__(self, folder: str | Path | None):
        if folder is not None and not Path(folder).is_dir():
            raise MergelabError(f"fisher --layered: spill folder '{folder}' is not an existing "
                                f"folder")
        self.dir = Path(tempfile.mkdtemp(prefix="mergelab-fisher-", dir=folder))

    def _p(self, key: str) -> Path:
        return self.dir / f"{key}.pt"

    def put(self, key: str, obj: Any) -> None:
        torch.save(obj, self._p(key))

    def get(self, key: str) -> Any:
        return torch.load(self._p(key), mmap=True, weights_only=False)

    def drop(self, key: str) -> None:
        self._p(key).unlink(missing_ok=True)

    def close(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


class _HeadStub(nn.Module):
    """Stands in for the base model in the head stage: returns ``norm(h)`` as the base's last
    hidden state, so the ``*ForCausalLM``'s own forward applies the LM head."""

    def __init__(self, norm: nn.Module):
        super().__init__()
        self.norm, self.h = norm, None

    def forward(self, *args, **kwargs):
        from transformers.modeling_outputs import BaseModelOutputWithPast
        return BaseModelOutputWithPast(last_hidden_state=self.norm(self.h))


def _backward(out: Tensor, grad_out: Tensor | None, calls, extra: list[Tensor],
              parts: list[_Part], check: bool, chunk: int) -> tuple[list, list]:
    """Gradients of ``<out, grad_out>`` (or of the scalar ``out``) with respect to the recorded
    module outputs and ``extra``; with ``check``, also with respect to the stage's parameters,
    and the hooks' per-sequence gradients are checked against them."""
    params = [p for part in parts for p in part.sub.parameters()] if check else []
    got = torch.autograd.grad(out, [c.output for c in calls] + extra + params,
                              grad_outputs=grad_out, allow_unused=True)
    n = len(calls)
    grads, rest = list(got[:n]), list(got[n:n + len(extra)])
    if check:
        ref = {id(p): g for p, g in zip(params, got[n + len(extra):])}
        b = calls[0].input.shape[0] if calls else 0
        for part in parts:
            part.check(calls, grads, b, chunk, ref)
    return grads, rest


@contextlib.contextmanager
def _grad_on(parts: list[_Part], on: bool):
    ps = [p for part in parts for p in part.sub.parameters()] if on else []
    for p in ps:
        p.requires_grad_(True)
    try:
        yield
    finally:
        for p in ps:
            p.requires_grad_(False)


def _out(o: Any) -> Tensor:
    return o[0] if isinstance(o, (tuple, list)) else o


class _Part:
    """Per-sequence squared gradients of one stage module's parameters (hooks backend).
    Parameters named in ``tied`` (global names) are hooked but not summed here (see
    :func:`_tied_squares`)."""

    def __init__(self, where: str, sub: nn.Module, glob: dict[str, str], tied: set[str] = frozenset()):
        local = [k for k, _ in sub.named_parameters()]
        self.where, self.sub = where, sub
        self.glob = glob                     # local name -> the model's parameter name
        self.modules, why = persample.plan(sub, local, generic=True)
        if why is not None:
            raise MergelabError(f"fisher --layered: {where}: {why}")
        own = [k for k in local if glob[k] not in tied]
        self.tied = [k for k in local if glob[k] in tied]
        self.acc = persample.Accumulator(sub, own, block=BLOCK)
        self.tied_acc = persample.Accumulator(sub, self.tied) if self.tied else None
        shapes = dict(sub.named_parameters())
        self.sums = {k: torch.zeros(shapes[k].shape, dtype=torch.float64) for k in own}

    def add(self, calls, grads, b: int, chunk: int) -> None:
        """``sums += Σ_n g_n²`` over the batch, ``chunk`` sequences' gradients at a time."""
        for s in range(0, b, chunk):
            sl = slice(s, min(b, s + chunk))
            cs = [persample.Call(c.module, c.input[sl], c.output) for c in calls]
            gs = [None if g is None else g[sl] for g in grads]
            try:
                self.acc.add_squares(self.sums, cs, gs, sl.stop - sl.start)
            except persample.Unsupported as e:
                raise MergelabError(f"fisher --layered: {e}") from None

    def check(self, calls, grads, b: int, chunk: int, ref: dict[int, Tensor | None]) -> None:
        """The per-sequence gradients summed over the batch must be autograd's batch gradient
        (``ref``: by parameter id); else a parameter is also used outside its module's forward
        and the hooks would miss part of its gradient."""
        params = dict(self.sub.named_parameters())
        for acc in (self.acc, self.tied_acc):
            if acc is None:
                continue
            tot = {k: torch.zeros(params[k].shape) for k in acc.names}     # float32: a check
            for s in range(0, b, chunk):
                sl = slice(s, min(b, s + chunk))
                cs = [persample.Call(c.module, c.input[sl], c.output) for c in calls]
                gs = [None if g is None else g[sl] for g in grads]
                for k, parts in acc.contributions(cs, gs, sl.stop - sl.start).items():
                    for c, g, a in parts:
                        if isinstance(c.module, nn.Linear) and a == "weight":   # Σ_n g_nᵀ a_n
                            tot[k].addmm_(g.reshape(-1, g.shape[-1]).t().float(),
                                          c.input.reshape(-1, c.input.shape[-1]).float())
                            continue
                        v = persample.per_example(c, g, sl.stop - sl.start, a)
                        if isinstance(v, persample.Rows):
                            tot[k].index_add_(0, v.keys % v.n_rows, v.values.float())
                        else:
                            tot[k] += v.float().sum(0)
                        del v
            for k in acc.names:
                want = ref.get(id(params[k]))
                want = torch.zeros_like(tot[k]) if want is None else want.float()
                err = float(tot[k].sub_(want).abs_().max())
                tol = 1e-4 * float(want.abs().max()) + 1e-9
                if not err <= tol:
                    raise MergelabError(
                        f"fisher --layered: {self.where}: the per-sequence gradients of "
                        f"'{self.glob[k]}' from its module's calls differ from its gradient by "
                        f"{err:.3g} (tolerance {tol:.3g}): the parameter is also used outside its "
                        f"module's forward; run the whole-model pass")


def layered_fisher(folder: str | Path, data: Iterable[Any], mode: str = "empirical",
                   n_examples: int | None = None, seed: int = 0, *, chunk_size: int = 8,
                   spill_dir: str | Path | None = None, shard: bool = True,
                   progress: bool = False) -> Fisher:
    """The diagonal Fisher of the causal LM in Hugging Face folder ``folder`` over the token
    batches of ``data`` (dicts with ``input_ids`` and ``attention_mask``), one decoder layer in
    memory at a time (see the module docstring).  Same definition, normalisation and keys as
    :func:`~mergelab.stats.diagonal_fisher` on the loaded model; ``mode`` is ``empirical`` or
    ``sampled``."""
    if mode not in MODES:
        raise MergelabError(f"fisher mode: expected one of {', '.join(MODES)}, found '{mode}'")
    if mode not in LAYERED_MODES:
        raise MergelabError(f"fisher --layered: mode '{mode}' is not streamed layer by layer (it "
                            f"needs one gradient per token and vocabulary entry); use 'sampled' "
                            f"(unbiased for it) or 'empirical'")
    if n_examples is not None and n_examples <= 0:
        raise MergelabError(f"fisher n_examples: expected a positive number, found {n_examples}")
    if chunk_size < 1:
        raise MergelabError(f"fisher chunk_size: expected a positive number, found {chunk_size}")
    model = skeleton(folder)
    prefix, base = _parts(model)
    spill = _Spill(spill_dir)
    try:
        return _run(model, prefix, base, folder, data, mode, n_examples, seed, chunk_size, spill,
                    shard, progress)
    finally:
        spill.close()
        _release()


def _run(model, prefix, base, folder, data, mode, n_examples, seed, chunk, spill, shard, progress):
    emb, norm = f"{prefix}.embed_tokens", f"{prefix}.norm"
    n_layers = len(base.layers)
    layers = [f"{prefix}.layers.{i}" for i in range(n_layers)]
    stages = [emb, *layers, norm, "lm_head"]
    by_id = {id(p): n for n, p in model.named_parameters()}          # tied: the first name
    shapes = {n: p.shape for n, p in model.named_parameters()}
    outside = [n for n in shapes if not any(n.startswith(s + ".") for s in stages)]
    if outside:
        raise MergelabError(f"fisher --layered: parameter '{outside[0]}' is outside the embeddings, "
                            f"decoder layers, final norm and LM head (the stages streamed); run "
                            f"the whole-model pass")
    glob = {s: {k: by_id[id(p)] for k, p in model.get_submodule(s).named_parameters()}
            for s in stages}
    shared = set(glob[emb].values()) & set(glob["lm_head"].values())   # a tied LM head
    limit = causal.config_positions(model.config)
    loader = _Loader(model, folder)
    originals = list(base.layers)
    result: dict[str, Tensor] = {}
    writer = distributed.is_writer()
    bar = progress_bar(total=2 * n_layers + 3, desc=f"fisher ({mode}, layer by layer)",
                       unit="stage", disable=not progress or not writer)

    def finish(sums: dict[str, Tensor], names: dict[str, str], seen: float) -> None:
        """Reduce over ranks, normalise, and map the finished tensors from disk."""
        keep = [k for k in sums if names[k] not in shared]
        distributed.all_reduce_sum([sums[k] for k in keep])
        for k in keep:
            key = f"F_{names[k]}"
            spill.put(key, (sums[k] / seen).float())
            result[names[k]] = spill.get(key)
            del sums[k]

    # -- 1. embeddings: layer 0's input and every layer's arguments, batch by batch
    rank, world = distributed.rank_world() if shard else (0, 1)
    batches: list[tuple[int, int]] = []          # (batch index in data, sequences)
    offset, tokens = 0, 0
    with loader.loaded(emb), torch.no_grad():
        for i, batch in enumerate(data):
            if n_examples is not None and offset >= n_examples:
                break
            inputs, _, _ = split_batch(batch)
            if not isinstance(inputs, dict) or "input_ids" not in inputs:
                raise MergelabError("fisher --layered: expected token batches (dicts with input_ids)")
            b = batch_len(inputs)
            keep = b if n_examples is None else min(b, n_examples - offset)
            offset += b
            if i % world != rank:
                continue
            inputs = take(inputs, slice(0, keep))
            n = inputs["input_ids"].shape[1]
            if limit is not None and n > limit:
                raise MergelabError(f"fisher: a batch of {n} tokens is longer than the model's "
                                    f"{limit} positions (max_position_embeddings); truncate the "
                                    f"text (max_length)")
            box = record_layers(model, base, originals, inputs, n_layers - 1, "fisher --layered")
            k = len(batches)
            spill.put(f"in_{k}", inputs)
            spill.put(f"h0_{k}", box[0][0])
            spill.put(f"args_{k}", [(a, kw) for _, a, kw in box])
            tokens += int((causal.next_token_targets(inputs) != causal.IGNORE).sum())
            batches.append((i, keep))
    count = torch.tensor([float(sum(b for _, b in batches)), float(tokens)], dtype=torch.float64)
    distributed.all_reduce_sum([count])
    seen = float(count[0])
    if seen == 0:
        raise MergelabError("fisher: the data yielded no example")
    bar.update(1)

    # -- 2. layers forward: each boundary from the previous one
    for li, name in enumerate(layers):
        with loader.loaded(name) as layer, torch.no_grad():
            for k in range(len(batches)):
                a, kw = spill.get(f"args_{k}")[li]
                spill.put(f"h{li + 1}_{k}", _out(layer(spill.get(f"h{li}_{k}"), *a, **kw)))
        bar.update(1)

    # -- 3. head: the causal LM's own forward from the last boundary
    emb_sums: dict[str, Tensor] = {}
    with loader.loaded(norm) as nm, loader.loaded("lm_head") as head:
        parts = [_Part(norm, nm, glob[norm]), _Part("lm_head", head, glob["lm_head"])]
        stub = _HeadStub(nm)
        model._modules[prefix] = stub
        try:
            for k, (i, b) in enumerate(batches):
                inputs = spill.get(f"in_{k}")
                stub.h = spill.get(f"h{n_layers}_{k}").detach().requires_grad_(True)
                with torch.enable_grad(), _grad_on(parts, k == 0):
                    with persample.Recorder(parts[0].modules + parts[1].modules, b) as rec:
                        logits = logits_of(model(**inputs, use_cache=False))
                    logp = torch.log_softmax(logits.float(), -1)
                    tgt = causal.next_token_targets(inputs)
                    y = tgt if mode == "empirical" else causal.sample_targets(logits, tgt, seed, i)
                    loss = (logp * causal.target_seed(logp, y)).sum()
                    grads, (g_h,) = _backward(loss, None, rec.calls, [stub.h], parts, k == 0, chunk)
                del logits, logp, loss
                calls = rec.calls
                for p in parts:
                    p.add(calls, grads, b, chunk)
                if shared:
                    spill.put(f"rows_{k}", _head_rows(calls, grads, head, inputs["input_ids"]))
                spill.put(f"g{n_layers}_{k}", torch.zeros_like(stub.h) if g_h is None else g_h)
                spill.drop(f"h{n_layers}_{k}")
                stub.h = None
                del rec, calls, grads, g_h
        finally:
            model._modules[prefix] = base
        for p in parts:
            for k, v in p.sums.items():
                if p.glob[k] in shared:
                    emb_sums[p.glob[k]] = v
            finish(p.sums, p.glob, seen)
    bar.update(1)

    # -- 4. layers backward: recompute each layer's forward with grad, pass the gradient down
    for li in reversed(range(n_layers)):
        name = layers[li]
        with loader.loaded(name) as layer:
            part = _Part(name, layer, glob[name])
            for k, (_, b) in enumerate(batches):
                a, kw = spill.get(f"args_{k}")[li]
                h = spill.get(f"h{li}_{k}").detach().requires_grad_(True)
                g = spill.get(f"g{li + 1}_{k}")
                with torch.enable_grad(), _grad_on([part], k == 0):
                    with persample.Recorder(part.modules, b) as rec:
                        out = _out(layer(h, *a, **kw))
                    grads, (g_in,) = _backward(out, g, rec.calls, [h], [part], k == 0, chunk)
                del out
                part.add(rec.calls, grads, b, chunk)
                spill.put(f"g{li}_{k}", torch.zeros_like(h) if g_in is None else g_in)
                spill.drop(f"g{li + 1}_{k}")
                spill.drop(f"h{li}_{k}")
                del rec, grads, g_in, h, g
            finish(part.sums, part.glob, seen)
        bar.update(1)

    # -- 5. embeddings backward: recompute the embedding forward, back-propagate layer 0's input gradient
    with loader.loaded(emb) as E:
        part = _Part(emb, E, glob[emb], shared)
        for k, (_, b) in enumerate(batches):
            inputs = spill.get(f"in_{k}")
            with torch.enable_grad(), _grad_on([part], k == 0):
                with persample.Recorder(part.modules, b) as rec:
                    h0 = record_layers(model, base, originals, inputs, 0, "fisher --layered")[0][0]
                grads, _ = _backward(h0, spill.get(f"g0_{k}"), rec.calls, [], [part], k == 0, chunk)
            del h0
            if part.tied_acc is not None:
                _tied_squares(part, rec.calls, grads, b, emb_sums, spill.get(f"rows_{k}"))
            part.add(rec.calls, grads, b, chunk)
            spill.drop(f"g0_{k}")
            del rec, grads
        finish(part.sums, part.glob, seen)
    for n, v in emb_sums.items():
        distributed.all_reduce_sum([v])
        spill.put(f"F_{n}", (v / seen).float())
        result[n] = spill.get(f"F_{n}")
    emb_sums.clear()
    bar.update(1)
    bar.close()
    return Fisher({n: result[n] for n in shapes}, mode, int(seen), "hooks (layer by layer)",
                  int(count[1]))


def _head_rows(calls, grads, head: nn.Module, ids: Tensor) -> tuple[Tensor, Tensor]:
    """The tied head's per-sequence weight gradient on the rows of each sequence's tokens:
    ``(keys, rows)`` with ``key = n·V + token`` unique and ``rows[j] = Σ_t g_nt[token] a_nt``."""
    found = [(c, g) for c, g in zip(calls, grads) if c.module is head and g is not None]
    if len(found) != 1 or found[0][0].input.ndim != 3:
        raise MergelabError("fisher --layered: expected the tied LM head to be called once on "
                            "(batch, tokens, hidden) hidden states")
    c, g = found[0]
    b, t = ids.shape
    vocab = g.shape[-1]
    gi = g.float().gather(2, ids.long().unsqueeze(1).expand(b, g.shape[1], t))   # (B, T_out, T_ids)
    rows = torch.bmm(gi.transpose(1, 2), c.input.float())                       # (B, T_ids, hidden)
    keys = (torch.arange(b)[:, None] * vocab + ids.long()).reshape(-1)
    uk, first = _first_of_each(keys)
    return uk, rows.reshape(b * t, -1)[first]


def _first_of_each(keys: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted unique keys and the index of one occurrence of each."""
    uk, inv = torch.unique(keys, return_inverse=True)
    first = torch.full((len(uk),), -1, dtype=torch.long)
    first.scatter_(0, inv, torch.arange(len(keys)))
    return uk, first


def _tied_squares(part: _Part, calls, grads, b: int, emb_sums: dict[str, Tensor],
                  head_rows: tuple[Tensor, Tensor]) -> None:
    """The embedding stage's share of a tied matrix: ``Σ_n (E_n + G_n)² − G_n²`` on the rows
    ``E_n`` touches (``G_n²`` everywhere was added by the head stage)."""
    hk, hv = head_rows
    for local, parts in part.tied_acc.contributions(calls, grads, b).items():
        name = part.glob[local]
        if not parts:
            continue
        vals = [persample.per_example(c, g, b, a) for c, g, a in parts]
        if not all(isinstance(v, persample.Rows) for v in vals):
            raise MergelabError(f"fisher --layered: the tied parameter '{name}' is used by a "
                                f"module other than the embedding lookup in the embedding stage")
        keys = torch.cat([v.keys for v in vals])
        uk, inv = torch.unique(keys, return_inverse=True)
        e = torch.zeros(len(uk), vals[0].values.shape[-1], dtype=torch.float64)
        e.index_add_(0, inv, torch.cat([v.values for v in vals]).double())
        pos = torch.searchsorted(hk, uk)
        if bool((pos >= len(hk)).any()) or not torch.equal(hk[pos.clamp(max=len(hk) - 1)], uk):
            raise MergelabError(f"fisher --layered: the embedding of '{name}' looks up rows that "
                                f"are not the batch's tokens")
        gv = hv[pos].double()
        emb_sums[name].index_add_(0, uk % vals[0].n_rows, (e + gv).square() - gv.square())
