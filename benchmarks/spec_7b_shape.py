"""Spec of a Llama-2-7B-shaped model without its weights: the 32-layer model is built on the
meta device, the spec is traced and self-tested on a 2-layer copy (real weights, same widths)
and extended block by block.  Usage: python benchmarks/spec_7b_shape.py KV_HEADS (32 or 8)."""
import time, torch, transformers as T, sys, resource, cProfile, pstats
from mergelab.align import permutation_spec
kv = int(sys.argv[1])
kw = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=kv, vocab_size=32000)
with torch.device("meta"):
    big = T.LlamaForCausalLM(T.LlamaConfig(num_hidden_layers=32, **kw)).eval()
torch.manual_seed(0)
c0 = time.process_time()
small = T.LlamaForCausalLM(T.LlamaConfig(num_hidden_layers=2, **kw)).eval()
ids = torch.randint(3, 32000, (2, 8)); mask = torch.ones_like(ids); mask[1, -2:] = 0
c1, w1 = time.process_time(), time.time()
pr = cProfile.Profile(); pr.enable()
s = permutation_spec(big, {"input_ids": ids, "attention_mask": mask}, reduced=small)
pr.disable()
c2, w2 = time.process_time(), time.time()
print(f"Llama 7B shape kv={kv}: copy built {c1-c0:.1f} CPU-s; permutation_spec {c2-c1:.1f} CPU-s ({w2-w1:.1f} s wall); "
      f"{len(s.groups)} groups; peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss/1e6:.1f} GB", flush=True)
pstats.Stats(pr).sort_stats("tottime").print_stats(12)
