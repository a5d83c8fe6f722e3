"""Gram matrices and activation statistics of a decoder-only LM, one decoder layer at a time.

For a model larger than memory.  The model is built with its parameters on the ``meta`` device
(no storage; buffers such as rotary frequencies stay real), then:

1. the embeddings are loaded from the checkpoint and the model's own forward runs on each
   batch with every decoder layer replaced by a recorder: it records the layer's input hidden
   states and keyword arguments (the model's own causal mask, with padding, sliding windows or
   per-layer mask types; rotary position embeddings; position ids) and stops the forward at the
   last layer.  The embeddings are freed;
2. for each decoder layer ``i``: its weights alone are read from the checkpoint, the recorded
   hidden states of every batch go through it with its recorded arguments while the statistics
   are taken (hooks on its linears / sites), its outputs replace the hidden states, and the
   layer is freed;
3. the final norm and the LM head run the same way.

Memory: one decoder layer's weights (the embeddings and the LM head for their stages) plus the
calibration set's hidden states (``batches × B × T × hidden`` floats, kept in memory; with the
recorded masks).  Statistics are the same sums as a whole-model pass, so the results agree with
:func:`~mergelab.stats.gram_matrices` / :func:`~mergelab.stats.activation_stats` to float
rounding.  The Fisher needs a backward pass through every layer and is not streamed.

Supported: Hugging Face decoder-only models whose base model has ``embed_tokens``, ``layers``
(an ``nn.ModuleList``) and ``norm``, and an ``lm_head`` (Llama, Mistral, Qwen2/3, Gemma, Phi3,
OLMo, ... ): other models are refused in one line.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from ..errors import MergelabError
from .activations import Stats, activation_stats
from .batch import split_batch
from .gram import Grams, gram_matrices
from .sites import Site, discover_sites

# The chain: (embedding stage), decoder layers, (norm + head stage).


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered in the block is moved to ``meta`` as it is registered (one
    tensor allocated at a time); buffers stay real."""
    old = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        old(self, name, param)
    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = old


def _release() -> None:
    """Hand freed heap memory back to the system (glibc keeps freed blocks of the tensors just
    dropped; without this the resident memory would grow to the model's size across layers)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):           # not glibc: nothing to do
        pass


def skeleton(folder: str | Path) -> nn.Module:
    """The ``*ForCausalLM`` of a Hugging Face folder with every parameter on ``meta``."""
    import transformers

    p = Path(folder)
    if not (p / "config.json").is_file():
        raise MergelabError(f"layered stats: '{p}' is not a Hugging Face folder with config.json")
    cfg = transformers.AutoConfig.from_pretrained(str(p), local_files_only=True)
    arch = (getattr(cfg, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise MergelabError(f"layered stats: {p}/config.json names no transformers architecture "
                            f"(architectures: {arch})")
    with _parameters_on_meta():
        model = cls(cfg)
    _release()
    return model.eval()


def _parts(model: nn.Module) -> tuple[str, nn.Module]:
    """(base prefix, base model) of a decoder-only LM, or a one-line refusal."""
    for prefix, base in model.named_children():
        if all(hasattr(base, a) for a in ("embed_tokens", "layers", "norm")) and \
                isinstance(base.layers, nn.ModuleList):
            if not isinstance(getattr(model, "lm_head", None), nn.Module):
                break
            return prefix, base
    raise MergelabError(f"layered stats: {type(model).__name__} is not a decoder-only LM with "
                        f"<base>.embed_tokens, <base>.layers, <base>.norm and lm_head; run the "
                        f"whole-model pass instead")


class _Loader:
    """Loads one submodule's tensors from the checkpoint and frees them again."""

    def __init__(self, model: nn.Module, folder: str | Path):
        from ..io import open_checkpoint
        from ..io.models import checkpoint_names

        self.model, self.folder = model, folder
        self.ckpt = open_checkpoint(folder)
        self.names = checkpoint_names(model, self.ckpt.keys())

    @contextlib.contextmanager
    def loaded(self, prefix: str) -> Iterator[nn.Module]:
        sub = self.model.get_submodule(prefix)
        local = [k for k, _ in sub.named_parameters()]
        persistent = set(sub.state_dict().keys())
        missing = [f"{prefix}.{k}" for k in persistent if f"{prefix}.{k}" not in self.names]
        if missing:
            raise MergelabError(f"{self.folder}: checkpoint has no tensor for '{missing[0]}'")
        for k in local:                        # materialise parameters only (buffers are real)
            mod_name, _, attr = k.rpartition(".")
            mod = sub.get_submodule(mod_name) if mod_name else sub
            t = self.ckpt.get(self.names[f"{prefix}.{k}"])
            old = mod._parameters[attr]
            if tuple(t.shape) != tuple(old.shape):
                raise MergelabError(f"{self.folder}: tensor '{self.names[f'{prefix}.{k}']}' has "
                                    f"shape {tuple(t.shape)}, the model expects {tuple(old.shape)}")
            mod._parameters[attr] = nn.Parameter(t.to(old.dtype), requires_grad=False)
        try:
            yield sub
        finally:
            for k in local:
                mod_name, _, attr = k.rpartition(".")
                mod = sub.get_submodule(mod_name) if mod_name else sub
                p = mod._parameters[attr]
                mod._parameters[attr] = nn.Parameter(p.to("meta"), requires_grad=False)
            del p
            _release()


