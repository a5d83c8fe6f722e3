"""Diagonal Fisher information with per-example gradients from ``torch.func``.

    F = (1/N) Σ_n E_y[(∇_θ log p_θ(y | x_n))²]

* ``mode="expected"`` (default, the Fisher-merging paper's choice): the exact expectation
  over the model's predictive distribution, Σ_y p(y|x) g_y², with all C per-class gradients of
  an example from one ``jacrev`` (C backward passes' worth of work per example);
* ``mode="sampled"``: one label per example drawn from p(y|x), with a generator seeded by
  ``(seed, batch index)``, so the draw does not depend on the number of processes;
* ``mode="empirical"``: the true labels of the batch.

Two backends compute the per-example gradients, never with a Python loop over examples:

* ``backend="vmap"``: ``vmap`` over ``grad``/``jacrev`` of a ``functional_call``, in chunks of
  ``chunk_size`` gradient rows;
* ``backend="hooks"`` (:mod:`mergelab.stats.persample`): one batched forward with hooks on the
  parameterised leaf modules (Linear, Conv1d/2d, BatchNorm, LayerNorm, GroupNorm, Embedding),
  one backward to their outputs per label choice (one for "sampled"/"empirical", one per class
  with weight ``p_c`` for "expected"), per-example gradients in closed form; ``chunk_size``
  examples per forward;
* ``backend="auto"`` (default): hooks when every requested parameter belongs to a supported leaf
  module, and, on the first batch, the hooks' per-example gradients of 2 examples agree
  with autograd's (a parameter also used outside its module's forward would not); else vmap for
  the whole pass (with a warning).

The model runs in eval mode.  Logits are ``(batch, classes)``, or, for a causal LM
(``*ForCausalLM``, see :mod:`mergelab.stats.causal`), ``(batch, tokens, vocab)``: the objective
of one sequence is its next-token log-likelihood summed over its real tokens, so the Fisher is
**summed over tokens and averaged over sequences** (``n_examples`` counts sequences,
``n_tokens`` the predicted tokens).  Other sequence outputs (masked or seq2seq LMs) are refused
on the first batch in one line.  Sums are float64; the result is float32.
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from pathlib import Path
from typing import Any, Iterable, Literal, Sequence

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, jacrev, vjp, vmap

from ..progress import progress as progress_bar

from ..device import placed, resolve_device
from ..errors import MergelabError
from ..io.outputs import save_safetensors
from . import causal, distributed, persample
from .activations import eval_no_grad
from .batch import batch_len, call_model, logits_of, model_device, split_batch, take, to_device

MODES = ("expected", "sampled", "empirical")
BACKENDS = ("auto", "hooks", "vmap")


class Fisher(dict):
    """``{parameter name: diagonal Fisher (float32, same shape)}`` with ``.mode``, ``.n_examples``
    and ``.backend`` (the backend that computed it: "hooks", "vmap", or "hooks+vmap")."""

    def __init__(self, tensors: dict[str, Tensor], mode: str, n_examples: int,
                 backend: str | None = None, n_tokens: int | None = None):
        super().__init__(tensors)
        self.mode, self.n_examples, self.backend = mode, n_examples, backend
        self.n_tokens = n_tokens          # causal LMs: predicted tokens (the Fisher sums over them)

    def save(self, path: str | Path) -> None:
        if not distributed.is_writer():
            return
        save_safetensors({k: v.cpu().contiguous() for k, v in self.items()}, path,
                         metadata={"mergelab_kind": "fisher", "mode": self.mode,
                                   "n_examples": str(self.n_examples),
                                   **({} if self.n_tokens is None else
                                      {"n_tokens": str(self.n_tokens),
                                       "normalisation": "sum over tokens, mean over sequences"})})


def sample_labels(logits: Tensor, seed: int, batch_index: int) -> Tensor:
    """Labels drawn from softmax(logits) with a generator seeded by (seed, batch index)."""
    g = torch.Generator().manual_seed(int(seed) * 1_000_003 + int(batch_index))
    probs = torch.softmax(logits.detach().double().cpu(), -1)
    return torch.multinomial(probs, 1, generator=g)[:, 0].to(logits.device)


def _unsqueeze(inputs: Any) -> Any:
    if isinstance(inputs, Tensor):
        return inputs.unsqueeze(0)
    return {k: (v.unsqueeze(0) if isinstance(v, Tensor) else v) for k, v in inputs.items()}


@contextlib.contextmanager
def _vmap_compatible(model: nn.Module):
    """Make Hugging Face models (top-level or wrapped) run under vmap for the pass.

    * Their mask builders may skip the mask after checking ``padding_mask.all()``, a
      data-dependent branch vmap rejects: for the pass, always build the mask (same result).
    * PyTorch has no vmap rule for the fused SDPA backward on CPU (it falls back to a slow
      per-example loop); "eager" attention computes the same thing with plain ops."""
    configs = []
    seen = set()
    for m in model.modules():
        c = getattr(m, "config", None)
        if c is not None and id(c) not in seen and getattr(c, "_attn_implementation", None) == "sdpa":
            seen.add(id(c))
            configs.append(c)
    mu = sys.modules.get("transformers.masking_utils")
    patched = {}
    if mu is not None:
        for name in ("_ignore_bidirectional_mask_sdpa", "_ignore_causal_mask_sdpa"):
            if hasattr(mu, name):
                patched[name] = getattr(mu, name)
                setattr(mu, name, lambda *a, **k: False)
    try:
        for c in configs:
            c._attn_implementation = "eager"
        yield
    finally:
        for c in configs:
            c._attn_implementation = "sdpa"
        for name, f in patched.items():
            setattr(mu, name, f)


def diagonal_fisher(model: nn.Module, data: Iterable[Any],
                    mode: Literal["expected", "sampled", "empirical"] = "expected",
                    n_examples: int | None = None, seed: int = 0, *,
                    params: Sequence[str] | None = None, chunk_size: int = 64,
                    shard: bool = True, progress: bool = True,
                    backend: Literal["auto", "hooks", "vmap"] = "auto",
                    device: str | torch.device | None = None) -> Fisher:
    """Diagonal Fisher of every trainable parameter (or of ``params``), over at most
    ``n_examples`` examples of ``data`` (all by default).  See the module docstring.
    ``device``: where the pass runs (the model moves there for the pass and back after;
    default: where the model is); the result stays on that device.  Sampled labels come from
    a CPU generator, so they are the same on every device."""
    dev = resolve_device(device, "diagonal_fisher device")
    with placed(model, dev):
        return _fisher_pass(model, data, mode, n_examples, seed, params, chunk_size, shard,
                            progress, backend)


def _fisher_pass(model, data, mode, n_examples, seed, params, chunk_size, shard, progress,
                 backend) -> Fisher:
    if mode not in MODES:
        raise MergelabError(f"fisher mode: expected one of {', '.join(MODES)}, found '{mode}'")
    if backend not in BACKENDS:
        raise MergelabError(f"fisher backend: expected one of {', '.join(BACKENDS)}, found '{backend}'")
    if n_examples is not None and n_examples <= 0:
        raise MergelabError(f"fisher n_examples: expected a positive number, found {n_examples}")
    from .data import check_data
    check_data(model, data)  # one DataError line before the pass, not a traceback in it
    all_params = dict(model.named_parameters())
    if params is None:
        names = [n for n, p in all_params.items() if p.requires_grad]
    else:
        names = list(params)
        bad = [n for n in names if n not in all_params]
        if bad:
            raise MergelabError(f"fisher params: model has no parameter '{bad[0]}'")
    if not names:
        raise MergelabError("fisher: the model has no trainable parameter")
    device = model_device(model)
    train = {n: all_params[n].detach() for n in names}
    frozen = {n: p.detach() for n, p in all_params.items() if n not in train}
    frozen.update(dict(model.named_buffers()))

    def logp(p: dict[str, Tensor], inputs: Any) -> Tensor:
        x = _unsqueeze(inputs)
        if isinstance(x, dict):
            out = functional_call(model, {**frozen, **p}, args=(), kwargs=x)
        else:
            out = functional_call(model, {**frozen, **p}, (x,))
        return torch.log_softmax(logits_of(out)[0].float(), -1)

    def logp_y(p, inputs, y):
        return causal.gather_logp(logp(p, inputs), y)

    def logp_aux(p, inputs):
        lp = logp(p, inputs)
        return lp, lp.detach()

    sums = {n: torch.zeros_like(t, dtype=torch.float64) for n, t in train.items()}
    seq = causal.is_causal_lm(model)
    if seq and mode == "expected":
        # per-token expected Fisher: the hooks' one-backward-per-class trick would square sums
        # over tokens (cross terms), so it needs per-token Jacobians (vmap)
        if backend == "hooks":
            raise MergelabError("fisher backend 'hooks': mode 'expected' on a causal LM needs "
                                "per-token gradients; use backend='vmap' or 'auto'")
        backend = "vmap"
    hooks = _Hooks(model, names, backend)
    tokens = 0
    seen = torch.zeros((), dtype=torch.float64)
    rank, world = distributed.rank_world() if shard else (0, 1)
    offset = 0
    checked = False
    bar = progress_bar(total=n_examples, desc=f"fisher ({mode})", unit="ex",
                   disable=not progress or not distributed.is_writer())
    with eval_no_grad(model), hooks.trainable():
        for i, batch in enumerate(data):
            if n_examples is not None and offset >= n_examples:
                break
            inputs, labels, _ = split_batch(batch)
            b = batch_len(inputs)
            keep = b if n_examples is None else min(b, n_examples - offset)
            offset += b
            if i % world != rank:
                continue
            inputs = to_device(take(inputs, slice(0, keep)), device)
            if not checked:                 # refuse outputs it cannot serve before any gradient work
                _check_logits(logits_of(call_model(model, take(inputs, slice(0, 1)))), seq, mode)
                checked = True
            valid = None
            if seq:
                _check_positions(model, inputs)
                tgt = causal.next_token_targets(inputs)
                tokens += int((tgt != causal.IGNORE).sum())
                if mode == "empirical":
                    y = tgt
                elif mode == "sampled":
                    y = causal.sample_targets(logits_of(call_model(model, inputs)), tgt, seed, i)
                else:
                    valid = tgt != causal.IGNORE
            elif mode == "empirical":
                if labels is None:
                    raise MergelabError("fisher mode 'empirical' needs labels in the batch, found none")
                y = labels[:keep].to(device).long()
            elif mode == "sampled":
                y = sample_labels(logits_of(call_model(model, inputs)), seed, i)
            y = None if mode == "expected" else y
            with torch.enable_grad():
                if not hooks.run(sums, inputs, y, keep, chunk_size):
                    with _vmap_compatible(model):
                        if valid is not None:
                            _expected_tokens(sums, logp, train, inputs, valid, keep, chunk_size)
                        else:
                            _accumulate(sums, logp_y, logp_aux, train, inputs, y, keep, chunk_size,
                                        lambda x: call_model(model, take(x, slice(0, 1))))
                    hooks.used.add("vmap")
            seen += keep
            bar.update(keep)
    bar.close()
    distributed.all_reduce_sum(list(sums.values()) + [seen])
    if seen.item() == 0:
        raise MergelabError("fisher: the data yielded no example")
    return Fisher({n: (s / seen).float() for n, s in sums.items()}, mode, int(seen.item()),
                  "+".join(sorted(hooks.used, reverse=False)) or None,
                  _total_tokens(tokens) if seq else None)


def _total_tokens(tokens: int) -> int:
    t = torch.tensor(float(tokens), dtype=torch.float64)
    distributed.all_reduce_sum([t])
    return int(t.item())


def _check_positions(model: nn.Module, inputs: Any) -> None:
    n, limit = inputs["input_ids"].shape[1], causal.max_positions(model)
    if limit is not None and n > limit:
        raise MergelabError(f"fisher: a batch of {n} tokens is longer than the model's {limit} "
                            f"positions (max_position_embeddings); truncate the text (max_length)")


class _Hooks:
    """The hooks backend's state over one pass: which modules to hook, whether the first-batch
    check passed, and the fall-back to vmap ("auto")."""

    def __init__(self, model: nn.Module, names: list[str], backend: str):
        self.model, self.names, self.backend = model, names, backend
        self.used: set[str] = set()
        self.modules: list[nn.Module] = []
        self.on = backend != "vmap"
        self.checked = backend == "hooks"          # an explicit choice is not second-guessed
        if self.on:
            self.modules, why = persample.plan(model, names, generic=True)
            if why is not None:
                if backend == "hooks":
                    raise MergelabError(f"fisher backend 'hooks': {why}; expected parameters of "
                                        f"modules without submodules (Linear, Conv, norms, Embedding, "
                                        f"or any leaf) (use backend='vmap' or 'auto')")
                self.on = False
        self.acc = persample.Accumulator(model, names) if self.on else None

    @contextlib.contextmanager
    def trainable(self):
        """Requested parameters require grad for the pass (the first-batch check needs it)."""
        params = dict(self.model.named_parameters())
        flip = [params[n] for n in self.names if self.on and not params[n].requires_grad]
        for p in flip:
            p.requires_grad_(True)
        try:
            yield
        finally:
            for p in flip:
                p.requires_grad_(False)

    def _fall_back(self, why: str) -> None:
        self.on = False
        warnings.warn(f"fisher: the hooks backend cannot serve this model ({why}); "
                      f"using vmap for the rest of the pass", stacklevel=3)

    def run(self, sums: dict[str, Tensor], inputs: Any, y: Tensor | None, n: int, chunk: int) -> bool:
        """Add this batch's squared per-example gradients to ``sums``; False if vmap must."""
        if not self.on:
            return False
        if not self.checked:
            self.checked = True
            k = min(2, n)

            def forward():
                return _log_probs(call_model(self.model, take(inputs, slice(0, k))))
            why = persample.hooks_check(self.model, self.modules, self.names, forward, k)
            if why is not None:
                self._fall_back(why)
                return False
        part = {k: torch.zeros_like(v) for k, v in sums.items()}
        try:
            for s in range(0, n, chunk):
                sl = slice(s, min(n, s + chunk))
                _hooks_chunk(self, part, take(inputs, sl), None if y is None else y[sl],
                             sl.stop - sl.start)
        except persample.Unsupported as e:
            if self.backend == "hooks":
                raise MergelabError(f"fisher backend 'hooks': {e} (use backend='vmap' or 'auto')") from None
            self._fall_back(str(e))
            return False
        for k, v in part.items():
            sums[k] += v
        self.used.add("hooks")
        return True


