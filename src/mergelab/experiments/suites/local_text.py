"""``local-text``: merging MiniLM fine-tunes of five text tasks (the local setting).

Tasks (:data:`mergelab.experiments.data.TEXT_TASKS`): Rotten Tomatoes sentiment (fresh vs
rotten), review-vs-plot subjectivity, 20 Newsgroups, Reuters R8, 2016 election-tweet
authorship. Every expert is fine-tuned from the real MiniLM-L6 weights with its own linear
head; the lower ``first_trainable`` transformer layers and the embeddings stay frozen.

Because the frozen part is shared bit-for-bit by every expert (and so by every merge of them,
for every method: task vectors, trimmed or Fisher/Gram-weighted, are zero there, and TACT's
correction at a frozen site is the identity), its output is computed once per text and
cached; the experts, merges and TACT then run on :class:`MiniLMTop` - the real upper MiniLM
layers, mean pooling and the head. ``tests/test_experiments_text.py`` checks this equals the
full model.

Methods (through the registry): task arithmetic, TIES, TIES+TALL, Fisher (one sampled label
per example: the exact expectation costs one backward pass per class, 20 for 20 Newsgroups),
RegMean; no
alignment (all experts share the pre-trained init); each without and with TACT. Coefficients
are chosen on the validation split. Heads are never merged.
"""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from ...progress import progress

from .. import data as D
from .. import train as T
from .. import zoo
from ..seeds import seed_base
from .common import Timer, choose, data_free_bodies, merge_state, versions

TASKS = list(D.TEXT_TASKS)
METHODS = ["task_arithmetic", "ties", "ties_tall", "fisher", "regmean"]

PROFILES: dict[str, dict[str, Any]] = {
    # smoke: plumbing only (a few steps, short texts, the top two layers), still the real MiniLM
    "smoke": dict(max_len=32, first_trainable=4, probe_steps=4, steps=10, batch=16, lr=2e-4, probe_lr=3e-3,
                  train_limit=128, val_limit=32, test_limit=64, stat_batches=2, stat_batch=16,
                  fisher_examples=16, fisher_mode="sampled", methods=METHODS, corrections=["none", "tact"],
                  grid_ta=[0.3, 1.0], grid_ties=[1.0], grid_tall=[1.0], ties_density=0.5,
                  regmean_alpha=[0.9], tact_sites="norms"),
    # quick: <= 15 CPU-min for 3 seeds; the data phase (MiniLM load + encoding, ~139 CPU s) runs
    # once per process, the rest per seed. Only the top layer trains. With a 10-step probe at
    # 3e-3 the 3-seed run (2026-11-27) measured 139 + ~252 CPU s a seed, but the 20-class
    # 20newsgroups expert stayed near chance in two seeds (test 0.21 / 0.20 / 0.47), so merges
    # "beat" it and normalised accuracies read 1.07 +- 0.35. A 40-step probe at 1e-2 gives
    # 0.54 / 0.44 on two seeds (10 steps at 3e-3: 0.88 / 0.34; 80 steps: 0.54 / 0.45), ~4 CPU s
    # an expert more; 250 test texts pay for it. 3 seeds in one process then measured 931 CPU s
    # (15.5 min at load 3: Fisher 92, RegMean grams 74, TACT 74 of it), so Fisher on 64 examples
    # and REPAIR/TACT/RegMean statistics on 3 batches of 32: 840 CPU s measured (14.0 min)
    "quick": dict(max_len=64, first_trainable=5, probe_steps=40, steps=80, batch=32, group_by_length=8,
                  lr=1e-4, probe_lr=1e-2,
                  train_limit=1500, val_limit=150, test_limit=250, stat_batches=3, stat_batch=32,
                  fisher_examples=64, fisher_mode="sampled", methods=METHODS, corrections=["none", "tact"],
                  grid_ta=[0.3, 0.5, 0.7], grid_ties=[1.0, 1.5], grid_tall=[1.0],
                  ties_density=0.5, regmean_alpha=[0.9], tact_sites="norms"),
    # full: 22.4 CPU-min for 3 seeds measured (of the 90 for all four full suites). With layers 4-5
    # trained, 20 + 100 steps, 200 / 400 texts, 2 seeds measured (2026-11-27) 248 CPU s data +
    # ~687 s a seed (training 310): 38.5 min for 3, so only the top layer trains, as in quick
    # (about half of training, statistics and evaluation; encoding through one more frozen
    # layer), with quick's 40-step probe at 1e-2 (the 20-class expert needs it, see quick)
    "full": dict(max_len=64, first_trainable=5, probe_steps=40, steps=100, batch=32, group_by_length=8,
                 lr=1e-4, probe_lr=1e-2,
                 train_limit=4000, val_limit=200, test_limit=400, stat_batches=6, stat_batch=32,
                 fisher_examples=192, fisher_mode="sampled", methods=METHODS, corrections=["none", "tact"],
                 grid_ta=[0.3, 0.5, 0.7, 1.0], grid_ties=[1.0, 1.5, 2.0],
                 grid_tall=[0.4, 1.0], ties_density=0.5, regmean_alpha=[0.5, 0.9],
                 tact_sites="norms"),
}


