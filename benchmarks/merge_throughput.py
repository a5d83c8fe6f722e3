"""Merge throughput and peak memory, mergelab vs mergekit-yaml on the same recipes.

    python benchmarks/merge_throughput.py --sizes 110m,1b --methods linear,task_arithmetic,ties,dare_ties \
        [--repeat 3] [--mergekit PATH_TO_mergekit-yaml] [--checkpoints DIR] [--no-checksums-row]

Generates Llama-architecture HF checkpoints (bfloat16, sharded safetensors): a base and two
fine-tune-like variants (base + small seeded deltas), in a temporary folder that is removed
at the end (``--checkpoints DIR`` keeps and reuses them).  Each merge runs in a child process
(benchmarks/childproc.py: wall, CPU user+sys, peak RSS polled from /proc), ``--repeat`` times
per tool, the tools alternating run by run (the order flipped every round); the table gives
the median wall [min-max], the median CPU seconds and mergelab's median wall over
mergekit's.  Both tools run with their default options (mergelab: input checksums in the
model card; ``--no-checksums-row`` adds a row without them).  Methods: linear,
task_arithmetic, ties, dare_ties, and every method of ``mergekit_compat.new_methods``.
Throughput = (bytes of the input weight files read + bytes written) / wall time, printed
next to the memory-copy bandwidth measured in the same run.  mergekit-yaml is found via
``--mergekit``, ``$MERGEKIT_YAML`` or PATH; without it only mergelab is measured.
Numbers depend on the machine and on its load: report them with both.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from childproc import measure, run_child, summarise, weight_bytes  # noqa: E402,F401  (run_child: re-exported)

SIZES = {
    # Llama-2-7B shape: 32 layers x 202M + embeddings/head 2 x 131M = 6.74B parameters
    "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32, vocab_size=32000),
    # ~110M: 12 layers x 7.1M + embeddings/head 2 x 12.3M
    "110m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
                 num_key_value_heads=12, vocab_size=16000),
    # ~1.1B (TinyLlama shape): 22 layers x 44M + embeddings/head 2 x 65.5M
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
               num_key_value_heads=4, vocab_size=32000),
    # a tiny one for smoke runs
    "tiny": dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=1000),
}


def llama_shapes(c: dict) -> list[tuple[str, tuple[int, ...]]]:
    h, i, v = c["hidden_size"], c["intermediate_size"], c["vocab_size"]
    kv = h // c["num_attention_heads"] * c["num_key_value_heads"]
    out = [("model.embed_tokens.weight", (v, h))]
    for l in range(c["num_hidden_layers"]):
        p = f"model.layers.{l}."
        out += [(p + "input_layernorm.weight", (h,)), (p + "self_attn.q_proj.weight", (h, h)),
                (p + "self_attn.k_proj.weight", (kv, h)), (p + "self_attn.v_proj.weight", (kv, h)),
                (p + "self_attn.o_proj.weight", (h, h)), (p + "post_attention_layernorm.weight", (h,)),
                (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                (p + "mlp.down_proj.weight", (h, i))]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (v, h))]
    return out


def llama_config(c: dict) -> dict:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "torch_dtype": "bfloat16", "rope_theta": 10000.0, "bos_token_id": 1, "eos_token_id": 2, **c}


def generate(folder: Path, size: str, seed: int, delta_of: int | None, shard_size: str = "1GB") -> Path:
    """A bf16 Llama checkpoint; ``delta_of``: the seed of the base this is a fine-tune of."""
    from mergelab.io.writer import ShardedWriter, TensorSpec, parse_size

    cfg = SIZES[size]
    shapes = llama_shapes(cfg)
    folder.mkdir(parents=True)
    w = ShardedWriter(folder, [TensorSpec(n, s, torch.bfloat16) for n, s in shapes], parse_size(shard_size))
    for k, (n, s) in enumerate(shapes):
        base_seed = delta_of if delta_of is not None else seed
        g = torch.Generator().manual_seed(base_seed * 100003 + k)
        t = torch.ones(s) if n.endswith("norm.weight") else torch.randn(s, generator=g) * 0.02
        if delta_of is not None:
            g2 = torch.Generator().manual_seed(seed * 100003 + k)
            t += torch.randn(s, generator=g2) * 0.002
        w.write(n, t.to(torch.bfloat16))
        del t
    w.close()
    # written last: a folder with config.json is complete (--checkpoints reuses it)
    (folder / "config.json").write_text(json.dumps(llama_config(cfg), indent=1))
    return folder


def n_params(size: str) -> int:
    return sum(int(torch.tensor(s).prod()) for _, s in llama_shapes(SIZES[size]))


def memcpy_bandwidth(nbytes: int = 512 * 2**20, reps: int = 5) -> float:
    """Bytes copied per second by one torch ``copy_`` of a large buffer (best of ``reps``)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        dst.copy_(src)
        best = min(best, time.perf_counter() - t0)
    return nbytes / best


