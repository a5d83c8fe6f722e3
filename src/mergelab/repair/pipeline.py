"""Recipe stages that run after the merge, inside the merge's atomic output folder.

``repair:`` replaces the merged weights by their REPAIR-ed version (corrections folded into
the layers, so the output stays a plain checkpoint). ``tact:`` keeps the merged weights and
adds ``tact/corrections.safetensors`` (every task's per-site scale and shift) and one plain
folded checkpoint per task, ``tact/<task>/``, with that task's own head.

Experts are the recipe's models exactly as the merge saw them (read through the alignment's
permuted views when the recipe has an ``align:`` section), so their statistics live in the
merged model's coordinates. Architectures come from the merged folder's ``config.json``
(Hugging Face) or from ``model_code: module:factory``; data from local files
(:func:`mergelab.stats.data.load_data`).
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Sequence

from pydantic import BaseModel, ConfigDict

from ..errors import MergelabError
from ..io.models import build_model, is_hf_folder, load_weights
from ..io.reader import open_checkpoint
from ..io.finite import check_stored
from ..io.writer import save_state
from ..stats import distributed


class DataSpec(BaseModel):
    """How to read a local calibration file (see :func:`mergelab.stats.data.load_data`)."""

    model_config = ConfigDict(extra="forbid")
    batch_size: int = 64
    n_batches: int | None = None          # calibration batches used (all by default)
    limit: int | None = None              # examples read from the file
    text_column: str | None = None
    label_column: str = "label"
    max_length: int = 128
    image_size: int | None = None
    device: str | None = None             # cpu, cuda or cuda:N: where the passes run (default: cpu)


class RepairSection(DataSpec):
    """``repair:`` — REPAIR of the merged model towards the weighted average of the experts'
    per-channel statistics (weights default to uniform)."""

    data: str
    model_code: str | None = None
    weights: list[float] | None = None
    head: str | None = "auto"
    sites: list[str] | None = None
    mode: Literal["joint", "sequential"] = "sequential"


class TactTask(BaseModel):
    model_config = ConfigDict(extra="forbid")
    model: str                             # one of the recipe's models[].model
    data: str


class TactSection(DataSpec):
    """``tact:`` — per-task rescale-and-shift towards each task's expert statistics."""

    tasks: dict[str, TactTask]
    model_code: str | None = None
    head: str | None = "auto"
    sites: list[str] | None = None
    mode: Literal["joint", "sequential"] = "sequential"


