"""Streamed weight matching of two Llama-shaped bf16 checkpoints on disk under a memory limit.

    python benchmarks/align_7b.py --size 7b [--layers 32] [--kv 32] [--workdir /work/tmp_align7b]
        [--limit-gib 4] [--noise 1e-3] [--seed 0] [--max-iter 100] [--keep]

1. Checks the free disk space (two bf16 checkpoints + 2 GB); stops with one line if short.
2. Builds the permutation spec without the weights: the ``--layers``-layer model on the meta
   device, traced on a 1-layer copy with real weights (same widths), extended block by block
   (in a child process: its memory is not the matcher's), pickled.
3. Writes checkpoint A (seeded N(0, 0.02) matrices, norm scales 1 + 0.05 N) and B = A with a
   random permutation of every group applied while writing, plus N(0, noise * 0.02) noise,
   tensor by tensor (sharded safetensors, 2 GB shards).
4. Runs :func:`mergelab.align.stream.weight_matching_streamed` (signature start, "local" unit
   order) in a child process under RLIMIT_AS = ``--limit-gib``; reports wall, CPU, peak RSS
   (``os.wait4``), sweeps, bytes read and the read bandwidth (bytes / time inside ``get``),
   and whether the found permutation is exactly the inverse of the one applied.
5. Deletes the work folder (unless ``--keep``), whatever happened.

Sizes: 7b (hidden 4096, MLP 11008, 32 heads, vocab 32000), 1b (TinyLlama shape), 110m.
``--layers`` overrides the depth (the memory peak depends on the widths, the time on the depth).
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

SIZES = ("7b", "1b", "110m")  # the shapes: merge_throughput.SIZES


def _mt():
    sys.path.insert(0, str(Path(__file__).parent))
    import merge_throughput  # imported late: it imports torch, which this parent does not need
    return merge_throughput


def config(args) -> dict:
    c = dict(_mt().SIZES[args.size])
    if args.layers:
        c["num_hidden_layers"] = args.layers
    if args.kv:
        c["num_key_value_heads"] = args.kv
    return c


def shapes(c: dict) -> list:
    return _mt().llama_shapes(c)


# ----------------------------------------------------------------------------- children
def child_spec(cfg_json: str, out: str):
    import torch
    import transformers as T

    from mergelab.align import permutation_spec
    c = json.loads(cfg_json)
    with torch.device("meta"):
        big = T.LlamaForCausalLM(T.LlamaConfig(**c)).eval()
    torch.manual_seed(0)
    small = T.LlamaForCausalLM(T.LlamaConfig(**{**c, "num_hidden_layers": 1})).eval()
    ids = torch.randint(3, 1000, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, -2:] = 0
    t = time.time()
    spec = permutation_spec(big, {"input_ids": ids, "attention_mask": mask}, reduced=small)
    spec.trace = None
    Path(out).write_bytes(pickle.dumps(spec))
    print(json.dumps({"groups": len(spec.groups), "spec_s": time.time() - t}))


def child_match(spec_path: str, a: str, b: str, truth: str, limit_gib: float, max_iter: int, seed: int):
    if limit_gib > 0:
        lim = int(limit_gib * (1 << 30))
        resource.setrlimit(resource.RLIMIT_AS, (lim, lim))
    import torch

    from mergelab.align.apply import invert, load_permutation
    from mergelab.align.stream import weight_matching_streamed
    from mergelab.io import open_checkpoint
    spec = pickle.loads(Path(spec_path).read_bytes())
    read_s = [0.0]

    class Timed:
        def __init__(self, ck):
            self.ck = ck

        def __contains__(self, n):
            return n in self.ck

        def shape(self, n):
            return self.ck.shape(n)

        def get(self, n):
            t = time.perf_counter()
            x = self.ck.get(n)
            read_s[0] += time.perf_counter() - t
            return x

    st = {}
    t0, c0 = time.time(), time.process_time()
    p = weight_matching_streamed(spec, Timed(open_checkpoint(a)), Timed(open_checkpoint(b)), max_iter=max_iter,
                                 seed=seed, stats=st, verbose=True)
    wall, cpu = time.time() - t0, time.process_time() - c0
    want = invert(spec, load_permutation(truth))
    exact = all(torch.equal(p[g], want[g]) for g in spec.groups)
    wrong = sum(int((p[g] != want[g]).sum()) for g in spec.groups)
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "sweeps": st["sweeps"], "bytes_read": st["bytes_read"],
                      "read_s": read_s[0], "reads_per_sweep": st["reads_per_sweep"], "exact": exact,
                      "wrong_indices": wrong, "history": p.history}))


# ----------------------------------------------------------------------------- parent
def run_child(args_list, env=None):
    t = time.time()
    proc = subprocess.Popen([sys.executable, __file__, *args_list], stdout=subprocess.PIPE, text=True, env=env)
    try:
        out = proc.stdout.read()
        _, status, ru = os.wait4(proc.pid, 0)
    except BaseException:        # interrupted (SIGTERM/SIGINT): the child goes too
        proc.kill()
        proc.wait()
        raise
    lines = out.strip().splitlines()
    for ln in lines[:-1]:
        print("   ", ln)
    if status != 0 or not lines:
        raise SystemExit(f"child {args_list[0]} failed (status {status})")
    res = json.loads(lines[-1])
    res.update(peak_rss_gib=ru.ru_maxrss / (1 << 20), child_wall_s=time.time() - t,
               child_cpu_s=ru.ru_utime + ru.ru_stime)
    return res


def generate(folder: Path, c: dict, spec, perm, noise: float, seed: int, base: Path | None):
    """A (``base`` None) or B = A permuted + noise, tensor by tensor."""
    import torch

    from mergelab.align.apply import permute_tensor
    from mergelab.io import open_checkpoint
    from mergelab.io.writer import ShardedWriter, TensorSpec, parse_size
    shp = shapes(c)
    folder.mkdir(parents=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
           "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
           "torch_dtype": "bfloat16", **c}
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    w = ShardedWriter(folder, [TensorSpec(n, s, torch.bfloat16) for n, s in shp], parse_size("2GB"))
    src = open_checkpoint(base) if base is not None else None
    for k, (n, s) in enumerate(shp):
        g = torch.Generator().manual_seed(seed * 100003 + k)
        if src is None:
            t = 1 + 0.05 * torch.randn(s, generator=g) if n.endswith("norm.weight") else torch.randn(s, generator=g) * 0.02
        else:
            t = permute_tensor(spec, n, src.get(n).float(), perm)
            t += torch.randn(s, generator=g) * (0.02 * noise)
        w.write(n, t.to(torch.bfloat16))
        del t
    w.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", default="110m", choices=SIZES)
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--kv", type=int, default=0)
    ap.add_argument("--workdir", default="/work/tmp_align7b")
    ap.add_argument("--limit-gib", type=float, default=4.0)
    ap.add_argument("--noise", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-iter", type=int, default=100)
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    import signal
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))   # so that the work folder is deleted
    import torch

    from mergelab.align.apply import save_permutation
    c = config(args)
    numel = sum(int(torch.Size(s).numel()) for _, s in shapes(c))
    need = 2 * 2 * numel + (2 << 30)
    work = Path(args.workdir)
    free = shutil.disk_usage(work.parent if not work.exists() else work).free
    if free < need:
        print(f"align_7b: {free / 1e9:.1f} GB free under {work.parent}, need {need / 1e9:.1f} GB; stopped")
        return 1
    if work.exists():
        print(f"align_7b: {work} exists; remove it first")
        return 1
    print(f"{args.size} x {c['num_hidden_layers']} layers (kv {c['num_key_value_heads']}): {numel / 1e9:.2f}B parameters, "
          f"2 x {2 * numel / 1e9:.1f} GB bf16; load {os.getloadavg()}", flush=True)
    try:
        work.mkdir(parents=True)
        env = dict(os.environ)
        r = run_child(["spec", json.dumps(c), str(work / "spec.pkl")], env)
        print(f"spec: {r['groups']} groups in {r['spec_s']:.1f} s (child peak RSS {r['peak_rss_gib']:.1f} GiB)",
              flush=True)
        spec = pickle.loads((work / "spec.pkl").read_bytes())
        perm = spec.random_permutation(args.seed + 1)
        save_permutation(perm, work / "truth.safetensors", spec)
        t = time.time()
        generate(work / "a", c, spec, None, args.noise, args.seed, None)
        generate(work / "b", c, spec, perm, args.noise, args.seed + 7, work / "a")
        print(f"generated A and B in {time.time() - t:.1f} s", flush=True)
        os.sync()
        r = run_child(["match", str(work / "spec.pkl"), str(work / "a"), str(work / "b"), str(work / "truth.safetensors"),
                       str(args.limit_gib), str(args.max_iter), str(args.seed)], env)
        bw = r["bytes_read"] / max(r["read_s"], 1e-9)
        print(f"streamed weight matching under RLIMIT_AS {args.limit_gib} GiB: wall {r['wall_s']:.1f} s, CPU "
              f"{r['cpu_s']:.1f} s, peak RSS {r['peak_rss_gib']:.2f} GiB, {r['sweeps']} sweeps "
              f"(tensor reads per sweep per model {r['reads_per_sweep']}), read {r['bytes_read'] / 1e9:.1f} GB in "
              f"{r['read_s']:.1f} s ({bw / 1e9:.2f} GB/s), permutation recovered exactly: {r['exact']} "
              f"({r['wrong_indices']} indices differ); objective {r['history']}; load {os.getloadavg()}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "spec":
        child_spec(sys.argv[2], sys.argv[3])
    elif len(sys.argv) > 1 and sys.argv[1] == "match":
        child_match(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], float(sys.argv[6]), int(sys.argv[7]),
                    int(sys.argv[8]))
    else:
        sys.exit(main())