class Unavailable(Exception):
    """A library piece this run needs is missing (recorded as a note, the run goes on)."""


# ----------------------------------------------------------------------------- the model

def additive_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (N, T) 0/1 mask as the (N, 1, 1, T) additive attention mask BERT layers take."""
    return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min


class MiniLMTop(zoo.Classifier):
    """The upper MiniLM layers (from ``first``), mean pooling over real tokens, a linear head.

    Input: ``{"hidden": (N, T, 384) hidden states after layer ``first - 1``,
    "attention_mask": (N, T)}`` as one dict or as keywords (the statistics passes call
    ``model(**batch)``). The mask may also be the (N, 1, 1, T) additive form (what
    ``mergelab.stats`` hands Hugging Face models under ``vmap``)."""

    def __init__(self, bert: nn.Module, first: int, n_classes: int):
        super().__init__()
        self.config = bert.config  # lets the statistics passes pick eager attention under vmap
        self.layers = nn.ModuleList(copy.deepcopy(list(bert.encoder.layer[first:])))
        self.head = nn.Linear(bert.config.hidden_size, n_classes)

    def features(self, x):
        h, m = x["hidden"], x["attention_mask"]
        if m.ndim == 4:
            ext, keep = m.to(h.dtype), (m[:, 0, 0, :] == 0).to(h.dtype)
        else:
            ext, keep = additive_mask(m, h.dtype), m
        for layer in self.layers:
            out = layer(h, attention_mask=ext)
            h = out[0] if isinstance(out, tuple) else out
        return zoo.mean_pool(h, keep)

    def forward(self, x=None, **kwargs):
        return self.head(self.features(x if x is not None else kwargs))


@torch.no_grad()
def lower_hidden(bert: nn.Module, first: int, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Hidden states after the embeddings and layers ``0..first-1`` (eval mode)."""
    bert.eval()
    h = bert.embeddings(input_ids=input_ids)
    ext = additive_mask(mask, h.dtype)
    for layer in bert.encoder.layer[:first]:
        out = layer(h, attention_mask=ext)
        h = out[0] if isinstance(out, tuple) else out
    return h


# ----------------------------------------------------------------------------- data

