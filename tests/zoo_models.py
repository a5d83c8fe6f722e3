"""Tiny random-config models from Hugging Face transformers' own implementations (the zoo).

Each entry builds a model (hidden 16-64, 1-2 layers per stage, the default attention
implementation) and its example inputs.  ``ZOO[name]() -> (model, inputs)``.
"""
from __future__ import annotations

import torch
from torch import nn

def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _ids(vocab, n=2, t=8, pad=True, seed=0):
    ids = torch.randint(1, vocab, (n, t), generator=_gen(seed))
    mask = torch.ones(n, t, dtype=torch.int64)
    if pad:
        mask[1, t - 3:] = 0
    return {"input_ids": ids, "attention_mask": mask}


def _pix(ch=3, size=32, seed=0):
    return {"pixel_values": torch.randn(2, ch, size, size, generator=_gen(seed))}


def _lm(cfg_cls, model_cls, **kw):
    def make():
        import transformers as tf
        cfg = getattr(tf, cfg_cls)(vocab_size=128, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   max_position_embeddings=64, **kw)
        torch.manual_seed(0)
        return getattr(tf, model_cls)(cfg).eval(), _ids(128, pad=False)
    return make


def llama():
    return _lm("LlamaConfig", "LlamaForCausalLM", num_key_value_heads=2)()


def mistral():
    return _lm("MistralConfig", "MistralForCausalLM", num_key_value_heads=2, sliding_window=None)()


def qwen2():
    return _lm("Qwen2Config", "Qwen2ForCausalLM", num_key_value_heads=2)()


def gpt2():
    import transformers as tf
    cfg = tf.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    torch.manual_seed(0)
    return tf.GPT2LMHeadModel(cfg).eval(), _ids(128, pad=False)


def t5():
    import transformers as tf
    cfg = tf.T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=96, num_layers=2, num_heads=4,
                      decoder_start_token_id=0)
    torch.manual_seed(0)
    x = _ids(128)
    x["decoder_input_ids"] = torch.randint(1, 128, (2, 5), generator=_gen(1))
    return tf.T5ForConditionalGeneration(cfg).eval(), x


def _enc(cfg_cls, model_cls, **kw):
    import transformers as tf
    cfg = getattr(tf, cfg_cls)(vocab_size=128, num_labels=3, **kw)
    torch.manual_seed(0)
    return getattr(tf, model_cls)(cfg).eval(), _ids(128)


def bert():
    return _enc("BertConfig", "BertForSequenceClassification", hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=96, max_position_embeddings=64)


def roberta():
    return _enc("RobertaConfig", "RobertaForSequenceClassification", hidden_size=64, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=96, max_position_embeddings=64, pad_token_id=0)


def distilbert():
    return _enc("DistilBertConfig", "DistilBertForSequenceClassification", dim=64, n_layers=2, n_heads=4,
                hidden_dim=96, max_position_embeddings=64)


def vit():
    import transformers as tf
    cfg = tf.ViTConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                       intermediate_size=96, num_labels=3)
    torch.manual_seed(0)
    return tf.ViTForImageClassification(cfg).eval(), _pix()


def clip_vision():
    import transformers as tf
    cfg = tf.CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
                              num_attention_heads=4, intermediate_size=96, projection_dim=32)
    torch.manual_seed(0)
    return tf.CLIPVisionModelWithProjection(cfg).eval(), _pix()


def swin():
    import transformers as tf
    cfg = tf.SwinConfig(image_size=32, patch_size=2, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                        window_size=4, num_labels=3)
    torch.manual_seed(0)
    return tf.SwinForImageClassification(cfg).eval(), _pix()


def convnext():
    import transformers as tf
    cfg = tf.ConvNextConfig(image_size=32, hidden_sizes=[16, 32], depths=[1, 1], num_stages=2, num_labels=3)
    torch.manual_seed(0)
    return tf.ConvNextForImageClassification(cfg).eval(), _pix()


def mobilenet_v2():
    import transformers as tf
    cfg = tf.MobileNetV2Config(image_size=32, depth_multiplier=0.25, num_labels=3)
    torch.manual_seed(0)
    return tf.MobileNetV2ForImageClassification(cfg).eval(), _pix()


def efficientnet():
    import transformers as tf
    cfg = tf.EfficientNetConfig(image_size=32, width_coefficient=0.25, depth_coefficient=0.25,
                                hidden_dim=320, num_labels=3)
    torch.manual_seed(0)
    return tf.EfficientNetForImageClassification(cfg).eval(), _pix()


