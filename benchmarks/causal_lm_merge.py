"""Data-aware merges of causal LMs on real text: task arithmetic vs Fisher vs RegMean.

A tiny Llama (GQA, RMSNorm, rotary) is pretrained here from scratch on 20 Newsgroups + Rotten
Tomatoes (the offline corpora, `mergelab data install`), then two copies are fine-tuned on two
other domains: election tweets (A) and Reuters R8 news (B).  Each fine-tune's statistics are
taken with the CLI on its own domain's training text (`mergelab stats fisher|gram`), the
merges run from recipes (`mergelab merge`), and every model is scored by held-out perplexity
(next-token, padding masked) on each domain's test text.

    OMP_NUM_THREADS=1 python benchmarks/causal_lm_merge.py [--out runs/causal_lm_merge]

Prints a table and writes results.json.  A few minutes of one CPU core.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from mergelab.experiments import data as D  # noqa: E402

SEQ = 64


def clean(t: str) -> str:
    t = re.sub(r"https?://\S+", " ", t.lower())
    t = re.sub(r"[^a-z0-9 .,'!?]+", " ", t)
    return re.sub(r"\s+", " ", t).strip()


def corpora(seed: int = 0):
    r = random.Random(seed)
    news = [clean(x["Text"]) for x in D.load_orange("20newsgroups-train")]
    rt = [clean(x["text"]) for x in D.load_rotten_tomatoes()]
    tweets = [clean(x["Content"]) for x in D.load_orange("election-tweets-2016")]
    reuters = [clean(x["Text"]) for x in D.load_orange("reuters-r8-train")]
    reuters_test = [clean(x["Text"]) for x in D.load_orange("reuters-r8-test")]
    for lst in (news, rt, tweets, reuters, reuters_test):
        r.shuffle(lst)
    pre = [t for t in news[:3000] + rt[:3000] if len(t) > 40]
    tw = [t for t in tweets if len(t) > 20]
    return {"pretrain": pre,
            "A_train": tw[:2500], "A_test": tw[-400:],
            "B_train": [t for t in reuters if len(t) > 40][:2500],
            "B_test": [t for t in reuters_test if len(t) > 40][:400]}


def tokenizer(texts, folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Metaspace()
    tk.decoder = decoders.Metaspace()
    tk.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=256, special_tokens=["<pad>", "<eos>", "<unk>"]))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")
    return tok


def model(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ,
                      tie_word_embeddings=True, pad_token_id=0, eos_token_id=1, bos_token_id=1,
                      architectures=["LlamaForCausalLM"])
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def batches(tok, texts, bs, seed):
    r = random.Random(seed)
    while True:
        idx = [r.randrange(len(texts)) for _ in range(bs)]
        yield dict(tok([texts[i] for i in idx], padding=True, truncation=True, max_length=SEQ,
                       return_tensors="pt"))


def lm_loss(m, b):
    labels = b["input_ids"].masked_fill(b["attention_mask"] == 0, -100)
    return m(**b, labels=labels).loss


def train(m, tok, texts, steps, lr, seed, log):
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20))
    it = batches(tok, texts, 32, seed)
    for s in range(steps):
        loss = lm_loss(m, next(it))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
        opt.step()
        sched.step()
        if s % 100 == 0 or s == steps - 1:
            log(f"  step {s} loss {loss.item():.3f}")
    return m.eval()


@torch.no_grad()
def perplexity(folder: Path, tok, texts) -> float:
    from transformers import LlamaForCausalLM

    m = LlamaForCausalLM.from_pretrained(folder).eval()
    nll, n = 0.0, 0
    for s in range(0, len(texts), 50):
        b = dict(tok(texts[s:s + 50], padding=True, truncation=True, max_length=SEQ, return_tensors="pt"))
        logits = m(**b).logits[:, :-1].float()
        y = b["input_ids"][:, 1:]
        keep = (b["attention_mask"][:, 1:] * b["attention_mask"][:, :-1]).bool()
        lp = torch.log_softmax(logits, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
        nll -= float(lp[keep].sum())
        n += int(keep.sum())
    return math.exp(nll / n)


def cli(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"))
    r = subprocess.run([sys.executable, "-m", "mergelab", *args], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise SystemExit(f"mergelab {' '.join(args)} failed: {r.stderr.strip() or r.stdout.strip()}")
    return r.stdout.strip()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="runs/causal_lm_merge")
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--finetune-steps", type=int, default=200)
    ap.add_argument("--stats-texts", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0, help="corpus shuffle, initialisation, batch order")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log = print
    c = corpora(a.seed)
    tok = tokenizer(c["pretrain"], out)
    for k, v in c.items():
        log(f"{k}: {len(v)} texts")
    log("pretraining")
    base = train(model(len(tok), a.seed), tok, c["pretrain"], a.pretrain_steps, 3e-3, 1 + 10 * a.seed, log)
    base.save_pretrained(out / "base")
    tok.save_pretrained(out / "base")
    for task in ("A", "B"):
        log(f"fine-tuning {task}")
        m = model(len(tok))
        m.load_state_dict(base.state_dict())
        train(m, tok, c[f"{task}_train"], a.finetune_steps, 1e-3, (2 if task == "A" else 3) + 10 * a.seed, log)
        m.save_pretrained(out / task)
        tok.save_pretrained(out / task)
        with open(out / f"{task}_stats.jsonl", "w") as f:   # statistics text: the task's training text
            for t in c[f"{task}_train"][-a.stats_texts:]:
                f.write(json.dumps({"text": t}) + "\n")
    timings = {}
    for task in ("A", "B"):
        for kind, extra in (("fisher", ["--mode", "empirical"]), ("gram", [])):
            s = time.time()
            log(cli("stats", kind, str(out / task), "--data", str(out / f"{task}_stats.jsonl"), "-o",
                    str(out / f"{kind}_{task}.safetensors"), "--max-length", str(SEQ),
                    "--batch-size", "16", "--quiet", *extra))
            timings[f"stats {kind} {task}"] = round(time.time() - s, 1)
    recipes = {
        "average": {"merge_method": "linear", "models": [{"model": str(out / "A")}, {"model": str(out / "B")}]},
        "task_arithmetic_l0.5": {"merge_method": "task_arithmetic", "base_model": str(out / "base"),
                                 "parameters": {"lambda": 0.5},
                                 "models": [{"model": str(out / "A")}, {"model": str(out / "B")}]},
        "task_arithmetic_l1": {"merge_method": "task_arithmetic", "base_model": str(out / "base"),
                               "parameters": {"lambda": 1.0},
                               "models": [{"model": str(out / "A")}, {"model": str(out / "B")}]},
        "fisher": {"merge_method": "fisher",
                   "models": [{"model": str(out / t), "parameters": {"fisher": str(out / f"fisher_{t}.safetensors")}}
                              for t in ("A", "B")]},
        "regmean": {"merge_method": "regmean",
                    "models": [{"model": str(out / t), "parameters": {"gram": str(out / f"gram_{t}.safetensors")}}
                               for t in ("A", "B")]},
    }
    import yaml
    for name, r in recipes.items():
        r["dtype"] = "float32"
        (out / f"{name}.yaml").write_text(yaml.safe_dump(r))
        cli("merge", str(out / f"{name}.yaml"), "-o", str(out / name), "--quiet")
    rows = {}
    for name in ["base", "A", "B", *recipes]:
        rows[name] = {t: perplexity(out / name, tok, c[f"{t}_test"]) for t in ("A", "B")}
    log(f"\nheld-out perplexity (A = election tweets, B = Reuters R8), {time.time() - t0:.0f} s")
    log(f"{'model':24s} {'A':>8s} {'B':>8s} {'mean':>8s}")
    for name, r in rows.items():
        log(f"{name:24s} {r['A']:8.2f} {r['B']:8.2f} {(r['A'] + r['B']) / 2:8.2f}")
    (out / "results.json").write_text(json.dumps({"perplexity": rows, "timings_s": timings,
                                                  "args": vars(a), "seconds": time.time() - t0}, indent=1))


if __name__ == "__main__":
    main()