class Encoded:
    """One task split: cached lower hidden states, masks and labels."""

    def __init__(self, hidden: torch.Tensor, mask: torch.Tensor, labels: np.ndarray):
        self.hidden, self.mask, self.labels = hidden, mask, torch.as_tensor(labels)

    def __len__(self):
        return len(self.labels)

    def batch(self, idx) -> tuple[dict, torch.Tensor]:
        m = self.mask[idx]
        t = max(1, int(m.sum(1).max()))  # trim the padding no text of this batch uses
        return {"hidden": self.hidden[idx][:, :t], "attention_mask": m[:, :t]}, self.labels[idx]

    def sampler(self, group: int = 1):
        """Uniform random batches (with replacement). With ``group`` > 1, batches are grouped by
        length (the ``group_by_length`` of common trainers): ``group`` batches' worth of uniform
        draws are sorted by length, cut into ``group`` batches and served in random order, so
        each batch is padded to a similar length; every example is still drawn uniformly."""
        if group <= 1:
            def sample(g: torch.Generator, bs: int):
                return self.batch(torch.randint(len(self), (bs,), generator=g))
            return sample
        lengths = self.mask.sum(1)
        queue: list[torch.Tensor] = []

        def sample_grouped(g: torch.Generator, bs: int):
            if not queue:
                idx = torch.randint(len(self), (bs * group,), generator=g)
                idx = idx[torch.argsort(lengths[idx], stable=True)]
                chunks = list(idx.split(bs))
                queue.extend(chunks[int(i)] for i in torch.randperm(len(chunks), generator=g))
            return self.batch(queue.pop(0))
        return sample_grouped

    def loader(self, batch: int = 64, n_batches: int | None = None) -> list:
        """Batches in data order (the first ``n_batches`` are a fixed, unbiased subset)."""
        out = [self.batch(torch.arange(i, min(i + batch, len(self)))) for i in range(0, len(self), batch)]
        return out[:n_batches] if n_batches else out

    def eval_loader(self, batch: int = 64) -> list:
        """Every example once, batched by length (shortest first) so each batch is trimmed to
        little padding: for full passes whose result does not depend on order (accuracy)."""
        if getattr(self, "_eval", None) is None or self._eval[0] != batch:
            order = torch.argsort(self.mask.sum(1), stable=True)
            self._eval = (batch, [self.batch(order[i:i + batch]) for i in range(0, len(self), batch)])
        return self._eval[1]


def encode(bert: nn.Module, tokenizer, texts: list[str], labels: np.ndarray, max_len: int, first: int,
           chunk: int = 64) -> Encoded:
    """Tokenise (truncating to ``max_len``) and run the frozen lower layers, ``chunk`` texts of
    similar length at a time, each chunk trimmed to its longest text; stored zero-padded to ``max_len`` (padding is masked
    everywhere downstream, so its values never matter)."""
    n = len(texts)
    hidden = torch.zeros(n, max_len, bert.config.hidden_size)
    mask = torch.zeros(n, max_len, dtype=torch.long)
    tok = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len, return_tensors="pt")
    # chunks of similar length (sorted by token count) so the per-chunk padding is small
    order = torch.argsort(tok["attention_mask"].sum(1), stable=True)
    for i in range(0, n, chunk):
        idx = order[i:i + chunk]
        m = tok["attention_mask"][idx]
        t = max(1, int(m.sum(1).max()))
        hidden[idx, :t] = lower_hidden(bert, first, tok["input_ids"][idx, :t], m[:, :t])
        mask[idx, :t] = m[:, :t]
    return Encoded(hidden, mask, labels)


class TextData:
    def __init__(self, profile: dict, bert: nn.Module, tokenizer, quiet: bool):
        self.p = profile
        self.tasks = {t: D.text_task(t) for t in TASKS}
        self.enc: dict[tuple[str, str], Encoded] = {}
        lim = {"train": profile["train_limit"], "val": profile["val_limit"], "test": profile["test_limit"]}
        jobs = [(t, s) for t in TASKS for s in ("train", "val", "test")]
        for t, s in progress(jobs, desc="encode (frozen layers)", disable=quiet):
            texts = self.tasks[t].texts[s][: lim[s]]
            labels = self.tasks[t].labels[s][: lim[s]]
            self.enc[(t, s)] = encode(bert, tokenizer, texts, labels, profile["max_len"], profile["first_trainable"])

    def n_classes(self, task: str) -> int:
        return len(self.tasks[task].classes)

    def split_hashes(self) -> dict[str, str]:
        return {t: d.split_hash for t, d in self.tasks.items()}


# ----------------------------------------------------------------------------- library seams

def _fisher(model: nn.Module, data: list, n: int, mode: str) -> dict[str, torch.Tensor]:
    try:
        from ...stats import diagonal_fisher
    except ImportError as e:
        raise Unavailable(f"mergelab.stats.diagonal_fisher is not available ({e})") from None
    return dict(diagonal_fisher(model, data, mode=mode, n_examples=n, seed=0, chunk_size=32, progress=False))


