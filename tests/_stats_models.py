"""Tiny models and data shared by the stats / repair / TACT tests."""
from __future__ import annotations

import torch
from torch import nn


def mlp(seed=0, d_in=10, width=16, n_out=3):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(d_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(),
                         nn.Linear(width, n_out))


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) tensor (as in VGG16x2 / ConvNeXt)."""

    def forward(self, x):
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def cnn(seed=0, norm="bn", n_out=4, c=(6, 10)):
    torch.manual_seed(seed)
    Norm = nn.BatchNorm2d if norm == "bn" else LayerNorm2d
    net = nn.Sequential(
        nn.Conv2d(3, c[0], 3, padding=1), Norm(c[0]), nn.ReLU(),
        nn.Conv2d(c[0], c[1], 3, padding=1), Norm(c[1]), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c[1], 12), nn.ReLU(), nn.Linear(12, n_out))
    if norm == "bn":  # non-trivial running statistics and affine parameters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 2.0)
    for m in net.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.uniform_(m.weight, 0.5, 1.5)
            nn.init.uniform_(m.bias, -0.3, 0.3)
    return net


def tiny_bert(seed=0, num_labels=3):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=24, max_position_embeddings=32, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).eval()


def image_batches(n_batches=3, bs=8, seed=0, n_classes=4, hw=5, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, hw, hw, generator=g) + shift, torch.randint(0, n_classes, (bs,), generator=g))
            for _ in range(n_batches)]


def vector_batches(n_batches=3, bs=8, d=10, seed=0, n_classes=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, d, generator=g), torch.randint(0, n_classes, (bs,), generator=g))
            for _ in range(n_batches)]


def token_batches(n_batches=2, bs=4, t=7, seed=0, vocab=40, n_classes=3):
    """Dict batches with right padding (every row keeps at least 2 real tokens)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_batches):
        ids = torch.randint(1, vocab, (bs, t), generator=g)
        lens = torch.randint(2, t + 1, (bs,), generator=g)
        mask = (torch.arange(t)[None, :] < lens[:, None]).long()
        ids = ids * mask
        out.append({"input_ids": ids, "attention_mask": mask,
                    "labels": torch.randint(0, n_classes, (bs,), generator=g)})
    return out
