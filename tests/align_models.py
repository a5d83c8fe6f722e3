"""A tiny model zoo for the alignment tests (and the speed benchmark)."""
from __future__ import annotations

import torch
from torch import nn


class MLP(nn.Module):
    def __init__(self, d_in=16, hidden=(32, 32), d_out=10):
        super().__init__()
        dims = [d_in, *hidden]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(dims[:-1], dims[1:]))
        self.head = nn.Linear(dims[-1], d_out)

    def forward(self, x):
        x = x.flatten(1)
        for layer in self.layers:
            x = torch.relu(layer(x))
        return self.head(x)


class ChannelLayerNorm(nn.Module):
    """LayerNorm over the channel axis of an NCHW feature map."""

    def __init__(self, c):
        super().__init__()
        self.ln = nn.LayerNorm(c)

    def forward(self, x):
        return self.ln(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _norm(kind, c):
    if kind == "bn":
        return nn.BatchNorm2d(c)
    if kind == "ln":
        return ChannelLayerNorm(c)
    if kind == "gn":
        return nn.GroupNorm(4, c)
    raise ValueError(kind)


class VGG(nn.Module):
    """VGG-style: cfg entries are channel counts or 'M' (max-pool); then flatten -> MLP head."""

    def __init__(self, cfg=(8, "M", 16, "M", 16), norm="bn", in_ch=3, size=8, hidden=32, classes=10):
        super().__init__()
        layers, c = [], in_ch
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                layers += [nn.Conv2d(c, v, 3, padding=1), _norm(norm, v), nn.ReLU()]
                c = v
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Linear(c * size * size, hidden), nn.ReLU(), nn.Linear(hidden, classes))

    def forward(self, x):
        return self.classifier(torch.flatten(self.features(x), 1))


def vgg11(width=1, norm="bn", size=32, classes=10):
    w = lambda c: c * width // 8  # noqa: E731  (VGG-11 at 1/8 channels x width)
    cfg = (w(64), "M", w(128), "M", w(256), w(256), "M", w(512), w(512), "M", w(512), w(512), "M")
    return VGG(cfg, norm=norm, size=size, hidden=w(512), classes=classes)


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        return torch.relu(out)


class ResNet20(nn.Module):
    """CIFAR ResNet-20 (3 stages x 3 blocks) with 1x1 shortcut convolutions (option B)."""

    def __init__(self, width=1, classes=10, in_ch=3):
        super().__init__()
        w = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_ch, w[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        blocks, c = [], w[0]
        for i, cw in enumerate(w):
            for j in range(3):
                blocks.append(BasicBlock(c, cw, 2 if (j == 0 and i > 0) else 1))
                c = cw
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.blocks(x)
        x = torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)
        return self.fc(x)


class ViTBlock(nn.Module):
    def __init__(self, d, heads):
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))

    def forward(self, x):
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.ln2(x))


class ViT(nn.Module):
    """Small ViT: conv patch embedding, class token, learned positions, MHA blocks."""

    def __init__(self, size=8, patch=4, d=32, heads=4, depth=2, classes=10, in_ch=3):
        super().__init__()
        n = (size // patch) ** 2
        self.patch = nn.Conv2d(in_ch, d, patch, patch)
        self.cls = nn.Parameter(torch.zeros(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, n + 1, d) * 0.02)
        self.blocks = nn.Sequential(*[ViTBlock(d, heads) for _ in range(depth)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        x = self.patch(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls.expand(x.shape[0], -1, -1), x], dim=1) + self.pos
        x = self.blocks(x)
        return self.head(self.ln(x)[:, 0])


def tiny_bert(layers=2, heads=4, hidden=32, seed=0):
    from transformers import BertConfig, BertModel
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=50, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * hidden, max_position_embeddings=16, type_vocab_size=2)
    return BertModel(cfg).eval()


def bert_inputs(batch=2, seq=6):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 50, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[0, -2:] = 0   # padding exercises the mask path
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}