def _check_logits(logits: Tensor, seq: bool = False, mode: str = "empirical") -> None:
    """One line refusing logits that are not one class distribution per example (or, for a
    causal LM, one next-token distribution per token)."""
    if seq and logits.ndim == 3:
        if mode == "expected":
            causal.check_expected(logits.shape[-1])
        return
    if logits.ndim != 2:
        kind = ("one distribution per token from a model that is not a causal LM (*ForCausalLM)"
                if logits.ndim == 3 else f"{logits.ndim} axes")
        raise MergelabError(f"fisher: model logits have shape {tuple(logits.shape)}, {kind}; "
                            f"diagonal_fisher supports classifier logits (batch, classes) and "
                            f"causal LM logits (batch, tokens, vocab)")


def _log_probs(out: Any) -> Tensor:
    logits = logits_of(out)
    if logits.ndim not in (2, 3):
        raise MergelabError(f"fisher: expected logits of shape (batch, classes) or (batch, tokens, "
                            f"vocab), found {tuple(logits.shape)}")
    return torch.log_softmax(logits.float(), -1)


def _hooks_chunk(h: _Hooks, sums: dict[str, Tensor], inputs: Any, y: Tensor | None, b: int) -> None:
    """One forward of ``b`` examples; one backward per label choice (per class for "expected",
    seeded with √p so that the square carries the weight p)."""
    with persample.Recorder(h.modules, b) as rec:
        logp = _log_probs(call_model(h.model, inputs))
    calls = rec.calls
    if y is not None:
        seed = causal.target_seed(logp, y)
        grads = persample.seeded_backward(logp, seed, calls, retain=False)
        h.acc.add_squares(sums, calls, grads, b)
        return
    root_p = logp.detach().exp().sqrt()
    n_classes = logp.shape[1]
    for c in range(n_classes):
        seed = torch.zeros_like(logp)
        seed[:, c] = root_p[:, c]
        grads = persample.seeded_backward(logp, seed, calls, retain=c + 1 < n_classes)
        h.acc.add_squares(sums, calls, grads, b)