def _grams(model: nn.Module, data: list) -> dict[str, torch.Tensor]:
    try:
        from ...stats import gram_matrices
    except ImportError as e:
        raise Unavailable(f"mergelab.stats.gram_matrices is not available ({e})") from None
    return dict(gram_matrices(model, data, exclude_head="head", progress=False))


def tact_sites(model: MiniLMTop, kind: str) -> list[str] | None:
    """``"norms"``: every LayerNorm output (the post-LN blocks' outputs) and the head input;
    ``"default"``: the library's default sites."""
    if kind == "default":
        return None
    return [n for n, m in model.named_modules() if isinstance(m, nn.LayerNorm)] + ["head:input"]


def _tact(merged: nn.Module, experts: dict[str, nn.Module], data: dict[str, list], sites):
    try:
        from ...repair import tact
    except ImportError as e:
        raise Unavailable(f"mergelab.repair.tact is not available ({e})") from None
    return tact(merged, experts, data, sites=sites, head="head", progress=False)


def _site_std(model, data: list, sites: list[str]) -> dict[str, torch.Tensor]:
    try:
        from ...stats import activation_stats
    except ImportError as e:
        raise Unavailable(f"mergelab.stats.activation_stats is not available ({e})") from None
    st = activation_stats(model, data, sites=sites, head=None, progress=False)
    return {s: st.std[s] for s in sites}


class _TaskModule(nn.Module):
    """A task-conditioned model fixed to one task (so it evaluates like a plain model)."""

    def __init__(self, tcm: nn.Module, task: str):
        super().__init__()
        self.tcm, self.task = tcm, task

    def forward(self, x=None, **kwargs):
        return self.tcm(x if x is not None else kwargs, task=self.task)


# ----------------------------------------------------------------------------- training