def find_mergekit(arg: str | None) -> str | None:
    for c in (arg, os.environ.get("MERGEKIT_YAML"), shutil.which("mergekit-yaml"),
              "/work/mkvenv/bin/mergekit-yaml"):
        if c and Path(c).is_file():
            return c
    return None


BASIC = ("linear", "task_arithmetic", "ties", "dare_ties")


def recipe(method: str, base: Path, a: Path, b: Path) -> dict:
    """A mergekit recipe (both tools read it unchanged) of ``method``: ``linear``,
    ``task_arithmetic``, ``ties`` and ``dare_ties`` (density 0.5, weight 1, the base model)
    here; every other method mergekit 0.1.5 has from ``mergekit_compat.new_methods``."""
    dt = {"dtype": "bfloat16"}
    if method == "linear":
        return {"models": [{"model": str(a), "parameters": {"weight": 0.5}},
                           {"model": str(b), "parameters": {"weight": 0.5}}],
                "merge_method": "linear", **dt}
    if method == "task_arithmetic":
        return {"models": [{"model": str(a), "parameters": {"weight": 0.5}},
                           {"model": str(b), "parameters": {"weight": 0.5}}],
                "merge_method": "task_arithmetic", "base_model": str(base), **dt}
    if method in ("ties", "dare_ties"):
        r = {"models": [{"model": str(a), "parameters": {"weight": 1.0, "density": 0.5}},
                        {"model": str(b), "parameters": {"weight": 1.0, "density": 0.5}}],
             "merge_method": method, "base_model": str(base), **dt}
        if method == "ties":
            r["parameters"] = {"normalize": True}
        return r
    more = other_methods(base, a, b, dt)
    if method not in more:
        raise SystemExit(f"error: --methods: unknown method '{method}', expected one of "
                         f"{', '.join(BASIC + tuple(more))}")
    return more[method]


def other_methods(base: Path, a: Path, b: Path, dt: dict) -> dict[str, dict]:
    """``mergekit_compat.new_methods`` (imported here: mergekit_compat imports this module)."""
    from mergekit_compat import new_methods

    return new_methods(base, a, b, dt)


def reads_of(r: dict) -> int:
    """Bytes of the input weight files a recipe reads (each model folder once)."""
    folders = {m["model"] for m in r.get("models", [])} | ({r["base_model"]} if r.get("base_model") else set())
    return sum(weight_bytes(Path(f)) for f in folders)


