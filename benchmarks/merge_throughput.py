"""Merge throughput and peak memory, mergelab vs mergekit-yaml on the same recipes.

    python benchmarks/merge_throughput.py --sizes 110m,1b --methods linear,task_arithmetic,ties \
        [--mergekit PATH_TO_mergekit-yaml] [--workdir /tmp] [--keep]

Generates Llama-architecture HF checkpoints (bfloat16, sharded safetensors): a base and two
fine-tune-like variants (base + small seeded deltas), in a temporary folder that is removed
at the end.  Each merge runs in a child process; its peak RSS comes from ``os.wait4``.
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
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {
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
    (folder / "config.json").write_text(json.dumps(llama_config(cfg), indent=1))
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
    return folder


def n_params(size: str) -> int:
    return sum(int(torch.tensor(s).prod()) for _, s in llama_shapes(SIZES[size]))


def recipe(method: str, base: Path, a: Path, b: Path) -> dict:
    if method == "linear":
        return {"models": [{"model": str(a), "parameters": {"weight": 0.5}},
                           {"model": str(b), "parameters": {"weight": 0.5}}],
                "merge_method": "linear", "dtype": "bfloat16"}
    if method == "task_arithmetic":
        return {"models": [{"model": str(a), "parameters": {"weight": 0.5}},
                           {"model": str(b), "parameters": {"weight": 0.5}}],
                "merge_method": "task_arithmetic", "base_model": str(base), "dtype": "bfloat16"}
    if method == "ties":
        return {"models": [{"model": str(a), "parameters": {"weight": 1.0, "density": 0.5}},
                           {"model": str(b), "parameters": {"weight": 1.0, "density": 0.5}}],
                "merge_method": "ties", "base_model": str(base), "parameters": {"normalize": True},
                "dtype": "bfloat16"}
    raise SystemExit(f"unknown method {method}")


def weight_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run_child(cmd: list[str]) -> tuple[float, int, int, float]:
    """Wall seconds, peak RSS (bytes, VmHWM polled from /proc), exit status and CPU seconds
    (user + system, from the reaped child's rusage: less sensitive to other load) of a child."""
    import resource

    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    status = Path(f"/proc/{p.pid}/status")
    err = []
    import threading
    th = threading.Thread(target=lambda: err.append(p.stderr.read()), daemon=True)
    th.start()
    while p.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except (OSError, ValueError):
            pass
        time.sleep(0.02)
    wall = time.perf_counter() - t0
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    th.join()
    if p.returncode != 0:
        msg = (err[0] if err else b"").decode(errors="replace").strip().splitlines()[-1:]
        print(f"  ! {' '.join(cmd[:3])} exited {p.returncode}: {msg}", file=sys.stderr)
    return wall, peak, p.returncode, cpu


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
              "/work/venvs/mergekit/bin/mergekit-yaml"):
        if c and Path(c).is_file():
            return c
    return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="110m,1b")
    ap.add_argument("--methods", default="linear,task_arithmetic,ties")
    ap.add_argument("--mergekit", default=None, help="path of mergekit-yaml (else $MERGEKIT_YAML or PATH)")
    ap.add_argument("--threads", type=int, default=None, help="mergelab --threads")
    ap.add_argument("--workdir", default=None, help="where the temporary checkpoints go (default: $TMPDIR)")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--tools", default="mergelab,mergekit", help="which tools to run")
    ap.add_argument("--checkpoints", default=None,
                    help="reuse (or create and keep) the checkpoints in DIR/<size>/{base,a,b}")
    args = ap.parse_args(argv)
    mk = find_mergekit(args.mergekit)
    bw = memcpy_bandwidth()
    print(f"memcpy bandwidth: {bw / 1e9:.2f} GB/s; cpus: {os.cpu_count()}; load average: "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}; mergekit: {mk or 'not found'}", flush=True)
    rows = []
    for size in args.sizes.split(","):
        root = Path(tempfile.mkdtemp(prefix=f"mergelab-bench-{size}-", dir=args.workdir))
        try:
            t0 = time.perf_counter()
            ck = Path(args.checkpoints) / size if args.checkpoints else root
            base, a, b = ck / "base", ck / "a", ck / "b"
            for folder, seed, of in ((base, 0, None), (a, 1, 0), (b, 2, 0)):
                if not (folder / "config.json").is_file():
                    generate(folder, size, seed, of)
            print(f"[{size}] {n_params(size) / 1e6:.0f}M params, generated 3 checkpoints in "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            for method in args.methods.split(","):
                r = recipe(method, base, a, b)
                rp = root / f"{method}.yaml"
                import yaml
                rp.write_text(yaml.safe_dump(r))
                reads = weight_bytes(a) + weight_bytes(b) + (weight_bytes(base) if method != "linear" else 0)
                tools = [] if "mergelab" not in args.tools else [("mergelab", [sys.executable, "-m", "mergelab", "merge", str(rp), "-o", str(root / "out"),
                                       "--quiet", "--no-checksums"] + (["--threads", str(args.threads)] if args.threads else []))]
                if mk and "mergekit" in args.tools:
                    tools.append(("mergekit", [mk, str(rp), str(root / "out"), "--quiet", "--lazy-unpickle",
                                               "--no-copy-tokenizer", "--no-cuda"]))
                for tool, cmd in tools:
                    shutil.rmtree(root / "out", ignore_errors=True)
                    wall, rss, rc, cpu = run_child(cmd)
                    written = weight_bytes(root / "out") if rc == 0 else 0
                    row = {"size": size, "params": n_params(size), "method": method, "tool": tool, "ok": rc == 0,
                           "wall_s": round(wall, 2), "cpu_s": round(cpu, 1), "peak_rss_mb": round(rss / 2**20),
                           "gb_per_s": round((reads + written) / wall / 1e9, 3), "memcpy_gb_per_s": round(bw / 1e9, 2)}
                    rows.append(row)
                    print(f"  {size:>5} {method:<16} {tool:<9} wall {wall:7.1f} s  cpu {cpu:7.1f} s  peak RSS {rss / 2**20:7.0f} MB  "
                          f"{row['gb_per_s']:.2f} GB/s{'' if rc == 0 else '  FAILED'}", flush=True)
                    shutil.rmtree(root / "out", ignore_errors=True)
        finally:
            shutil.rmtree(root, ignore_errors=True)
    print("\n| size | method | tool | wall (s) | CPU user+sys (s) | peak RSS (MB) | read+write GB/s | memcpy GB/s |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['size']} | {r['method']} | {r['tool']} | {r['wall_s']} | {r['cpu_s']} | {r['peak_rss_mb']} | "
              f"{r['gb_per_s']} | {r['memcpy_gb_per_s']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
