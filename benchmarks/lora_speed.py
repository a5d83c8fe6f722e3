"""LoRA costs on a synthetic Llama-shaped checkpoint (no download).

1. ``task_arithmetic`` over two ``base+adapter`` inputs against the same merge over the two
   fine-tunes written out in full (the adapter is applied while reading);
2. ``extract-lora`` of one fine-tune at a given rank (truncated SVD per linear weight).

    python benchmarks/lora_speed.py [--hidden 512] [--layers 8] [--rank 16] [--out /tmp/lora_speed]
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from mergelab import merge
from mergelab.extract_lora import extract_lora


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=8000)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--out", default="/tmp/lora_speed")
    a = ap.parse_args()
    out = Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    H, F, g = a.hidden, int(a.hidden * 2.75), torch.Generator().manual_seed(0)
    mods = {"self_attn.q_proj": (H, H), "self_attn.k_proj": (H, H), "self_attn.v_proj": (H, H),
            "self_attn.o_proj": (H, H), "mlp.gate_proj": (F, H), "mlp.up_proj": (F, H), "mlp.down_proj": (H, F)}
    base = {"model.embed_tokens.weight": torch.randn(a.vocab, H, generator=g) * 0.02,
            "model.norm.weight": torch.ones(H), "lm_head.weight": torch.randn(a.vocab, H, generator=g) * 0.02}
    for i in range(a.layers):
        for m, s in mods.items():
            base[f"model.layers.{i}.{m}.weight"] = torch.randn(s, generator=g) * 0.02
        base[f"model.layers.{i}.input_layernorm.weight"] = torch.ones(H)
    cfg = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": H,
           "num_hidden_layers": a.layers, "vocab_size": a.vocab}

    def save(folder, t):
        folder.mkdir()
        save_file(t, str(folder / "model.safetensors"))
        (folder / "config.json").write_text(json.dumps(cfg))

    save(out / "base", base)
    for k in "ab":
        tensors, full = {}, dict(base)
        for n, w in base.items():
            if ".layers." in n and n.endswith("proj.weight"):
                A = torch.randn(a.rank, w.shape[1], generator=g) * 0.01
                B = torch.randn(w.shape[0], a.rank, generator=g) * 0.01
                tensors[f"base_model.model.{n[:-7]}.lora_A.weight"] = A
                tensors[f"base_model.model.{n[:-7]}.lora_B.weight"] = B
                full[n] = w + B @ A * 2.0
        (out / f"ad_{k}").mkdir()
        save_file(tensors, str(out / f"ad_{k}" / "adapter_model.safetensors"))
        (out / f"ad_{k}" / "adapter_config.json").write_text(json.dumps(
            {"peft_type": "LORA", "r": a.rank, "lora_alpha": 2 * a.rank}))
        save(out / f"full_{k}", full)
    n_params = sum(t.numel() for t in base.values())

    def rec(x, y):
        return {"merge_method": "task_arithmetic", "base_model": str(out / "base"),
                "models": [{"model": x, "parameters": {"weight": 0.5}}, {"model": y, "parameters": {"weight": 0.5}}]}

    t0 = time.perf_counter()
    merge(rec(str(out / "full_a"), str(out / "full_b")), out / "m_full", quiet=True, checksums=False)
    t1 = time.perf_counter()
    merge(rec(f"{out / 'base'}+{out / 'ad_a'}", f"{out / 'base'}+{out / 'ad_b'}"), out / "m_lora", quiet=True, checksums=False)
    t2 = time.perf_counter()
    res = extract_lora(out / "base", out / "full_a", out / "ex_a", rank=a.rank)
    t3 = time.perf_counter()
    print(f"{n_params / 1e6:.1f}M parameters, float32, rank {a.rank}, {len(res.layers)} LoRA layers")
    print(f"task_arithmetic, 2 full fine-tunes:      {t1 - t0:.2f} s")
    print(f"task_arithmetic, 2 base+adapter inputs:  {t2 - t1:.2f} s")
    print(f"extract-lora rank {a.rank}:                  {t3 - t2:.2f} s "
          f"(max rel. error {max(x.rel_error for x in res.layers):.2e})")


if __name__ == "__main__":
    main()