def tools_for(args, mk: str | None, rp: Path, out: Path) -> list[tuple[str, list[str]]]:
    """(label, command) of every tool measured: each with its default options."""
    ml = [sys.executable, "-m", "mergelab", "merge", str(rp), "-o", str(out), "--quiet"]
    ml += ["--threads", str(args.threads)] if args.threads else []
    tools = []
    if "mergelab" in args.tools:
        tools.append(("mergelab", ml))
        if args.no_checksums_row:
            tools.append(("mergelab --no-checksums", ml + ["--no-checksums"]))
    if mk and "mergekit" in args.tools:
        tools.append(("mergekit", [mk, str(rp), str(out), "--quiet"]))
    return tools


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="110m,1b")
    ap.add_argument("--methods", default="linear,task_arithmetic,ties,dare_ties",
                    help=f"comma-separated: {', '.join(BASIC)} or any method of mergekit_compat.new_methods")
    ap.add_argument("--mergekit", default=None, help="path of mergekit-yaml (else $MERGEKIT_YAML or PATH)")
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool and method (tools alternate run by run)")
    ap.add_argument("--threads", type=int, default=None, help="mergelab --threads")
    ap.add_argument("--no-checksums-row", action="store_true",
                    help="also measure mergelab --no-checksums (a separate row)")
    ap.add_argument("--workdir", default=None, help="where the temporary checkpoints go (default: $TMPDIR)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--tools", default="mergelab,mergekit", help="which tools to run")
    ap.add_argument("--checkpoints", default=None,
                    help="reuse (or create and keep) the checkpoints in DIR/<size>/{base,a,b}")
    args = ap.parse_args(argv)
    if args.repeat < 1:
        raise SystemExit(f"error: --repeat: expected a positive number, found {args.repeat}")
    for method in args.methods.split(","):  # an unknown method: one line, before any work
        recipe(method, Path("base"), Path("a"), Path("b"))
    mk = find_mergekit(args.mergekit)
    bw = memcpy_bandwidth()
    print(f"memcpy bandwidth: {bw / 1e9:.2f} GB/s; cpus: {os.cpu_count()}; load average: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; mergekit: {mk or 'not found'}", flush=True)
    import yaml
    t_all = time.perf_counter()
    rows = []
    for size in args.sizes.split(","):
        root = Path(tempfile.mkdtemp(prefix=f"mergelab-bench-{size}-", dir=args.workdir))
        try:
            t0 = time.perf_counter()
            ck = Path(args.checkpoints) / size if args.checkpoints else root
            base, a, b = ck / "base", ck / "a", ck / "b"
            for folder, seed, of in ((base, 0, None), (a, 1, 0), (b, 2, 0)):
                if not (folder / "config.json").is_file():
                    shutil.rmtree(folder, ignore_errors=True)  # a half-generated folder
                    generate(folder, size, seed, of)
            print(f"[{size}] {n_params(size) / 1e6:.0f}M params, 3 checkpoints ready in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            for method in args.methods.split(","):
                r = recipe(method, base, a, b)
                rp = root / f"{method}.yaml"
                rp.write_text(yaml.safe_dump(r))
                reads = reads_of(r)
                tools = tools_for(args, mk, rp, root / "out")
                runs: dict[str, list[dict]] = {t: [] for t, _ in tools}
                for k in range(args.repeat):  # alternate: every tool once per round, order flipped each round
                    for tool, cmd in (tools if k % 2 == 0 else tools[::-1]):
                        one = measure(cmd, root / "out")
                        one["load"] = os.getloadavg()[0]
                        runs[tool].append(one)
                        print(f"  {size:>5} {method:<16} {tool:<24} run {k + 1}: wall {one['wall_s']:7.1f} s  "
                              f"cpu {one['cpu_s']:7.1f} s  peak RSS {one['peak_rss'] / 2**20:6.0f} MB  "
                              f"load {one['load']:.1f}{'' if one['ok'] else '  FAILED'}", flush=True)
                mk_wall = summarise(runs["mergekit"])["wall_s"] if runs.get("mergekit") else None
                for tool, _ in tools:
                    s = summarise(runs[tool])
                    rows.append({"size": size, "params": n_params(size), "method": method, "tool": tool,
                                 "ok": s["ok"], "runs": s["runs"], "wall_s": round(s["wall_s"], 2),
                                 "wall_min_s": round(s["wall_min_s"], 2), "wall_max_s": round(s["wall_max_s"], 2),
                                 "cpu_s": round(s["cpu_s"], 1), "peak_rss_mb": round(s["peak_rss"] / 2**20),
                                 "gb_per_s": round((reads + s["written"]) / s["wall_s"] / 1e9, 3),
                                 "vs_mergekit": (round(s["wall_s"] / mk_wall, 3)
                                                 if mk_wall and tool != "mergekit" else None),
                                 "load": round(statistics.median(x["load"] for x in runs[tool]), 1),
                                 "memcpy_gb_per_s": round(bw / 1e9, 2)})
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print(f"\n{args.repeat} run(s) per tool, alternating; wall: median [min-max]; CPU: median user+sys; "
          f"load: median 1-min load average after the runs; total {time.perf_counter() - t_all:.0f} s")
    print("| size | method | tool | wall (s) | / mergekit | CPU (s) | peak RSS (MB) | read+write GB/s | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        ratio = f"{r['vs_mergekit']:.2f}x" if r["vs_mergekit"] is not None else ""
        print(f"| {r['size']} | {r['method']} | {r['tool']} | {r['wall_s']} [{r['wall_min_s']}-{r['wall_max_s']}]"
              f"{'' if r['ok'] else ' FAILED'} | {ratio} | {r['cpu_s']} | {r['peak_rss_mb']} | {r['gb_per_s']} | "
              f"{r['load']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
