"""Tiny random-initialised architectures for the tracer tests: Hugging Face transformers'
own implementations (hidden 16-64, 1-2 layers) and a few small models written here.

``ZOO[name]() -> (model, example_inputs)``; ``GROUPS[name]``: the number of groups the
architecture implies (see docs/align.md, "How specs are built: tracer coverage")."""
from __future__ import annotations

import torch
from torch import nn


def token_inputs(vocab=100, batch=2, length=7, mask=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (batch, length), generator=g)
    if not mask:
        return {"input_ids": ids}
    m = torch.ones(batch, length, dtype=torch.long)
    m[1, -2:] = 0
    return {"input_ids": ids, "attention_mask": m}


def images(size=32, seed=0):
    return {"pixel_values": torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(seed))}


class Mixer(nn.Module):
    """MLP-Mixer: token-mixing MLPs act on the transposed (batch, channels, tokens) tensor."""

    def __init__(self, tokens=8, dim=16, hidden=24, depth=2, n_in=12, n_out=3):
        super().__init__()
        self.inp = nn.Linear(n_in, dim)
        self.blocks = nn.ModuleList(nn.ModuleDict(dict(
            n1=nn.LayerNorm(dim), t1=nn.Linear(tokens, hidden), t2=nn.Linear(hidden, tokens),
            n2=nn.LayerNorm(dim), c1=nn.Linear(dim, hidden), c2=nn.Linear(hidden, dim))) for _ in range(depth))
        self.head = nn.Linear(dim, n_out)

    def forward(self, x):
        x = self.inp(x)
        for b in self.blocks:
            y = b["n1"](x).transpose(1, 2)
            x = x + b["t2"](nn.functional.gelu(b["t1"](y))).transpose(1, 2)
            x = x + b["c2"](nn.functional.gelu(b["c1"](b["n2"](x))))
        return self.head(x.mean(1))


class WeightNormNet(nn.Module):
    """torch.nn.utils.weight_norm (aten._weight_norm_interface) and the parametrization."""

    def __init__(self):
        super().__init__()
        self.a = nn.utils.weight_norm(nn.Linear(6, 16))
        self.b = nn.utils.parametrizations.weight_norm(nn.Conv1d(16, 12, 3, padding=1))
        self.c = nn.Linear(12, 3)

    def forward(self, x):                       # x: (batch, length, 6)
        h = torch.relu(self.a(x)).transpose(1, 2)
        h = torch.tanh(self.b(h))
        return self.c(h.mean(-1))


class InplaceViews(nn.Module):
    """In-place shape changes (squeeze_, unsqueeze_, t_) of activations."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 16), nn.Linear(16, 3)

    def forward(self, x):                       # x: (batch, 5)
        h = torch.relu(self.a(x))
        h.unsqueeze_(1)
        h = h * 2.0
        h.squeeze_(1)
        return self.b(h)


def _llama_kw():
    return dict(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4)


def _zoo():
    import transformers as T

    def llama(kv, mask=True):
        return lambda: (T.LlamaForCausalLM(T.LlamaConfig(**_llama_kw(), num_key_value_heads=kv)), token_inputs(mask=mask))

    return {
        "llama": llama(4),
        "llama_gqa": llama(2),
        "llama_gqa_nomask": llama(2, mask=False),     # SDPA's enable_gqa path (no repeat_kv)
        "mistral": lambda: (T.MistralForCausalLM(T.MistralConfig(**_llama_kw(), num_key_value_heads=2)),
                            token_inputs()),
        "qwen2": lambda: (T.Qwen2ForCausalLM(T.Qwen2Config(**_llama_kw(), num_key_value_heads=2)), token_inputs()),
        "gpt2": lambda: (T.GPT2LMHeadModel(T.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=16,
                                                        bos_token_id=1, eos_token_id=2)), token_inputs()),
        "bert_eager": lambda: (T.BertForSequenceClassification(T.BertConfig(
            vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            attn_implementation="eager")), token_inputs()),
        "t5": lambda: (T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=100, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4, use_cache=False)),
            dict(**token_inputs(), decoder_input_ids=token_inputs(length=5, mask=False, seed=1)["input_ids"])),
        "vit": lambda: (T.ViTForImageClassification(T.ViTConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=48, num_labels=3)), images()),
        "swin": lambda: (T.SwinForImageClassification(T.SwinConfig(
            image_size=32, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4,
            num_labels=3)), images()),
        "convnext": lambda: (T.ConvNextForImageClassification(T.ConvNextConfig(
            num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3)), images()),
        "mobilenetv2": lambda: (T.MobileNetV2ForImageClassification(T.MobileNetV2Config(
            depth_multiplier=0.25, image_size=32, num_labels=3)), images()),
        "regnet": lambda: (T.RegNetForImageClassification(T.RegNetConfig(
            embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8, num_labels=3)), images()),
        "wav2vec2": lambda: (T.Wav2Vec2ForSequenceClassification(T.Wav2Vec2Config(
            vocab_size=10, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
            conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=8,
            num_conv_pos_embedding_groups=4, num_labels=3)),
            {"input_values": torch.randn(2, 400, generator=torch.Generator().manual_seed(0))}),
        "mixer": lambda: (Mixer(), torch.randn(2, 8, 12, generator=torch.Generator().manual_seed(0))),
        "weight_norm": lambda: (WeightNormNet(), torch.randn(2, 9, 6, generator=torch.Generator().manual_seed(0))),
        "inplace_views": lambda: (InplaceViews(), torch.randn(4, 5, generator=torch.Generator().manual_seed(0))),
    }


class _Lazy(dict):
    def __missing__(self, key):
        self.update(_zoo())
        return dict.__getitem__(self, key)

    def __iter__(self):
        if not dict.__len__(self):
            self.update(_zoo())
        return dict.__iter__(self)


ZOO = _Lazy()
NAMES = ["llama", "llama_gqa", "llama_gqa_nomask", "mistral", "qwen2", "gpt2", "bert_eager", "t5", "vit", "swin",
         "convnext", "mobilenetv2", "regnet", "wav2vec2", "mixer", "weight_norm", "inplace_views"]


def build(name, seed=0):
    torch.manual_seed(seed)
    model, inputs = ZOO[name]()
    return model.eval(), inputs


def digest(spec) -> list:
    """Everything a spec says, as plain data (for comparing builds)."""
    return [[(g.name, g.kind, g.size, g.n_heads, g.head_dim, g.head_group, g.per_head) for g in spec.groups.values()],
            sorted((k, [(a.axis, a.start, a.length, repr(a.expr)) for a in v]) for k, v in spec.axes.items()),
            sorted(spec.frozen.items()), list(spec.unknown_ops)]