class _Recorder(nn.Module):
    """Stands in for decoder layer ``i`` during the embedding stage: records its input and
    keyword arguments, passes the hidden states on, stops the forward after the last layer."""

    def __init__(self, i: int, last: int, layer: nn.Module, box: list):
        super().__init__()
        self.i, self.last, self.box = i, last, box
        for a in ("attention_type", "layer_idx", "is_sliding"):
            if hasattr(layer, a):
                setattr(self, a, getattr(layer, a))

    def forward(self, hidden_states, *args, **kwargs):
        kept = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values", "use_cache")}
        self.box.append((hidden_states if self.i == 0 else None, args, kept))
        if self.i == self.last:
            raise _Stop
        return hidden_states


class _Stop(Exception):
    pass


class _Stage(nn.Module):
    """One stage as a model for the existing passes: batches are dicts with ``attention_mask``
    (the token mask, used for masking statistics) and ``idx`` (which recorded batch); the
    output hidden states are kept for the next stage."""

    def __init__(self, run, n: int, keep: bool):
        super().__init__()
        self._run, self.outputs, self.keep = run, [None] * n, keep

    def forward(self, idx: Tensor, attention_mask: Tensor | None = None):
        i = int(idx[0])
        out = self._run(i)
        if self.keep:                    # the head's logits are not kept
            self.outputs[i] = out
        return out


class _StageData:
    def __init__(self, masks: list[Tensor]):
        self.masks = masks

    def __len__(self):
        return len(self.masks)

    def __iter__(self):
        for i, m in enumerate(self.masks):
            yield {"idx": torch.full((m.shape[0],), i), "attention_mask": m}


def _attach(stage: _Stage, prefix: str, sub: nn.Module) -> None:
    """Register ``sub`` under ``prefix``'s dotted path inside ``stage`` (so module names, hence
    statistics keys, are the whole model's names)."""
    parts = prefix.split(".")
    parent = stage
    for p in parts[:-1]:
        if not hasattr(parent, p):
            parent.add_module(p, nn.Module())
        parent = getattr(parent, p)
    parent.add_module(parts[-1], sub)


def record_layers(model: nn.Module, base: nn.Module, originals: list[nn.Module], inputs: dict,
                  last: int, what: str) -> list:
    """The model's forward up to decoder layer ``last`` (``base.layers`` swapped for recorders
    meanwhile): ``[(layer input, args, kwargs), ...]`` of layers 0..last; ``what`` names the
    caller in the error when the forward does not reach them all."""
    box: list = []
    base.layers = nn.ModuleList([_Recorder(i, last, originals[i], box)
                                 for i in range(len(originals))])
    try:
        model(**inputs, use_cache=False)
    except _Stop:
        pass
    finally:
        base.layers = nn.ModuleList(originals)
    if len(box) != last + 1:
        raise MergelabError(f"{what}: the forward reached {len(box)} of {last + 1} decoder layers")
    return box


