"""Cost of the causal-LM statistics: Fisher modes in sequences/s, and the peak memory of the
layer-by-layer Gram pass against the whole-model pass.

    OMP_NUM_THREADS=1 python benchmarks/causal_stats_cost.py fisher   # sequences/s per mode
    OMP_NUM_THREADS=1 python benchmarks/causal_stats_cost.py memory   # peak RSS, each pass in a fresh process
    OMP_NUM_THREADS=1 python benchmarks/causal_stats_cost.py fisher-layered [SEQS TOKENS BATCH]
        # the ~110M Llama of merge_throughput.py (bf16 checkpoint, run in float32): the Fisher
        # layer by layer against the whole-model pass, seconds per token and peak RSS

Fisher: a tiny Llama (hidden 64, 2 layers, 4 heads / 2 KV heads, vocabulary 256), 16 random
sequences of 32 tokens.  Memory: a Llama of hidden 512, 8 layers, vocabulary 8000 (29 M
parameters, 117 MB in float32), 32 sequences of 64 tokens; peak resident memory above the
process's memory after imports (the modeling code too) and tokenisation (``ru_maxrss``).  The Gram matrices themselves
(float64, d_in² per linear: 250 MB here) are held by both passes.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def llama(hidden, layers, vocab, inter, positions=128, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                      num_hidden_layers=layers, num_attention_heads=4 if hidden < 256 else 8,
                      num_key_value_heads=2 if hidden < 256 else 4, max_position_embeddings=positions,
                      tie_word_embeddings=True, architectures=["LlamaForCausalLM"])
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def fisher_cost():
    from mergelab.stats import diagonal_fisher

    m = llama(64, 2, 256, 128)
    g = torch.Generator().manual_seed(0)
    rows = []
    for mode, n in (("empirical", 16), ("sampled", 16), ("expected", 2)):
        ids = torch.randint(0, 256, (n, 32), generator=g)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        diagonal_fisher(m, [{k: v[:1] for k, v in batch.items()}], mode=mode, progress=False)  # warm-up
        t = time.perf_counter()
        f = diagonal_fisher(m, [batch], mode=mode, progress=False)
        dt = time.perf_counter() - t
        rows.append({"mode": mode, "sequences": n, "tokens_per_sequence": 32, "seconds": round(dt, 3),
                     "sequences_per_s": round(n / dt, 2), "backend": f.backend})
    print(json.dumps(rows, indent=1))


def _child(kind: str, stat: str, folder: str):
    from mergelab.io.models import load_model
    from mergelab.stats import activation_stats, gram_matrices
    from mergelab.stats.layered import layered_stats

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8000, (32, 64), generator=g)
    batches = [{"input_ids": ids[i:i + 8], "attention_mask": torch.ones(8, 64, dtype=torch.long)}
               for i in range(0, 32, 8)]
    import gc

    import transformers
    with torch.device("meta"):       # import the modeling code before the baseline (about 90 MB)
        transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(folder))
    gc.collect()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with open("/proc/self/status") as f:
        now = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS"))
    t = time.perf_counter()
    if kind == "whole":
        model, _ = load_model(folder, progress=False)
        (gram_matrices if stat == "gram" else activation_stats)(model, batches, progress=False)
    else:
        layered_stats(folder, batches, stat)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"pass": kind, "statistic": stat, "seconds": round(time.perf_counter() - t, 2),
                      "rss_after_imports_MB": round(now / 1024, 1),
                      "peak_rss_MB": round(peak / 1024, 1),
                      "peak_above_start_MB": round((peak - max(before, now)) / 1024, 1)}))


def _fisher_child(kind: str, folder: str, seqs: int, tokens: int, batch: int):
    import gc

    from mergelab.io.models import load_model
    from mergelab.stats import diagonal_fisher
    from mergelab.stats.layered_fisher import layered_fisher

    cfg = json.loads((Path(folder) / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, cfg["vocab_size"], (seqs, tokens), generator=g)
    batches = [{"input_ids": ids[i:i + batch], "attention_mask": torch.ones_like(ids[i:i + batch])}
               for i in range(0, seqs, batch)]
    import transformers
    with torch.device("meta"):       # import the modeling code before the baseline
        transformers.LlamaForCausalLM(transformers.AutoConfig.from_pretrained(folder))
    gc.collect()
    with open("/proc/self/status") as f:
        now = next(int(ln.split()[1]) for ln in f if ln.startswith("VmRSS"))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if kind == "whole":
        model, _ = load_model(folder, progress=False)
        model.float()
        f = diagonal_fisher(model, batches, mode="empirical", chunk_size=batch, progress=False)
    else:
        f = layered_fisher(folder, batches, mode="empirical", chunk_size=batch)
    dt = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"pass": kind, "backend": f.backend, "sequences": seqs, "tokens": tokens,
                      "batch": batch, "seconds": round(dt, 1),
                      "ms_per_token": round(1000 * dt / (seqs * tokens), 2),
                      "rss_after_imports_MB": round(now / 1024, 1),
                      "peak_rss_MB": round(peak / 1024, 1),
                      "peak_above_start_MB": round((peak - max(before, now)) / 1024, 1),
                      "fisher_tensors": len(f)}))


def fisher_layered_cost(seqs: int, tokens: int, batch: int):
    import shutil
    import tempfile

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from merge_throughput import generate, n_params

    tmp = Path(tempfile.mkdtemp(prefix="mergelab-fisher-bench-"))
    try:
        folder = generate(tmp / "m110", "110m", 0, None)
        print(json.dumps({"model": "merge_throughput 110m Llama", "parameters": n_params("110m"),
                          "checkpoint": "bfloat16", "pass dtype": "float32"}))
        for kind in ("layered", "whole"):
            r = subprocess.run([sys.executable, __file__, "_fisher_child", kind, str(folder),
                                str(seqs), str(tokens), str(batch)], capture_output=True, text=True)
            print(r.stdout.strip() or r.stderr.strip()[-2000:], flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def memory_cost():
    folder = Path("/tmp/mergelab_layered_bench")
    if not (folder / "config.json").exists():
        llama(512, 8, 8000, 1536).save_pretrained(folder)
    for stat in ("activations", "gram"):
        for kind in ("whole", "layered"):
            r = subprocess.run([sys.executable, __file__, "_child", kind, stat, str(folder)],
                               capture_output=True, text=True)
            print(r.stdout.strip() or r.stderr.strip()[-2000:])


if __name__ == "__main__":
    what = sys.argv[1] if len(sys.argv) > 1 else "fisher"
    if what == "_child":
        _child(sys.argv[2], sys.argv[3], sys.argv[4])
    elif what == "_fisher_child":
        _fisher_child(sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7]))
    elif what == "fisher-layered":
        fisher_layered_cost(*(map(int, sys.argv[2:5]) if len(sys.argv) > 4 else (8, 128, 4)))
    elif what == "memory":
        memory_cost()
    else:
        fisher_cost()
