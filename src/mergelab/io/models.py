"""Building ``nn.Module`` objects for checkpoints: the one place that turns a path (and
optionally the user's ``--model-code``) into a model.

* A Hugging Face folder (``config.json``): the class named in ``architectures``, else
  ``AutoModel``.
* Anything else: the user's factory ``model_code="module:function"`` or
  ``"path/to/file.py:function"``, a function of no arguments returning the ``nn.Module``;
  weights are read with :func:`mergelab.io.open_checkpoint` (never unpickled) and loaded
  strictly.

Used by ``mergelab align`` (architecture only, then weights through a lazily permuted view)
and ``mergelab stats`` (model with weights and tokenizer).
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ..errors import CheckpointError, MergelabError


def load_factory(model_code: str) -> Callable[[], nn.Module]:
    """``"module:function"`` or ``"path/to/file.py:function"`` -> the function."""
    mod, _, fn = str(model_code).rpartition(":")
    if not mod or not fn:
        raise MergelabError(f"--model-code: expected MODULE:FACTORY, found '{model_code}'")
    try:
        if mod.endswith(".py"):
            p = Path(mod)
            if not p.is_file():
                raise MergelabError(f"--model-code {model_code}: no such file {p}")
            spec = importlib.util.spec_from_file_location(f"_mergelab_model_code_{p.stem}", p)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        else:
            if "" not in sys.path and os.getcwd() not in sys.path:
                sys.path.insert(0, os.getcwd())
            module = importlib.import_module(mod)
    except MergelabError:
        raise
    except Exception as e:  # ImportError, or the module itself failed
        raise MergelabError(f"--model-code {model_code}: cannot import {mod}: {type(e).__name__}: {e}") from None
    f = getattr(module, fn, None)
    if not callable(f):
        raise MergelabError(f"--model-code {model_code}: {mod} has no function {fn!r}")
    return f


def is_hf_folder(path: str | os.PathLike) -> bool:
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file()


def build_model(path: str | os.PathLike, model_code: str | None = None, *, meta: bool = False,
                layers: int | None = None) -> nn.Module:
    """The architecture of the checkpoint at ``path`` (weights NOT loaded), in eval mode.

    Hugging Face folders only: ``meta`` builds it on the meta device (shapes, no memory: a 7B
    model that could not be held); ``layers`` builds it with ``num_hidden_layers`` set to that
    (the reduced-depth copy a large model's spec is traced on)."""
    p = Path(path)
    if model_code is not None:
        f = load_factory(model_code)
        try:
            model = f()
        except Exception as e:
            raise MergelabError(f"--model-code {model_code}: the factory failed: {type(e).__name__}: {e}") from None
        if not isinstance(model, nn.Module):
            raise MergelabError(f"--model-code {model_code}: expected a function returning an nn.Module, "
                                f"it returned {type(model).__name__}")
        return model.eval()
    if is_hf_folder(p):
        import transformers
        try:
            cfg = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
        except Exception as e:
            raise CheckpointError(f"{p}/config.json: transformers cannot read it: {type(e).__name__}: {e}") from None
        if layers is not None:
            cfg.num_hidden_layers = int(layers)
        arch = (getattr(cfg, "architectures", None) or [None])[0]
        cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
        if arch is not None and cls is None:
            raise CheckpointError(f"{p}/config.json: architecture {arch!r} is not a class of this transformers"
                                  f" ({transformers.__version__}); give --model-code MODULE:FACTORY")
        try:
            with torch.device("meta") if meta else contextlib.nullcontext():
                model = cls(cfg) if cls is not None else transformers.AutoModel.from_config(cfg)
        except Exception as e:
            raise CheckpointError(f"{p}/config.json: cannot build {arch or 'AutoModel'}: {type(e).__name__}: {e}") from None
        return model.eval()
    if not p.exists():
        raise MergelabError(f"model '{p}': no such file or folder")
    raise MergelabError(f"{p}: not a Hugging Face folder with config.json; give --model-code MODULE:FACTORY "
                        "to say which architecture it is")


def _hf_renamed(model: nn.Module, keys: list[str]) -> dict[str, str]:
    """``{model name: checkpoint name}`` by transformers' own load-time renaming of checkpoint
    keys (transformers 5 renames modules, e.g. ViT's ``attention.attention.query`` is
    ``attention.q_proj``, while ``save_pretrained`` writes the legacy names).  Keys that a
    converter would combine or split (not a one-to-one rename) are not mapped."""
    try:
        from transformers import PreTrainedModel
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
    except ImportError:          # another transformers version: no conversion mapping
        return {}
    if not isinstance(model, PreTrainedModel):
        return {}
    conv = get_model_conversion_mapping(model) or []
    ren = [c for c in conv if isinstance(c, WeightRenaming)]
    cvt = [c for c in conv if isinstance(c, WeightConverter)]
    if not ren and not cvt:
        return {}
    meta = model.state_dict()
    out: dict[str, str] = {}
    for k in keys:
        mk, src = rename_source_key(k, ren, cvt, getattr(model, "base_model_prefix", None), meta)
        if src is None and mk in meta and mk != k:
            out.setdefault(mk, k)
    return out


def checkpoint_names(model: nn.Module, keys) -> dict[str, str]:
    """``{model state name: checkpoint tensor name}`` for every model tensor the checkpoint
    holds: the same name; else transformers' renaming of the checkpoint's (legacy) names;
    else, for a tied tensor (the same parameter under two names, e.g. GPT-2's ``lm_head.weight``
    and ``transformer.wte.weight``, written once), the name its twin has in the checkpoint."""
    keys = list(keys)
    present = set(keys)
    state = model.state_dict(keep_vars=True)
    names = {k: k for k in state if k in present}
    if len(names) < len(state):
        for mk, fk in _hf_renamed(model, [k for k in keys if k not in names.values()]).items():
            names.setdefault(mk, fk)
    twins: dict[int, list[str]] = {}
    for k, t in state.items():
        twins.setdefault(id(t), []).append(k)
    for group in twins.values():
        have = next((k for k in group if k in names), None)
        if have is not None:
            for k in group:
                names.setdefault(k, names[have])
    return names


def _ignored(model: nn.Module, attr: str, name: str) -> bool:
    pats = getattr(model, attr, None) or []
    return any(re.search(p, name) for p in pats if isinstance(p, str))


def check_fit(model: nn.Module, ckpt, label: str) -> None:
    """The checkpoint's tensors are exactly the model's state (names and shapes, through
    :func:`checkpoint_names`: renamed and tied tensors are found), else one
    :class:`CheckpointError` line listing the first mismatches.  A tied tensor (one that
    shares memory with another, e.g. an output layer tied to the embeddings) may be absent
    when a tensor it is tied to is present; names a Hugging Face class declares ignorable
    (``_keys_to_ignore_on_load_missing`` / ``_unexpected``) are ignored."""
    sd = model.state_dict(keep_vars=True)
    keys = list(ckpt.keys())
    names = checkpoint_names(model, keys)
    used = set(names.values())
    groups: dict[tuple, list[str]] = {}
    for n, t in sd.items():
        if t.numel() and t.device.type != "meta":
            groups.setdefault((t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape)), []).append(n)
    tied = {n: g for g in groups.values() if len(g) > 1 for n in g}
    missing = [n for n in sd if n not in names and not any(m in names for m in tied.get(n, ()))
               and not _ignored(model, "_keys_to_ignore_on_load_missing", n)]
    unexpected = [k for k in keys if k not in used and k not in sd
                  and not _ignored(model, "_keys_to_ignore_on_load_unexpected", k)]
    shapes = [f"{fk}: checkpoint {tuple(ckpt.shape(fk))}, model {tuple(sd[mk].shape)}" for mk, fk in names.items()
              if tuple(ckpt.shape(fk)) != tuple(sd[mk].shape)]
    if not (missing or unexpected or shapes):
        return
    parts = []
    for what, items in (("missing from the checkpoint", missing), ("not in the model", unexpected),
                        ("wrong shape", shapes)):
        if items:
            more = f", ... ({len(items)} in all)" if len(items) > 3 else ""
            parts.append(f"{what}: {'; '.join(items[:3])}{more}")
    raise CheckpointError(f"{label}: weights do not fit the model ({' | '.join(parts)})")