class Trainer:
    def __init__(self, profile: dict, data: TextData, bert: nn.Module, cache: T.ExpertCache, quiet: bool):
        self.p, self.data, self.bert, self.cache, self.quiet = profile, data, bert, cache, quiet
        self.base_cfg = {"suite": "local-text", "model": D.MINILM_DIST, "max_len": profile["max_len"],
                         "first_trainable": profile["first_trainable"], "batch": profile["batch"],
                         "train_limit": profile["train_limit"], "splits": data.split_hashes()}

    def pretrained(self, n_classes: int = 2) -> MiniLMTop:
        return MiniLMTop(self.bert, self.p["first_trainable"], n_classes).eval()

    def expert(self, task: str, seed: int) -> tuple[nn.Module, dict]:
        """Linear probe (head only), then fine-tune the upper layers and the head (AdamW)."""
        p = self.p
        cfg = {**self.base_cfg, "kind": "expert", "task": task, "seed": seed, "steps": p["steps"],
               "probe": p["probe_steps"], "lr": p["lr"], "probe_lr": p["probe_lr"]}
        if p.get("group_by_length", 1) > 1:  # (absent from the key otherwise: older experts stay valid)
            cfg["group_by_length"] = p["group_by_length"]

        def build():
            return zoo.replace_head(self.pretrained(), self.data.n_classes(task), seed=seed)

        def fit(m):
            enc, group = self.data.enc[(task, "train")], p.get("group_by_length", 1)
            if p["probe_steps"]:
                T.train(m, enc.sampler(group), steps=p["probe_steps"], batch_size=p["batch"], lr=p["probe_lr"],
                        optimizer="adamw",
                        weight_decay=0.0, seed=seed, trainable=lambda n: n.startswith("head."),
                        quiet=self.quiet, desc=f"probe {task}")
            T.train(m, enc.sampler(group), steps=p["steps"], batch_size=p["batch"], lr=p["lr"], optimizer="adamw",
                    weight_decay=0.01, warmup=max(1, p["steps"] // 10), seed=seed + 1, quiet=self.quiet,
                    desc=f"expert {task}")
            return {"val": T.evaluate(m, self.data.enc[(task, "val")].eval_loader())}
        return self.cache.get_or_train(cfg, build, fit)


# ----------------------------------------------------------------------------- the suite

def _with_state(template: nn.Module, body: dict, head_from: nn.Module) -> nn.Module:
    m = copy.deepcopy(template)
    m.load_state_dict({**head_from.state_dict(), **body})
    return m.eval()


def _need_methods(*names: str) -> None:
    from ...methods import _load_all  # noqa: F401
    from ...methods.registry import REGISTRY

    missing = [n for n in names if n not in REGISTRY]
    if missing:
        raise Unavailable(f"merge method(s) {', '.join(missing)} not registered in mergelab.methods")


_METHOD_NEEDS = {"task_arithmetic": ("task_arithmetic",), "ties": ("ties",), "ties_tall": ("tall_masks",),
                 "fisher": ("fisher",), "regmean": ("regmean",)}


def _grid(method: str, p: dict) -> list:
    return {"task_arithmetic": p["grid_ta"], "ties": p["grid_ties"], "ties_tall": p["grid_tall"],
            "fisher": [None], "regmean": p["regmean_alpha"]}[method]


# the frozen MiniLM and the encoded texts of a profile, shared by the seeds of one process
_DATA: dict[str, tuple[nn.Module, "TextData"]] = {}


def run(profile_name: str = "smoke", quiet: bool = False, cache_root: str | Path | None = None,
        seed: int = 0) -> dict:
    """One seed's results (``run_suite`` aggregates seeds and writes the report); the expert
    seeds are offset by ``seed_base(seed)``."""
    p = PROFILES[profile_name]
    base_seed = seed_base(seed)
    torch.manual_seed(base_seed)
    timer = Timer()
    t_start = time.perf_counter()
    notes: list[str] = []
    with timer("data"):
        if profile_name not in _DATA:
            bert = zoo.minilm_classifier(2).bert.eval()
            _DATA[profile_name] = (bert, TextData(p, bert, zoo.minilm_tokenizer(), quiet))
        bert, data = _DATA[profile_name]
    cache = T.ExpertCache(Path(cache_root) if cache_root else D.cache_dir() / "experts")
    tr = Trainer(p, data, bert, cache, quiet)
    results: dict[str, Any] = {
        "suite": "local-text", "profile": profile_name, "config": p,
        "seeds": {"run": seed, "experts": f"{base_seed} + task index"},
        "versions": versions(), "splits": data.split_hashes(), "tasks": TASKS,
        "n_classes": {t: data.n_classes(t) for t in TASKS}, "experts": {},
        "expert_val": {}, "runs": [], "variance_collapse": [], "barrier": [], "timings": timer.t,
        "timings_cpu": timer.cpu, "notes": notes}
    experts: dict[str, nn.Module] = {}
    with timer("train"):
        for i, t in enumerate(TASKS):
            experts[t], info = tr.expert(t, base_seed + i)
            results["expert_val"][t] = info.get("val", {}).get("acc")
    results["experts"]["local"] = {t: T.evaluate(experts[t], data.enc[(t, "test")].eval_loader())["acc"] for t in TASKS}
    base = dict(tr.pretrained().state_dict())
    states = {t: dict(m.state_dict()) for t, m in experts.items()}
    for method in p["methods"]:
        try:
            with timer(method):
                _run_method(results, method, states, base, experts, data, p, timer, notes)
        except Unavailable as e:
            notes.append(f"local/{method}: skipped: {e}")
    timer.t["total"] = round(time.perf_counter() - t_start, 2)
    results["cache"] = {"hits": cache.hits, "misses": cache.misses, "root": str(cache.root)}
    return results


def _merged_bodies(method, coef, states, base, experts, data, p, stat_cache) -> dict[str, dict]:
    """{task: merged body} (one shared body, or one per task for TALL)."""
    bodies = data_free_bodies(method, coef, base, states, TASKS, p["ties_density"])
    if bodies is not None:
        return bodies
    es = [states[t] for t in TASKS]
    if method in ("fisher", "regmean"):
        if method not in stat_cache:
            per_model = []
            for t in TASKS:
                enc = data.enc[(t, "train")]
                if method == "fisher":
                    per_model.append(_fisher(experts[t], enc.loader(p["stat_batch"]), p["fisher_examples"],
                                             p["fisher_mode"]))
                else:
                    per_model.append(_grams(experts[t], enc.loader(p["stat_batch"], p["stat_batches"])))
            stat_cache[method] = {"fisher" if method == "fisher" else "gram": per_model}
        m = merge_state(method, None, es, {} if method == "fisher" else {"alpha": coef}, stats=stat_cache[method])
    else:
        raise ValueError(method)
    return {t: m for t in TASKS}


def _run_method(results, method, states, base, experts, data, p, timer, notes):
    _need_methods(*_METHOD_NEEDS[method])
    stat_cache: dict = {}

    def models_for(coef):
        bodies = _merged_bodies(method, coef, states, base, experts, data, p, stat_cache)
        return {t: _with_state(experts[t], bodies[t], experts[t]) for t in TASKS}

    def val_score(coef):
        with timer("merge"):
            ms = models_for(coef)
        with timer("eval_val"):
            return float(np.mean([T.evaluate(ms[t], data.enc[(t, "val")].eval_loader())["acc"] for t in TASKS]))

    coef, scores = choose(_grid(method, p), val_score)
    with timer("merge"):
        merged = models_for(coef)
    corrected: dict[str, dict[str, nn.Module]] = {"none": merged}
    calib = {t: data.enc[(t, "train")].loader(p["stat_batch"], p["stat_batches"]) for t in TASKS}
    sites = tact_sites(experts[TASKS[0]], p["tact_sites"])
    if "tact" in p["corrections"]:
        try:
            with timer("tact"):
                if method == "ties_tall":  # one merged body per task: one TACT model per task
                    corrected["tact"] = {t: _TaskModule(_tact(merged[t], {t: experts[t]}, {t: calib[t]}, sites), t)
                                         for t in TASKS}
                else:
                    tcm = _tact(merged[TASKS[0]], experts, calib, sites)
                    corrected["tact"] = {t: _TaskModule(tcm, t) for t in TASKS}
        except Unavailable as e:
            notes.append(f"local/{method}/tact: skipped: {e}")
    for corr, ms in corrected.items():
        with timer("eval_test"):
            acc = {t: T.evaluate(ms[t], data.enc[(t, "test")].eval_loader())["acc"] for t in TASKS}
        results["runs"].append({"setting": "local", "method": method, "alignment": "none", "correction": corr,
                                "coef": {"coef": coef, "val_scores": scores}, "acc": acc})
    if method == ("ties_tall" if "ties_tall" in p["methods"] else p["methods"][0]) and sites is not None:
        with timer("variance_collapse"):
            _variance_collapse(results, method, corrected, experts, data, p, sites, notes)


def _variance_collapse(results, method, corrected, experts, data, p, sites, notes):
    """Per site: std of the merged model's activations / the expert's, on each task's val data."""
    ratios: dict[str, list[float]] = {}
    try:
        for corr, ms in corrected.items():
            per_task = []
            for t in TASKS:
                dl = data.enc[(t, "val")].loader(p["stat_batch"], p["stat_batches"])
                ex = _site_std(experts[t], dl, sites)
                mdl = ms[t]
                if isinstance(mdl, _TaskModule):
                    # the corrections live in hooks on tcm.model: read them at the same modules
                    with torch.no_grad():
                        mg = _site_std(_Fixed(mdl), dl, [f"m.tcm.model.{s}" for s in sites])
                    mg = {s: mg[f"m.tcm.model.{s}"] for s in sites}
                else:
                    mg = _site_std(mdl, dl, sites)
                per_task.append([float((mg[s] / ex[s].clamp_min(1e-8)).mean()) for s in sites])
            ratios[corr] = np.mean(per_task, axis=0).tolist()
    except Unavailable as e:
        notes.append(f"variance collapse: skipped: {e}")
        return
    results["variance_collapse"].append({"setting": "local", "label": f"{method}", "sites": sites, "ratios": ratios})


class _Fixed(nn.Module):
    """Wraps a task module so the statistics pass sees a plain ``model(**batch)``."""

    def __init__(self, m: nn.Module):
        super().__init__()
        self.m = m

    def forward(self, x=None, **kwargs):
        return self.m(x if x is not None else kwargs)