def _expected_tokens(sums, logp, train, inputs, valid, n, chunk_size):
    """Causal LM, mode "expected": ``Σ_t Σ_v p_tv (∇ log p_tv)²`` per sequence, one gradient row
    per (token, vocabulary entry).  Per sequence one forward (``torch.func.vjp``); the rows'
    backward passes are batched by ``vmap`` over one-hot cotangents in chunks of ``chunk_size``
    rows (memory: ``chunk_size`` gradients)."""
    for i in range(n):
        x = take(inputs, slice(i, i + 1))
        x = {k: (val[0] if isinstance(val, Tensor) else val) for k, val in x.items()}
        lp, vjp_fn = vjp(lambda p: logp(p, x), train)   # (T, V)
        lp = lp.detach()
        per_row = vmap(vjp_fn)
        ts = valid[i].nonzero()[:, 0].to(lp.device)
        vocab = lp.shape[-1]
        tt = ts.repeat_interleave(vocab)
        vv = torch.arange(vocab, device=lp.device).repeat(len(ts))
        w = lp[tt, vv].exp()
        for s in range(0, len(tt), chunk_size):
            pick = torch.zeros((len(tt[s:s + chunk_size]),) + tuple(lp.shape), device=lp.device)
            pick[torch.arange(len(pick), device=lp.device), tt[s:s + chunk_size], vv[s:s + chunk_size]] = 1.0
            (g,) = per_row(pick)
            ws = w[s:s + chunk_size]
            for k, v in g.items():
                sums[k] += (v.detach().square() * ws.view((-1,) + (1,) * (v.ndim - 1))).sum(
                    0, dtype=torch.float64)