def layered_stats(folder: str | Path, data: Iterable[Any], kind: str, *,
                  layers: Sequence[str] | None = None, sites: Sequence[str | Site] | None = None,
                  head: str | None = "auto", progress: bool = False) -> Grams | Stats:
    """``kind="gram"``: :class:`Grams` of every nn.Linear input (or ``layers``);
    ``kind="activations"``: :class:`Stats` at ``sites`` (default: the whole model's default
    sites); computed one decoder layer at a time (see the module docstring)."""
    if kind not in ("gram", "activations"):
        raise MergelabError(f"layered stats: expected kind 'gram' or 'activations', found '{kind}'")
    model = skeleton(folder)
    prefix, base = _parts(model)
    loader = _Loader(model, folder)
    n_layers = len(base.layers)

    # -- 1. embeddings: record each layer's input and arguments through the model's forward
    masks, hidden, layer_args = [], [], []
    originals = list(base.layers)
    with loader.loaded(f"{prefix}.embed_tokens"), torch.no_grad():
        for batch in data:
            inputs, _, mask = split_batch(batch)
            if not isinstance(inputs, dict) or "input_ids" not in inputs:
                raise MergelabError("layered stats: expected token batches (dicts with input_ids)")
            box = record_layers(model, base, originals, inputs, n_layers - 1, "layered stats")
            m = mask if mask is not None else torch.ones_like(inputs["input_ids"])
            masks.append(m)
            hidden.append(box[0][0])
            layer_args.append([(a, k) for _, a, k in box])
    if not masks:
        raise MergelabError("layered stats: the data yielded no batch")

    stage_names = [f"{prefix}.layers.{i}" for i in range(n_layers)] + ["__final__"]
    final = {f"{prefix}.norm", "lm_head"}

    # which statistics belong to which stage
    if kind == "gram":
        all_lin = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        want = list(layers) if layers is not None else all_lin
        bad = [n for n in want if n not in all_lin]
        if bad:
            raise MergelabError(f"gram: '{bad[0]}' is not an nn.Linear module of the model")
    else:
        site_list = [Site.parse(s) for s in sites] if sites is not None else discover_sites(model, head)
        want = site_list

    def in_stage(module: str, stage: str) -> bool:
        if stage == "__final__":
            return any(module == f or module.startswith(f + ".") for f in final)
        return module == stage or module.startswith(stage + ".")

    def module_of(w):
        return w if isinstance(w, str) else w.module

    stray = [module_of(w) for w in want if not any(in_stage(module_of(w), s) for s in stage_names)]
    if stray:
        raise MergelabError(f"layered stats: '{stray[0]}' is outside the decoder layers, final norm "
                            f"and LM head (the stages streamed); use the whole-model pass")

    grams, counts, stats_parts = {}, {}, []
    data_masks = _StageData(masks)
    for si, stage_name in enumerate(stage_names):
        mine = [w for w in want if in_stage(module_of(w), stage_name)]
        if stage_name == "__final__":
            subs = [f"{prefix}.norm", "lm_head"]
        else:
            subs = [stage_name]
        with contextlib.ExitStack() as es:
            loaded = [es.enter_context(loader.loaded(s)) for s in subs]
            if stage_name == "__final__":
                norm, lm_head = loaded

                def run(i, norm=norm, lm_head=lm_head):
                    return lm_head(norm(hidden[i]))
            else:
                layer = loaded[0]

                def run(i, layer=layer, li=si):
                    args, kw = layer_args[i][li]
                    out = layer(hidden[i], *args, **kw)
                    return out[0] if isinstance(out, (tuple, list)) else out
            stage = _Stage(run, len(masks), keep=stage_name != "__final__")
            for s, sub in zip(subs, loaded):
                _attach(stage, s, sub)
            try:
                if not mine:
                    with torch.no_grad():
                        for b in data_masks:
                            stage(**b)
                elif kind == "gram":
                    g = gram_matrices(stage, data_masks, [module_of(w) for w in mine], shard=False,
                                      progress=progress)
                    grams.update(g)
                    counts.update(g.counts)
                else:
                    stats_parts.append(activation_stats(stage, data_masks, mine, head=None,
                                                        shard=False, progress=progress))
            finally:
                for s in subs:                 # detach the shared submodules from the stage
                    parent_path, _, leaf = s.rpartition(".")
                    parent = stage.get_submodule(parent_path) if parent_path else stage
                    del parent._modules[leaf]
            if stage_name != "__final__":
                hidden = stage.outputs
    if kind == "gram":
        order = [f"{n}.weight" for n in want]
        return Grams({k: grams[k] for k in order}, {k: counts[k] for k in order})
    names = [s for st in stats_parts for s in st.sites]
    return Stats(names, {n: st.mean[n] for st in stats_parts for n in st.sites},
                 {n: st.std[n] for st in stats_parts for n in st.sites},
                 {n: st.count[n] for st in stats_parts for n in st.sites})