def regnet():
    import transformers as tf
    cfg = tf.RegNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], groups_width=8,
                          num_labels=3)
    torch.manual_seed(0)
    return tf.RegNetForImageClassification(cfg).eval(), _pix()


def resnet():
    import transformers as tf
    cfg = tf.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1], layer_type="basic",
                          num_labels=3)
    torch.manual_seed(0)
    return tf.ResNetForImageClassification(cfg).eval(), _pix()


def whisper_encoder():
    import transformers as tf
    cfg = tf.WhisperConfig(vocab_size=128, num_mel_bins=16, d_model=64, encoder_layers=2, encoder_attention_heads=4,
                           decoder_layers=2, decoder_attention_heads=4, encoder_ffn_dim=96, decoder_ffn_dim=96,
                           max_source_positions=16, max_target_positions=16, num_labels=3)
    torch.manual_seed(0)
    x = {"input_features": torch.randn(2, 16, 32, generator=_gen())}
    return tf.WhisperForAudioClassification(cfg).eval(), x


def wav2vec2():
    import transformers as tf
    cfg = tf.Wav2Vec2Config(vocab_size=32, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                            intermediate_size=96, conv_dim=(16, 16), conv_stride=(5, 2), conv_kernel=(10, 3),
                            num_conv_pos_embeddings=8, num_conv_pos_embedding_groups=4, num_labels=3,
                            do_stable_layer_norm=False)
    torch.manual_seed(0)
    x = {"input_values": torch.randn(2, 400, generator=_gen())}
    return tf.Wav2Vec2ForSequenceClassification(cfg).eval(), x


class Fire(nn.Module):
    """SqueezeNet's Fire module: a 1x1 "squeeze" conv, then 1x1 and 3x3 "expand" convs whose
    outputs are concatenated on the channel axis."""

    def __init__(self, c_in, squeeze, expand1, expand3):
        super().__init__()
        self.squeeze = nn.Conv2d(c_in, squeeze, 1)
        self.expand1x1 = nn.Conv2d(squeeze, expand1, 1)
        self.expand3x3 = nn.Conv2d(squeeze, expand3, 3, padding=1)

    def forward(self, x):
        s = torch.relu(self.squeeze(x))
        return torch.cat([torch.relu(self.expand1x1(s)), torch.relu(self.expand3x3(s))], 1)


class SqueezeNet11(nn.Module):
    """SqueezeNet 1.1 (Iandola et al. 2016; v1.1: 3x3 stem of 64 channels, pooling after
    fire 3 and fire 5): stem conv 3x3/2 + max-pool 3/2, fires (squeeze, expand 1x1, expand
    3x3) 16-64-64 x2, pool, 32-128-128 x2, pool, 48-192-192 x2, 64-256-256 x2, then dropout,
    a 1x1 conv to the classes, ReLU and global average pooling."""

    FIRES = ((64, 16, 64, 64), (128, 16, 64, 64), "pool", (128, 32, 128, 128), (256, 32, 128, 128), "pool",
             (256, 48, 192, 192), (384, 48, 192, 192), (384, 64, 256, 256), (512, 64, 256, 256))

    def __init__(self, num_classes=10):
        super().__init__()
        layers = [nn.Conv2d(3, 64, 3, stride=2), nn.ReLU(), nn.MaxPool2d(3, 2, ceil_mode=True)]
        for f in self.FIRES:
            layers.append(nn.MaxPool2d(3, 2, ceil_mode=True) if f == "pool" else Fire(*f))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Sequential(nn.Dropout(0.5), nn.Conv2d(512, num_classes, 1), nn.ReLU(),
                                        nn.AdaptiveAvgPool2d(1))

    def forward(self, pixel_values):
        return self.classifier(self.features(pixel_values)).flatten(1)


def squeezenet():
    """Written here (torchvision's CPU wheel does not load against this torch); 1.24M parameters."""
    torch.manual_seed(0)
    return SqueezeNet11().eval(), _pix()


ZOO = {f.__name__: f for f in (llama, mistral, qwen2, gpt2, t5, bert, roberta, distilbert, vit, clip_vision,
                               swin, convnext, mobilenet_v2, efficientnet, regnet, resnet, whisper_encoder,
                               wav2vec2, squeezenet)}