def _accumulate(sums, logp_y, logp_aux, train, inputs, y, n, chunk_size, call_model_one, valid=None):
    if y is not None:
        per_grad = vmap(grad(logp_y), in_dims=(None, 0, 0))
        for s in range(0, n, chunk_size):
            sl = slice(s, min(n, s + chunk_size))
            g = per_grad(train, take(inputs, sl), y[sl])
            for k, v in g.items():
                sums[k] += v.detach().square().sum(0, dtype=torch.float64)
        return
    per_jac = vmap(jacrev(logp_aux, has_aux=True), in_dims=(None, 0))
    with torch.no_grad():
        rows = logits_of(call_model_one(inputs)).shape[1:].numel()   # C, or T·V for a causal LM
    step = max(1, chunk_size // rows)                   # gradient rows per chunk: B*C <= chunk_size
    for s in range(0, n, step):
        sl = slice(s, min(n, s + step))
        jac, lp = per_jac(train, take(inputs, sl))
        if lp.ndim != (2 if valid is None else 3):
            raise MergelabError(f"fisher: expected logits of shape (batch, classes), found "
                                f"{tuple(lp.shape)[1:]} per example")
        p = lp.exp()                                    # (B, C) or (B, T, V)
        if valid is not None:                           # per-token sums over real next tokens only
            p = p * valid[sl].unsqueeze(-1).to(p.dtype)
        axes = tuple(range(p.ndim))
        for k, v in jac.items():                        # v: (B, C, *shape) or (B, T, V, *shape)
            w = p.view(p.shape + (1,) * (v.ndim - p.ndim))
            sums[k] += (v.detach().square() * w).sum(axes, dtype=torch.float64)
