"""Aligning checkpoints on disk: the engine behind ``mergelab align`` and the recipe ``align:``
section.

The architecture comes from the checkpoint itself when it is a Hugging Face folder
(``config.json``: the class named in ``architectures``, else ``AutoModel``), otherwise from
the user's factory ``model_code="module:function"`` (a function of no arguments returning the
``nn.Module``; ``module`` may also be a ``path/to/file.py``).  The spec is traced once on the
reference's architecture; weight matching then reads only the tensors the spec permutes;
activation matching loads both models with their weights.  Every non-reference checkpoint
is afterwards read through a :class:`PermutedCheckpoint`, so nothing is permuted in memory
as a whole.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..device import resolve_device
from ..errors import MergelabError
from ..io.models import build_model, check_fit, checkpoint_names, is_hf_folder, load_factory, load_weights  # noqa: F401  (re-exported)
from ..io.outputs import Output, check_not_input, model_code_path
from .apply import PermutedCheckpoint, rename_spec, save_permutation
from .matching import activation_matching, weight_matching
from .stream import weight_matching_streamed
from .spec import Permutation, PermutationSpec, permutation_spec


# ----------------------------------------------------------------------------- models
def hf_example_inputs(model: nn.Module) -> Any:
    """Small inputs that exercise every path of a Hugging Face model (padding included)."""
    import inspect
    cfg = getattr(model, "config", None)
    params = inspect.signature(model.forward).parameters
    g = torch.Generator().manual_seed(0)
    if "input_ids" in params:
        vocab = int(getattr(cfg, "vocab_size", 100) or 100)
        ids = torch.randint(1, min(vocab, 1000), (2, 8), generator=g)
        mask = torch.ones(2, 8, dtype=torch.int64)
        mask[1, 5:] = 0
        x = {"input_ids": ids, "attention_mask": mask}
        if "decoder_input_ids" in params and getattr(cfg, "is_encoder_decoder", False):
            x["decoder_input_ids"] = torch.randint(1, min(vocab, 1000), (2, 5), generator=g)
        return x
    if "pixel_values" in params:
        ch = int(getattr(cfg, "num_channels", 3) or 3)
        size = getattr(cfg, "image_size", 32) or 32
        size = size if isinstance(size, int) else int(size[0])
        return {"pixel_values": torch.randn(2, ch, size, size, generator=g)}
    if "input_features" in params:          # speech encoders on log-mel frames (Whisper)
        mels = int(getattr(cfg, "num_mel_bins", 80) or 80)
        frames = 2 * int(getattr(cfg, "max_source_positions", 1500) or 1500)
        return {"input_features": torch.randn(2, mels, frames, generator=g)}
    if "input_values" in params:            # raw-waveform encoders (wav2vec2)
        return {"input_values": torch.randn(2, 4000, generator=g)}
    raise MergelabError(f"{type(model).__name__}: cannot make example inputs for it; give --input-shape")


def _first_batch_input(data: Iterable) -> Any:
    b = next(iter(data), None)
    if b is None:
        raise MergelabError("--data: no batches")
    if isinstance(b, dict):
        return {k: v for k, v in b.items() if k != "labels"}
    return b[0] if isinstance(b, (tuple, list)) else b


def _batch_input(b):
    if isinstance(b, dict):
        return {k: v for k, v in b.items() if k != "labels"}
    return b[0] if isinstance(b, (tuple, list)) else b


def load_align_data(path, reference: Path, batch_size: int = 32, limit: int | None = None):
    """Batches for activation matching, read by the stats engineer's local-data reader
    (``mergelab.stats.data.load_data``: image folder, ``.npz``, ``.csv``/``.jsonl``)."""
    try:
        from ..stats.data import load_data
    except ImportError:
        raise MergelabError("--data: this build has no local-data reader (mergelab.stats.data); "
                            "use --method weight") from None
    tok = None
    if reference.is_dir() and any((reference / n).exists() for n in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        import transformers
        tok = transformers.AutoTokenizer.from_pretrained(str(reference), local_files_only=True)
    return load_data(path, batch_size=batch_size, tokenizer=tok, limit=limit)


# ----------------------------------------------------------------------------- aligning
def _open(ref) -> Any:
    if not isinstance(ref, (str, os.PathLike)):
        return ref
    from ..io.reader import checkpoint_exists, open_checkpoint
    if not checkpoint_exists(ref):
        raise MergelabError(f"{ref}: no such file or folder")
    return open_checkpoint(ref)


def _label(ckpt) -> str:
    return str(getattr(ckpt, "path", None) or type(ckpt).__name__)


def spec_state_check(spec: PermutationSpec, ckpt, label: str) -> None:
    """Refuse a checkpoint that lacks a tensor the spec permutes (nothing is read)."""
    missing = [n for n in spec.axes if n not in ckpt]
    if missing:
        raise MergelabError(f"{label}: has no tensor {missing[0]!r} that the reference architecture permutes "
                            "(another architecture?)")


def spec_state(spec: PermutationSpec, ckpt, label: str) -> dict[str, torch.Tensor]:
    """The tensors of ``ckpt`` that the spec permutes (only those are read)."""
    spec_state_check(spec, ckpt, label)
    return {n: ckpt.get(n) for n in spec.axes}


# weight matching streams the checkpoints from disk (align.stream) when both models' permuted
# tensors in float32 exceed this; below it the in-memory matcher (cached products) is used
STREAM_ABOVE_BYTES = 2 << 30
# weight matching of a Hugging Face model over this size in float32 traces a reduced copy
REDUCED_SPEC_ABOVE_BYTES = 4 << 30
REDUCED_LAYERS = 2


def _numel(ckpt, name: str) -> int:
    if hasattr(ckpt, "shape") and callable(ckpt.shape):
        n = 1
        for s in ckpt.shape(name):
            n *= int(s)
        return n
    return int(ckpt[name].numel())


@dataclass
class AlignResult:
    spec: PermutationSpec
    permutations: list[Permutation]               # one per other model
    labels: list[str] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"spec: {len(self.spec.groups)} groups"]
        for lab, p in zip(self.labels, self.permutations):
            moved = sum(int((v != torch.arange(len(v))).sum()) for v in p.values())
            h = p.history
            obj = f"; objective {h[0]:.6g} -> {h[-1]:.6g} in {len(h) - 1} sweeps" if len(h) >= 2 else ""
            lines.append(f"{lab}: {moved} indices moved{obj}")
        return "\n".join(lines)


def align_checkpoints(reference, others: Sequence, *, model_code: str | None = None, method: str = "weight",
                      data=None, input_shape: Sequence[int] | None = None, batch_size: int = 32,
                      max_iter: int = 100, seed: int = 0, device: str | None = None,
                      stream: bool | None = None) -> AlignResult:
    """Permutations aligning each of ``others`` (paths or Checkpoint-like) to ``reference``.

    ``data`` (activation matching): a path for :func:`load_align_data` or an iterable of
    batches.  Example inputs for tracing: ``input_shape`` (float ``randn``), else the first
    data batch, else (Hugging Face) generated token ids / pixels.  ``device``: where the cost
    matrices (weight matching) or both models' passes (activation matching) run; tracing
    stays on the CPU.  ``stream`` (weight matching): read the checkpoints tensor by tensor
    (:func:`mergelab.align.stream.weight_matching_streamed`) instead of holding both models in
    float32; default: stream when that would exceed ``STREAM_ABOVE_BYTES`` (2 GiB).  Both paths
    visit units in the ``"local"`` order and give the same permutations.  A Hugging Face
    model over ``REDUCED_SPEC_ABOVE_BYTES`` (4 GiB in float32) is not built for weight
    matching: its spec is traced on a ``REDUCED_LAYERS``-layer copy and extended
    (``permutation_spec(reduced=...)``), the model itself on the meta device.
    """
    dev = resolve_device(device, "align device")
    if method not in ("weight", "activation"):
        raise MergelabError(f"--method: expected 'weight' or 'activation', found {method!r}")
    if not others:
        raise MergelabError("align: give at least one model to align to the reference")
    ref_ck = _open(reference)
    oth_ck = [_open(o) for o in others]
    ref_path = Path(getattr(ref_ck, "path", "") or "")
    # a large Hugging Face model (over REDUCED_SPEC_ABOVE_BYTES in float32) is never built
    # whole: it lives on the meta device, its spec is traced on a REDUCED_LAYERS-layer copy and
    # extended block by block (permutation_spec(reduced=...)); weight matching needs no more
    reduced = None
    if (method == "weight" and model_code is None and is_hf_folder(ref_path)
            and 4 * sum(_numel(ref_ck, n) for n in ref_ck.keys()) > REDUCED_SPEC_ABOVE_BYTES):
        model = build_model(ref_path, meta=True)
        depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        if isinstance(depth, int) and depth > REDUCED_LAYERS:
            reduced = build_model(ref_path, layers=REDUCED_LAYERS)
        else:
            model = build_model(ref_path, model_code)
    else:
        model = build_model(ref_path, model_code)
    for ck in [ref_ck, *oth_ck]:  # a permutation of a model that is not this one means nothing
        check_fit(model, ck, _label(ck))
    batches = None
    if method == "activation":
        if data is None:
            raise MergelabError("--method activation needs --data")
        batches = load_align_data(data, ref_path, batch_size) if isinstance(data, (str, os.PathLike)) else data
        from ..stats.data import check_data
        check_data(model, batches, None, f"the model of {ref_path}")
    if input_shape is not None:
        if not all(isinstance(s, int) and s > 0 for s in input_shape):
            raise MergelabError(f"--input-shape: expected positive integers, found {list(input_shape)}")
        x = torch.randn(*input_shape, generator=torch.Generator().manual_seed(seed))
    elif batches is not None:
        x = _first_batch_input(batches)
    elif is_hf_folder(ref_path) and model_code is None:
        x = hf_example_inputs(reduced if reduced is not None else model)
    else:
        raise MergelabError("align: cannot make example inputs for tracing; give --input-shape (e.g. 1,3,32,32)")
    model_spec = permutation_spec(model, x, seed=seed, reduced=reduced)
    del reduced
    # the spec in the checkpoint's own tensor names (legacy names, tied tensors stored once)
    spec = rename_spec(model_spec, checkpoint_names(model, ref_ck.keys()))
    perms = []
    if method == "weight":
        for ck in [ref_ck, *oth_ck]:
            spec_state_check(spec, ck, _label(ck))
        if stream is None:          # both models' permuted tensors in float32 over the budget
            stream = 2 * 4 * sum(_numel(ref_ck, n) for n in spec.axes) > STREAM_ABOVE_BYTES
        # the "local" unit order (hubs last) in both paths: the same permutations either way
        if stream:
            for ck in oth_ck:
                perms.append(weight_matching_streamed(spec, ref_ck, ck, max_iter=max_iter, seed=seed,
                                                      order="local", device=dev))
        else:
            ref_state = spec_state(spec, ref_ck, _label(ref_ck))
            for ck in oth_ck:
                perms.append(weight_matching(spec, ref_state, spec_state(spec, ck, _label(ck)), max_iter=max_iter,
                                             seed=seed, device=dev, order="local"))
    else:
        ref_model = load_weights(model, ref_ck, _label(ref_ck))
        for ck in oth_ck:
            other = load_weights(build_model(ref_path, model_code), ck, _label(ck))
            perms.append(activation_matching(model_spec, ref_model, other, batches, input_fn=_batch_input,
                                             seed=seed,
                                             device=dev))
    return AlignResult(spec, perms, [_label(c) for c in oth_ck])


def _stem(path) -> str:
    p = Path(path)
    return p.name if p.is_dir() else p.stem


def _unique_stems(paths: Sequence) -> list[str]:
    stems = [_stem(p) for p in paths]
    return [s if stems.count(s) == 1 else f"{i}_{s}" for i, s in enumerate(stems)]


def run_align(reference, others: Sequence, out, *, model_code: str | None = None, method: str = "weight",
              data=None, input_shape: Sequence[int] | None = None, batch_size: int = 32, max_iter: int = 100,
              seed: int = 0, transfer_to: Sequence = (), checkpoints: bool = False, force: bool = False,
              shard_size: str = "5GB", device: str | None = None,
              stream: bool | None = None) -> tuple[AlignResult, list[Path]]:
    """Align ``others`` to ``reference`` and write into the folder ``out``:

    * ``<name>.permutation.safetensors`` per other model (``name``: its file stem / folder name);
    * with ``checkpoints``: ``<name>/`` the other model permuted (a sharded checkpoint folder,
      config files copied), streamed through a :class:`PermutedCheckpoint`;
    * with ``transfer_to`` (exactly one other model, a foundation model): ``<expert>/`` for
      every expert fine-tuned from it, permuted by the foundation's permutation.
    """
    from ..io import save_state
    if transfer_to and len(others) != 1:
        raise MergelabError(f"--transfer-to: needs exactly one OTHER (the foundation model the experts were "
                            f"fine-tuned from), found {len(others)}")
    from ..io.reader import checkpoint_exists
    for p in [reference, *others, *transfer_to]:
        if isinstance(p, (str, os.PathLike)) and not checkpoint_exists(p):
            raise MergelabError(f"{p}: no such file or folder")
    from ..io.writer import parse_size
    parse_size(shard_size, "--shard-size")  # before any work
    inputs = [("REFERENCE", reference), *((f"OTHER {o}", o) for o in others),
              *((f"--transfer-to {t}", t) for t in transfer_to), ("--data", data),
              ("--model-code", model_code_path(model_code))]
    claim = Output(out, kind="folder", option="-o", force=force, inputs=inputs, replaces=False)
    out = claim.path
    names = _unique_stems([*others, *transfer_to])
    targets = [out / f"{n}.permutation.safetensors" for n in names[:len(others)]]
    if checkpoints:
        targets += [out / n for n in names[:len(others)]]
    targets += [out / n for n in names[len(others):]]
    for t in targets:  # each file or folder written: never an input, nor a folder holding one
        check_not_input("-o", t, inputs)
    if not force:
        for t in targets:
            if t.exists():
                raise MergelabError(f"{t}: already exists (use --force to replace it)")
    with claim:
        res = align_checkpoints(reference, others, model_code=model_code, method=method, data=data,
                                input_shape=input_shape, batch_size=batch_size, max_iter=max_iter, seed=seed,
                                device=device, stream=stream)
        created = not out.exists()
        try:
            out.mkdir(exist_ok=True)
            written = []
            for n, o, perm in zip(names, others, res.permutations):
                written.append(save_permutation(perm, out / f"{n}.permutation.safetensors", res.spec))
                if checkpoints:
                    written.append(_write_permuted(o, res.spec, perm, out / n, force, shard_size, save_state))
            for n, e in zip(names[len(others):], transfer_to):
                written.append(_write_permuted(e, res.spec, res.permutations[0], out / n, force, shard_size,
                                               save_state))
        except BaseException:
            if created:  # a folder this run made holds nothing of value: all or nothing
                shutil.rmtree(out, ignore_errors=True)
            raise
    return res, written


def _write_permuted(src, spec, perm, dst: Path, force: bool, shard_size: str, save_state) -> Path:
    ck = _open(src)
    view = PermutedCheckpoint(ck, spec, perm)
    path = getattr(ck, "path", None)
    like = Path(path) if path is not None and Path(path).is_dir() else None
    return save_state(view, dst, like=like, shard_size=shard_size, force=force)


# ----------------------------------------------------------------------------- recipes
def recipe_inputs(recipe, inputs: Mapping | None = None) -> dict:
    """For a recipe with an ``align:`` section: ``{model reference as written: PermutedCheckpoint}``
    for every model that must be read aligned (see docs/align.md, "Recipes").  The merge
    engine then opens those through the permuted view instead of the plain checkpoint."""
    a = recipe.align
    inputs = dict(inputs or {})

    def path_of(ref):
        got = inputs.get(ref, ref) if isinstance(ref, str) else ref
        return recipe.resolve_path(got) if isinstance(got, (str, os.PathLike)) else got

    def same(x, y):
        px, py = path_of(x), path_of(y)
        if isinstance(px, (str, os.PathLike)) and isinstance(py, (str, os.PathLike)):
            return Path(px).absolute() == Path(py).absolute()
        return px is py

    model_refs = [m.model for m in recipe.models] + ([recipe.base_model] if recipe.base_model is not None else [])
    for ref in model_refs:
        if not isinstance(ref, str):
            raise MergelabError(f"recipe: align: models must be named by path (or by a name given in "
                                f"inputs=), found {type(ref).__name__}")
    reference = a.reference if a.reference is not None else (
        recipe.base_model if recipe.base_model is not None else recipe.models[0].model)
    data = path_of(a.data) if isinstance(a.data, str) else a.data
    kw = dict(model_code=a.model_code, method=a.method, data=data, input_shape=a.input_shape,
              batch_size=a.batch_size, max_iter=a.max_iter, seed=recipe.seed, device=a.device)
    out = {}
    if a.transfer is not None:
        t = a.transfer
        for e in t.experts:
            if not any(same(e, m) for m in model_refs):
                raise MergelabError(f"recipe: align.transfer.experts: {e} is not one of the recipe's models")
        res = align_checkpoints(path_of(reference), [path_of(t.foundation_b)], **kw)
        for ref in model_refs:
            if any(same(ref, e) for e in t.experts):
                out[ref] = PermutedCheckpoint(_open(path_of(ref)), res.spec, res.permutations[0])
        return out
    todo = []
    for ref in model_refs:
        if not same(ref, reference) and not any(same(ref, x) for x in todo):
            todo.append(ref)
    if not todo:
        raise MergelabError("recipe: align: every model is the reference; nothing to align")
    res = align_checkpoints(path_of(reference), [path_of(r) for r in todo], **kw)
    for r, perm in zip(todo, res.permutations):
        view = PermutedCheckpoint(_open(path_of(r)), res.spec, perm)
        for ref in model_refs:
            if same(ref, r):
                out[ref] = view
    return out


__all__ = ["AlignResult", "align_checkpoints", "build_model", "hf_example_inputs", "load_factory",
           "load_weights", "recipe_inputs", "run_align", "spec_state"]