def load_weights(model: nn.Module, ckpt, label: str) -> nn.Module:
    """Load every tensor of ``ckpt`` (a Checkpoint-like object) into ``model`` (strict, through
    :func:`checkpoint_names`: renamed and tied tensors are found)."""
    check_fit(model, ckpt, label)
    keys = list(ckpt.keys())
    names = checkpoint_names(model, keys)
    state = {mk: ckpt.get(fk) for mk, fk in names.items()}
    try:
        model.load_state_dict(state, strict=False)
    except RuntimeError as e:
        first = next((ln.strip() for ln in str(e).splitlines()[1:] if ln.strip()), str(e))
        raise CheckpointError(f"{label}: weights do not fit the model: {first}") from None
    return model.eval()


class _quiet_transformers:
    """transformers' loading report goes to its logger; the checks above already passed."""

    def __init__(self, transformers):
        self.log = transformers.utils.logging

    def __enter__(self):
        self.level = self.log.get_verbosity()
        self.log.set_verbosity_error()

    def __exit__(self, *exc):
        self.log.set_verbosity(self.level)


def load_model(path: str | os.PathLike, model_code: str | None = None, progress: bool = True
               ) -> tuple[nn.Module, Any]:
    """``(model with its weights, in eval mode; tokenizer or None)``."""
    from .reader import checkpoint_exists, open_checkpoint

    p = Path(path)
    if not checkpoint_exists(path):
        raise MergelabError(f"model '{p}': no such file or folder")
    if model_code is not None:
        return load_weights(build_model(p, model_code), open_checkpoint(path), f"model '{path}'"), None
    if is_hf_folder(p):
        import transformers

        from ..progress import is_terminal

        if not progress or not is_terminal():  # HF's own bars redraw with carriage returns
            transformers.utils.logging.disable_progress_bar()
        ckpt = open_checkpoint(p)  # our reader validates config.json and every weight file first
        model = build_model(p)     # the architecture (one line if transformers cannot build it)
        check_fit(model, ckpt, f"model '{p}'")
        ckpt.close()
        cls = type(model)
        try:
            with _quiet_transformers(transformers):
                model = cls.from_pretrained(str(p), local_files_only=True)
        except Exception as e:  # noqa: BLE001 - anything transformers raises on this folder
            raise CheckpointError(f"model '{p}': transformers cannot load it: {type(e).__name__}:"
                                  f" {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}") from None
        tok = None
        if any((p / n).exists() for n in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
            try:
                tok = transformers.AutoTokenizer.from_pretrained(str(p), local_files_only=True)
            except Exception as e:  # noqa: BLE001
                raise CheckpointError(f"model '{p}': cannot load its tokenizer: {type(e).__name__}:"
                                      f" {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}") from None
        return model.eval(), tok
    return build_model(p, None), None  # raises the one-line error
