"""mergekit's ``tokenizer_source`` / ``tokenizer:``: the output vocabulary, each model read
through a :class:`VocabView` whose embedding/LM-head rows follow it, and the output's
tokenizer files; plus ``chat_template``.

The models that count are every model the recipe names (``Recipe.model_refs``: the base, then
``models`` or every ``slices`` source).
Output vocabulary: ``base`` = the base model's tokenizer (the first model's without a base),
``union`` = that tokenizer plus every other model's tokens it lacks (in model order, then id
order; added as added tokens, special where they were special), ``PATH`` / ``model:PATH`` =
that model's tokenizer; tokens named under ``tokenizer.tokens`` that it lacks are appended;
``pad_to_multiple_of`` pads the row count (each model's padding rows are the mean of its
other rows, as mergekit initialises them).

Each vocabulary tensor of an input is remapped with the tokenizer of the model supplying it (a
``slices`` slot view reads the embeddings from the first slice's sources and the LM head from
the last's).  The rows of a model for a token it lacks (mergekit's defaults, among the models
supplying that tensor): the base model's row if the base has the token, else the row of the
only model that has it, else the mean of the rows of the models that have it, else zero.
``tokens.<t>.source`` (a model path, ``{kind: zero}`` or ``{kind: model_token, model, token |
token_id}``) replaces that default; with ``force: true`` it replaces the row of every model.
The vocabulary tensors are the tensors outside the layers whose first dimension is the
supplying model's config ``vocab_size`` (embeddings, an untied LM head and its bias), so no
tensor name is assumed.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import MergelabError
from ..recipe import ModelEntry, Recipe, TokenizerSection, TokenSourceSpec, layer_index
from .view import VocabView

# a widely used chat format, for ``chat_template: chatml``
CHAT_TEMPLATES = {
    "chatml": ("{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
               " + '<|im_end|>' + '\\n' }}{% endfor %}{% if add_generation_prompt %}"
               "{{ '<|im_start|>assistant\\n' }}{% endif %}"),
}
_STALE = ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "added_tokens.json", "spiece.model")


@dataclass(eq=False)   # compared by identity
class _Model:
    key: str              # the recipe reference
    inp: Any              # engine Input
    folder: Path
    tok: Any              # tokenizers.Tokenizer
    vocab: dict[str, int]
    rows: int             # config vocab_size


@dataclass
class VocabOutput:
    tokenizer_json: str
    rows: int
    source_folder: Path                    # tokenizer_config.json / special_tokens_map.json from here
    ref_vocab: dict[str, int]              # the model whose config.json is copied
    out_vocab: dict[str, int]
    folders: list[Path] = field(default_factory=list)


def _load_tokenizer(folder: Path, where: str):
    from tokenizers import Tokenizer

    f = folder / "tokenizer.json"
    if not f.is_file():
        raise MergelabError(f"{where}: {folder} has no tokenizer.json (tokenizer merging reads each model's tokenizer.json)")
    try:
        return Tokenizer.from_file(str(f))
    except Exception as e:  # the tokenizers library's parse errors
        raise MergelabError(f"{f}: not a valid tokenizer.json ({str(e).splitlines()[0][:200]})") from None


def _origin(ckpt: Any, name: str) -> tuple[Any, str]:
    """The checkpoint a view reads ``name`` from (a slices slot view: that layer's source)."""
    f = getattr(ckpt, "origin", None)
    return f(name) if callable(f) else (ckpt, name)


def vocab_tensors(ckpt: Any, rows: int | Callable[[str], int]) -> list[str]:
    """The tensors outside the layers whose first dimension is the config vocab_size (``rows``,
    or ``rows(name)``: that of the model supplying the tensor): embeddings, LM head, its bias."""
    out = []
    for n in ckpt.keys():
        s = tuple(ckpt.shape(n))
        if layer_index(n) is None and s and (len(s) == 2 or n.endswith("bias")) \
                and s[0] == (rows(n) if callable(rows) else rows):
            out.append(n)
    return out


def section(r: Recipe) -> TokenizerSection | None:
    if r.tokenizer is not None and r.tokenizer_source is not None:
        raise MergelabError("recipe: 'tokenizer_source' and 'tokenizer' both given; use one")
    if r.tokenizer_source is not None:
        return TokenizerSection(source=r.tokenizer_source)
    return r.tokenizer


def expand(r: Recipe, inputs: dict | None, opener: Callable[[Any, str], Any], folder_of: Callable,
           refs: list[tuple[str, Any]] | None = None) -> tuple[Recipe, dict]:
    """The recipe rewritten over per-input :class:`VocabView` s (names ``__vocab_i`` in inputs).

    ``r`` is a ``models:`` recipe, possibly the rewrite of a ``slices:`` recipe over slot views;
    ``refs`` (default: ``r.model_refs()``) are the models the recipe as written names, base
    first: their tokenizers make the output vocabulary.  Each vocabulary tensor of an input is
    remapped with the vocabulary of the model that supplies it (a slot view names it through
    ``origin``), and a missing token's default row is taken among the models that supply that
    tensor to the merge (mergekit plans the embeddings with the first slice's sources and the
    LM head with the last slice's)."""
    sec = section(r)
    refs = r.model_refs() if refs is None else refs
    if r.slices is not None:   # the caller rewrites slices first (engine/planning.py)
        raise MergelabError("recipe: tokenizer merging needs the 'slices' recipe rewritten over slot views first")
    models: list[_Model] = []
    by_ckpt: dict[int, _Model] = {}
    ref_models: list[_Model] = []
    for where, ref in refs:
        inp = opener(ref, where)
        m = by_ckpt.get(id(inp.ckpt))
        if m is None:
            folder = folder_of(inp)
            if folder is None:
                raise MergelabError(f"{where}: tokenizer merging needs model folders (with tokenizer.json), found an in-memory model")
            tok = _load_tokenizer(folder, where)
            cfg = getattr(inp.ckpt, "config", None) or {}
            rows = cfg.get("vocab_size")
            if not isinstance(rows, int):
                raise MergelabError(f"{where}: {folder}/config.json has no integer 'vocab_size' (needed to find the embedding rows)")
            m = _Model(str(ref), inp, folder, tok, tok.get_vocab(with_added_tokens=True), rows)
            by_ckpt[id(inp.ckpt)] = m
            models.append(m)
        ref_models.append(m)
    first = models[0]   # the base model, else the first model named (config.json comes from it)
    base = ref_models[0] if r.base_model is not None else None

    # the merge's inputs (the base first): plain checkpoints, or slot views over several models
    entries = ([("base_model", r.base_model)] if r.base_model is not None else []) + \
              [(f"models[{i}].model", m.model) for i, m in enumerate(r.models)]
    ents: list[Any] = []          # distinct inputs
    ent_of: list[int] = []        # entry -> index in ents
    for where, ref in entries:
        inp = opener(ref, where)
        k = next((i for i, e in enumerate(ents) if e.ckpt is inp.ckpt), None)
        if k is None:
            ents.append(inp)
            k = len(ents) - 1
        ent_of.append(k)

    def supplier(inp: Any, n: str) -> _Model:
        c, there = _origin(inp.ckpt, n)
        m = by_ckpt.get(id(c))
        if m is None or there != n:
            raise MergelabError(f"{inp.label}: vocabulary tensor '{n}' is read from outside the recipe's models")
        return m

    e0 = ents[0]
    names = vocab_tensors(e0.ckpt, lambda n: supplier(e0, n).rows)
    if not names:
        raise MergelabError(f"{first.inp.label}: no tensor outside the layers has config vocab_size = {first.rows} rows")
    for e in ents[1:]:
        for n in names:
            if n not in e.ckpt:
                raise MergelabError(f"{e.label}: vocabulary tensor '{n}' missing")
            m = supplier(e, n)
            if tuple(e.ckpt.shape(n))[0] != m.rows:
                raise MergelabError(f"{m.inp.label}: vocabulary tensor '{n}' does not have {m.rows} rows (its config vocab_size)")
    # tensors supplied by the same models (in input order) share their row plan
    groups: dict[tuple[int, ...], list[str]] = {}
    for n in names:
        groups.setdefault(tuple(id(supplier(e, n)) for e in ents), []).append(n)

    extras: dict[str, _Model] = {}   # source models outside the merge

    def model_at(path: Any, what: str) -> _Model:
        s = str(path)
        if s.startswith("model:"):
            s = s[len("model:"):]
        for m in models:
            if s == m.key or Path(r.resolve_path(s)).absolute() == m.folder.absolute():
                return m
        folder = Path(r.resolve_path(s))
        if not folder.is_dir():
            raise MergelabError(f"{what} '{path}': not base, union or a model folder of the recipe (no such folder)")
        m = extras.get(str(folder.absolute()))
        if m is None:
            inp = opener(str(folder), what)
            tok = _load_tokenizer(folder, what)
            rows = (getattr(inp.ckpt, "config", None) or {}).get("vocab_size")
            m = _Model(s, inp, folder, tok, tok.get_vocab(with_added_tokens=True), rows if isinstance(rows, int) else 0)
            extras[str(folder.absolute())] = m
        return m

    # -- the output tokenizer ----------------------------------------------------------
    from tokenizers import AddedToken, Tokenizer

    src = sec.source
    if src in ("base", "union"):
        src_model = first
    else:
        src_model = model_at(src, "tokenizer source")
    out_tok = Tokenizer.from_str(src_model.tok.to_str())
    have = set(out_tok.get_vocab(with_added_tokens=True))
    new: list = []
    if src == "union":
        for m in models:
            special = {t.content for t in m.tok.get_added_tokens_decoder().values() if t.special}
            for t, _ in sorted(m.vocab.items(), key=lambda kv: kv[1]):
                if t not in have:
                    have.add(t)
                    new.append(AddedToken(t, special=t in special, normalized=t not in special))
    for t in sec.tokens:
        if t not in have:
            have.add(t)
            new.append(AddedToken(t, special=True, normalized=False))
    if new:
        out_tok.add_tokens(new)
    out_vocab = out_tok.get_vocab(with_added_tokens=True)
    rows = n_tok = max(out_vocab.values()) + 1
    if sec.pad_to_multiple_of:
        k = sec.pad_to_multiple_of
        rows = -(-rows // k) * k
    id_to_tok: list[str | None] = [None] * rows
    for t, i in out_vocab.items():
        id_to_tok[i] = t

    # -- explicit rows (tokens.<t>.source), the same for every vocabulary tensor ----------
    ckpts = [m.inp.ckpt for m in models]            # term sources; source models outside the merge appended

    def cindex(c) -> int:
        for k, x in enumerate(ckpts):
            if x is c:
                return k
        ckpts.append(c)
        return len(ckpts) - 1

    explicit: dict[int, list[tuple[int, int]]] = {}  # output row -> (checkpoint index, source row) terms
    explicit_from: dict[int, tuple[_Model, str]] = {}
    forced: list[int] = []
    for t, spec in sec.tokens.items():
        s = spec.source
        if s is None:
            continue
        where = f"tokenizer.tokens.{t}.source"
        o = out_vocab[t]
        if spec.force:
            forced.append(o)
        if isinstance(s, TokenSourceSpec):
            if s.kind == "zero":
                explicit[o] = []
                continue
            if s.kind != "model_token":
                raise MergelabError(f"{where}: unknown kind '{s.kind}' (expected zero or model_token)")
            if s.model is None or (s.token is None) == (s.token_id is None):
                raise MergelabError(f"{where}: model_token needs 'model' and exactly one of 'token', 'token_id'")
            m = model_at(s.model, where)
            i = s.token_id if s.token_id is not None else m.vocab.get(s.token)
            if i is None or not (0 <= i < m.rows):
                raise MergelabError(f"{where}: token {s.token if s.token is not None else s.token_id!r} is not in {m.key}")
        else:
            m = model_at(s, where)
            i = m.vocab.get(t)
            if i is None or i >= m.rows:
                raise MergelabError(f"{where}: token '{t}' is not in {m.key}")
        explicit[o] = [(cindex(m.inp.ckpt), i)]
        explicit_from[o] = (m, where)
    for m, where in explicit_from.values():   # a source outside a tensor's suppliers must hold that tensor
        for n in names:
            if n not in m.inp.ckpt or tuple(m.inp.ckpt.shape(n))[0] != m.rows:
                raise MergelabError(f"{where}: {m.key} has no vocabulary tensor '{n}' with {m.rows} (its vocab_size) rows")
    special = torch.zeros(rows, dtype=torch.bool)
    special[list(explicit)] = True
    eo = [(o, c, r_) for o, ts in explicit.items() for c, r_ in ts]
    not_forced = torch.ones(rows, dtype=torch.bool)
    not_forced[forced] = False

    # -- per group of tensors: each supplier's rows, the defaults among the suppliers ------
    tables: list[dict[str, tuple]] = [{} for _ in ents]
    for key, gnames in groups.items():
        sup = [supplier(e, gnames[0]) for e in ents]
        gm: list[_Model] = []
        for m in sup:
            if m not in gm:
                gm.append(m)
        gbase = sup[ent_of[0]] if base is not None else None   # the base input's supplier
        # idx[j, o]: supplier j's row of output token o, -1 when it lacks the token
        idx = torch.full((len(gm), rows), -1, dtype=torch.long)
        for j, m in enumerate(gm):
            col = torch.tensor([m.vocab.get(t, -1) if t is not None else -1 for t in id_to_tok], dtype=torch.long)
            col[col >= m.rows] = -1
            idx[j] = col
        has = idx >= 0
        parts = []                                     # default terms: (out, checkpoint, source row, weight)
        bj = gm.index(gbase) if gbase is not None else None
        use_base = (has[bj] & ~special) if bj is not None else torch.zeros(rows, dtype=torch.bool)
        if bj is not None:
            o = use_base.nonzero().flatten()
            parts.append((o, torch.full_like(o, cindex(gbase.inp.ckpt)), idx[bj, o], torch.ones(len(o))))
        count = has.sum(0).clamp(min=1).float()
        mean = ~special & ~use_base
        for j, m in enumerate(gm):
            o = (mean & has[j]).nonzero().flatten()
            parts.append((o, torch.full_like(o, cindex(m.inp.ckpt)), idx[j, o], 1.0 / count[o]))
        if eo:
            parts.append((torch.tensor([x[0] for x in eo]), torch.tensor([x[1] for x in eo]),
                          torch.tensor([x[2] for x in eo]), torch.ones(len(eo))))
        d_out, d_c, d_src, d_w = (torch.cat([p[i] for p in parts]) for i in range(4))
        for k, e in enumerate(ents):
            j = gm.index(sup[k])
            mine = has[j] & not_forced
            o = mine.nonzero().flatten()
            keep = ~mine[d_out]
            out_ = torch.cat([o, d_out[keep]])
            order = torch.sort(out_, stable=True).indices
            table = (out_[order], torch.cat([torch.full_like(o, cindex(gm[j].inp.ckpt)), d_c[keep]])[order],
                     torch.cat([idx[j, o], d_src[keep]])[order], torch.cat([torch.ones(len(o)), d_w[keep].float()])[order])
            for n in gnames:
                tables[k][n] = table

    views = {}
    for k, e in enumerate(ents):
        cfg = dict(getattr(e.ckpt, "config", None) or {}, vocab_size=rows)
        views[f"__vocab_{k}"] = VocabView(e.ckpt, tables[k], rows, ckpts, cfg, e.label, pad_from=n_tok)
    off = 1 if r.base_model is not None else 0
    new_models = [ModelEntry(model=f"__vocab_{ent_of[off + i]}", parameters=e.parameters) for i, e in enumerate(r.models)]
    r2 = r.model_copy(update={"models": new_models, "base_model": "__vocab_0" if r.base_model is not None else None})
    for k in ("_base_dir", "_card_yaml", "_layer_count"):
        if getattr(r, k, None) is not None:
            setattr(r2, k, getattr(r, k))
    r2._card_yaml = getattr(r, "_card_yaml", None) or r.to_yaml()
    r2._vocab = VocabOutput(out_tok.to_str(), rows, src_model.folder, first.vocab, out_vocab,
                            [m.folder for m in models])
    return r2, {**(inputs or {}), **views}


# ------------------------------------------------------------------ output files
def _read_json(p: Path) -> dict:
    try:
        d = json.loads(p.read_text())
        return d if isinstance(d, dict) else {}
    except (OSError, ValueError):
        return {}


def resolve_chat_template(value: str, folders: list[Path]) -> str:
    """``auto`` (the template most of the models use), a known name, or a Jinja template."""
    if value == "auto":
        found = [t for f in folders if isinstance(t := _read_json(f / "tokenizer_config.json").get("chat_template"), str)]
        if not found:
            raise MergelabError("recipe: chat_template: auto, but no model's tokenizer_config.json has a chat_template")
        return Counter(found).most_common(1)[0][0]
    if value in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[value]
    if "{{" in value or "{%" in value:
        return value
    raise MergelabError(f"recipe: chat_template '{value}' is not auto, {', '.join(CHAT_TEMPLATES)} or a Jinja template")


def write_files(folder: Path, r: Recipe, model_folders: list[Path]) -> None:
    """Write the merged tokenizer (tokenizer.json, tokenizer_config.json), config.json's
    vocab_size and token ids, and the chat template into an output folder."""
    vo: VocabOutput | None = getattr(r, "_vocab", None)
    tc_path = folder / "tokenizer_config.json"
    if vo is not None:
        if vo.out_vocab != vo.ref_vocab:  # the copied model's other vocabulary files no longer match
            for f in _STALE:
                (folder / f).unlink(missing_ok=True)
        (folder / "tokenizer.json").write_text(vo.tokenizer_json)
        tc = _read_json(vo.source_folder / "tokenizer_config.json")
        from tokenizers import Tokenizer

        dec = Tokenizer.from_str(vo.tokenizer_json).get_added_tokens_decoder()
        tc["added_tokens_decoder"] = {str(i): {"content": t.content, "lstrip": t.lstrip, "rstrip": t.rstrip,
                                               "normalized": t.normalized, "single_word": t.single_word,
                                               "special": t.special} for i, t in sorted(dec.items())}
        tc_path.write_text(json.dumps(tc, indent=2) + "\n")
        stm = vo.source_folder / "special_tokens_map.json"
        if stm.is_file():
            (folder / "special_tokens_map.json").write_text(stm.read_text())
        inv = {i: t for t, i in vo.ref_vocab.items()}
        for name in ("config.json", "generation_config.json"):  # copied from the first model: its token ids
            cfg_path = folder / name
            cfg = _read_json(cfg_path)
            if not cfg:
                continue
            if name == "config.json":
                cfg["vocab_size"] = vo.rows
            for k in ("bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
                v = cfg.get(k)
                ids = v if isinstance(v, list) else [v]
                if ids and all(isinstance(x, int) and not isinstance(x, bool) for x in ids):
                    mapped = [vo.out_vocab.get(inv.get(x, ""), x) for x in ids]
                    cfg[k] = mapped if isinstance(v, list) else mapped[0]
            cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    if r.chat_template is not None:
        tmpl = getattr(r, "_chat_template", None) or resolve_chat_template(r.chat_template, model_folders)
        tc = _read_json(tc_path) if tc_path.is_file() else {}
        tc["chat_template"] = tmpl
        tc_path.write_text(json.dumps(tc, indent=2) + "\n")
        (folder / "chat_template.jinja").unlink(missing_ok=True)