def _tokenizer(folder: Path):
    if is_hf_folder(folder) and any((folder / n).exists() for n in
                                    ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        import transformers

        return transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    return None


def _loader(path: str, spec: DataSpec, tokenizer) -> Any:
    from ..stats.data import load_data

    p = Path(path)
    if not p.exists():
        raise MergelabError(f"calibration data '{p}': no such file or folder")
    return load_data(p, batch_size=spec.batch_size, tokenizer=tokenizer, text_column=spec.text_column,
                     label_column=spec.label_column, max_length=spec.max_length,
                     image_size=spec.image_size, limit=spec.limit)


def _model(arch: Path, model_code: str | None, ckpt, label: str):
    return load_weights(build_model(arch, model_code), ckpt, label)


def _like(ck, state: Mapping[str, Any], who: str = "", allow_nonfinite: bool = True) -> dict[str, Any]:
    """Every tensor of checkpoint ``ck``, taken from ``state`` where present, in ``ck``'s dtypes;
    tensors of ``state`` that ``ck`` lacks (a task's own head) keep their dtype.  Unless
    ``allow_nonfinite``, a tensor that is not finite once cast is an error naming ``who``."""
    out = {}
    for k in ck.keys():
        if k not in state:
            out[k] = ck.get(k)
            continue
        out[k] = state[k].detach().to(ck.dtype(k))
        if not allow_nonfinite:
            check_stored(k, state[k].detach(), out[k], who=who)
    out.update({k: v.detach() for k, v in state.items() if k not in out})
    return out


def check_new_tensors(arch_keys: set[str], state: Mapping[str, Any], model: Any, who: str) -> None:
    """Refuse, in one line, a folded state with tensors the architecture has no place for: a
    shift folded into a linear without bias creates a bias that a model built from the folder's
    config (e.g. Llama, ``attention_bias: false``) would drop on loading, losing the correction."""
    extra = [k for k in state if k not in arch_keys]
    if extra:
        arch = type(model).__name__
        raise MergelabError(f"{who}: the correction needs tensor '{extra[0]}'"
                            f"{f' (and {len(extra) - 1} more)' if len(extra) > 1 else ''}, which "
                            f"{arch} as configured does not have (a bias on a layer without one); "
                            f"it would be dropped on loading. List sites whose layers have a bias "
                            f"under sites:, or use an architecture configured with biases")


def _rewrite_weights(folder: Path, state: Mapping[str, Any], shard_size: str, allow_nonfinite: bool = True) -> None:
    """Replace the weight files of ``folder`` by ``state`` (same names, shapes and dtypes)."""
    old = open_checkpoint(folder)
    new = _like(old, state, "repair", allow_nonfinite)
    tmp = folder / ".mergelab-stage"
    save_state(new, tmp, dtype=None, shard_size=shard_size, force=True)
    for f in list(folder.glob("*.safetensors")) + list(folder.glob("model.safetensors.index.json")):
        f.unlink()
    for f in tmp.iterdir():
        if f.suffix == ".safetensors" or f.name == "model.safetensors.index.json":
            shutil.move(str(f), folder / f.name)
    shutil.rmtree(tmp)


def run_repair(section: RepairSection, folder: Path, experts: Sequence[tuple[str, Any]], *,
               shard_size: str = "5GB", quiet: bool = False, log: Callable[[str], None] = print,
               allow_nonfinite: bool = False) -> None:
    """REPAIR the merged model in ``folder`` (weights rewritten in place)."""
    from . import repair

    if section.weights is not None and len(section.weights) != len(experts):
        raise MergelabError(f"repair: weights has {len(section.weights)} values, expected "
                            f"{len(experts)} (one per model)")
    tok = _tokenizer(folder)
    data = _loader(section.data, section, tok)
    merged = _model(folder, section.model_code, open_checkpoint(folder), "merged model")
    models = [_model(folder, section.model_code, ck, f"repair: expert '{name}'") for name, ck in experts]
    arch_keys = set(merged.state_dict())
    fixed = repair(merged, models, data, section.weights, sites=section.sites, head=section.head,
                   n_batches=section.n_batches, mode=section.mode, fold=True, progress=not quiet,
                   device=section.device)
    unfolded = getattr(fixed, "mergelab_unfolded", [])
    if unfolded:
        raise MergelabError(f"repair: the correction at site(s) {', '.join(map(str, unfolded))} cannot be "
                            "folded into a layer; list foldable sites under repair.sites")
    check_new_tensors(arch_keys, fixed.state_dict(), merged, "repair")
    if not distributed.is_writer():     # under torchrun every rank calibrates, rank 0 writes
        return
    _rewrite_weights(folder, fixed.state_dict(), shard_size, allow_nonfinite)
    log(f"repair: folded REPAIR corrections at {len(_sites_of(fixed, merged, section))} sites "
        f"into the merged weights ({section.mode}, {len(models)} experts)")


def _sites_of(fixed, merged, section) -> list[str]:
    from ..stats import find_head, resolve_sites

    head = find_head(merged, section.head)
    return [s.name for s in resolve_sites(merged, section.sites, head)]


def run_tact(section: TactSection, folder: Path, experts: Mapping[str, Any], *,
             shard_size: str = "5GB", quiet: bool = False, log: Callable[[str], None] = print,
             allow_nonfinite: bool = False) -> None:
    """TACT on the merged model in ``folder``; writes ``folder/tact/``.

    ``experts`` maps each recipe model reference (as written in the recipe) to the checkpoint
    the merge read for it."""
    from . import tact

    tok = _tokenizer(folder)
    models, data = {}, {}
    for task, t in section.tasks.items():
        if t.model not in experts:
            raise MergelabError(f"tact: task '{task}': model '{t.model}' is not one of the recipe's models "
                                f"({', '.join(map(str, experts))})")
        models[task] = _model(folder, section.model_code, experts[t.model], f"tact: expert '{t.model}'")
        data[task] = _loader(t.data, section, tok)
    merged = _model(folder, section.model_code, open_checkpoint(folder), "merged model")
    arch_keys = set(merged.state_dict())
    tcm = tact(merged, models, data, section.n_batches, sites=section.sites, head=section.head,
               mode=section.mode, progress=not quiet, device=section.device)
    for task in tcm.tasks:
        check_new_tensors(arch_keys, tcm.folded_state_dict(task), merged, f"tact task '{task}'")
    if not distributed.is_writer():     # under torchrun every rank calibrates, rank 0 writes
        return
    out = folder / "tact"
    out.mkdir()
    tcm.save_corrections(out / "corrections.safetensors")
    merged_ck = open_checkpoint(folder)
    for task in tcm.tasks:
        folded = _like(merged_ck, tcm.folded_state_dict(task), f"tact task '{task}'", allow_nonfinite)
        save_state(folded, out / task, like=folder,
                   shard_size=shard_size)
    log(f"tact: {len(tcm.tasks)} tasks x {len(tcm.sites)} sites; corrections in "
        f"tact/corrections.safetensors, folded per-task checkpoints in tact/<task>/")


def check_single_output(key: str, recipe, multi_output: bool) -> None:
    if multi_output:
        raise MergelabError(f"recipe: '{key}:' needs a method with one merged model, found "
                            f"'{recipe.merge_method}' (one output per task)")


def check_data(key: str, recipe, paths: Sequence[str]) -> None:
    for d in paths:
        if not Path(recipe.resolve_path(d)).exists():
            raise MergelabError(f"recipe: {key}: calibration data '{d}': no such file or folder")


def resolved(recipe, sec):
    """The section with its data paths resolved against the recipe's folder."""
    upd = {"data": recipe.resolve_path(sec.data)} if hasattr(sec, "data") else {}
    if getattr(sec, "tasks", None):
        upd["tasks"] = {k: t.model_copy(update={"data": recipe.resolve_path(t.data)})
                        for k, t in sec.tasks.items()}
    return sec.model_copy(update=upd)
