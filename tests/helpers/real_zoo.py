"""Real-architecture zoo: third-party models (Hugging Face ``transformers``) at their own init.

tests/helpers/zoo.py calibrated the diagnosis on hand-built models. This zoo is what it must also get right:
the architectures people train, built from small configs at random init (no download), each with
a cross-entropy loss on its logits against random labels and generated data. Healthy ones must stay
silent; broken ones carry the answer decided from first principles (``why``) and which flag must
fire first on which layer (``expect``).

Run ``python -m tests.helpers.real_zoo`` for the table (``--white-noise`` feeds the vision models white
noise instead of smooth images; ``--only NAME[,NAME]`` restricts the cases).
"""

from __future__ import annotations

import contextlib
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import torchdiag

FLAGS = ("exploding", "vanishing", "nonfinite", "dead", "saturated", "large_updates", "small_updates")

_T: Any = None  # the transformers module, imported once on first use


def _tf() -> Any:
    global _T
    if _T is None:
        from tests.helpers.thirdparty import import_torchvision

        import_torchvision()  # transformers imports it when it is installed (also outside pytest: python -m ...)
        import transformers

        transformers.logging.set_verbosity_error()
        _T = transformers
    return _T


def _hf(model_cls: str, config_cls: str, **cfg: Any) -> Callable[[], nn.Module]:
    """A factory: ``transformers.<model_cls>(transformers.<config_cls>(**cfg))``, at the library's own init."""

    def build() -> nn.Module:
        t = _tf()
        config = getattr(t, config_cls)(**cfg)
        return getattr(t, model_cls)(config)

    return build


# ----------------------------------------------------------------------------- data
# Every data factory takes (generator, white) and returns (inputs for model(*inputs), labels).
BATCH_TEXT, SEQ, VOCAB = 8, 16, 512
BATCH_IMG, CLASSES = 8, 10


def _smooth_images(g: torch.Generator, batch: int, size: int, white: bool) -> torch.Tensor:
    """Smooth random images (4x4 noise, bicubic up-sampling, unit std) or, with ``white``, i.i.d. N(0, 1) pixels."""
    if white:
        return torch.randn(batch, 3, size, size, generator=g)
    low = torch.randn(batch, 3, 4, 4, generator=g)
    x = F.interpolate(low, size=(size, size), mode="bicubic", align_corners=False)
    return (x - x.mean()) / x.std()


def _img(size: int = 32, classes: int = CLASSES, batch: int = BATCH_IMG):
    def make(g: torch.Generator, white: bool = False):
        return (_smooth_images(g, batch, size, white),), torch.randint(0, classes, (batch,), generator=g)

    return make


def _mlm(vocab: int = VOCAB, mask_id: int = 4, t: int = SEQ, batch: int = BATCH_TEXT):
    """Masked LM: 15 % of the positions are replaced by the mask token and labelled (at least one per row)."""

    def make(g: torch.Generator, white: bool = False):
        ids = torch.randint(5, vocab, (batch, t), generator=g)
        masked = torch.rand(batch, t, generator=g) < 0.15
        masked[:, 1] = True
        labels = torch.where(masked, ids, torch.full_like(ids, -100))
        return (ids.masked_fill(masked, mask_id),), labels

    return make


def _causal(vocab: int = VOCAB, t: int = SEQ, batch: int = BATCH_TEXT, low: int = 0):
    """Causal LM: labels are the inputs; the loss shifts them (next-token prediction). ``low``: the smallest token
    id drawn, above a config's special ids where one of them has a padding embedding (an all-zero row)."""

    def make(g: torch.Generator, white: bool = False):
        ids = torch.randint(low, vocab, (batch, t), generator=g)
        return (ids,), ids

    return make


def _seq2seq(vocab: int = VOCAB, t: int = SEQ, batch: int = BATCH_TEXT):
    """T5: forward(input_ids, attention_mask, decoder_input_ids); labels are the decoder targets."""

    def make(g: torch.Generator, white: bool = False):
        src = torch.randint(2, vocab, (batch, t), generator=g)
        tgt = torch.randint(2, vocab, (batch, t), generator=g)
        dec = torch.cat([torch.zeros(batch, 1, dtype=torch.long), tgt[:, :-1]], 1)  # T5 starts with pad id 0
        return (src, None, dec), tgt

    return make


def _seq_cls(vocab: int = VOCAB, t: int = SEQ, classes: int = CLASSES, batch: int = BATCH_TEXT):
    def make(g: torch.Generator, white: bool = False):
        return (torch.randint(5, vocab, (batch, t), generator=g),), torch.randint(0, classes, (batch,), generator=g)

    return make


def _vec(dim: int, classes: int = CLASSES, batch: int = 32, dtype: torch.dtype = torch.float32):
    def make(g: torch.Generator, white: bool = False):
        return (torch.randn(batch, dim, generator=g).to(dtype),), torch.randint(0, classes, (batch,), generator=g)

    return make


# ----------------------------------------------------------------------------- losses
def _logits(out: Any) -> torch.Tensor:
    return out.logits if hasattr(out, "logits") else out


def ce(out: Any, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the logits against labels of the same leading shape (-100 ignored), in float32."""
    logits = _logits(out).float()
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100)


def causal_ce(out: Any, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy: position t predicts token t+1."""
    logits = _logits(out).float()[:, :-1]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))


# ----------------------------------------------------------------------------- broken builders
def vgg_plain(std: float = 0.01) -> nn.Module:
    """VGG-style plain conv stack: no normalisation, ReLU, widths 16 -> 32 -> 64, every weight N(0, std), biases 0."""
    widths = [(3, 16), (16, 16), (16, 16), (16, 16), (16, 16), "pool", (16, 32), (32, 32), (32, 32), (32, 32),
              (32, 32), "pool"]
    layers: list[nn.Module] = []
    for w in widths:
        if w == "pool":
            layers.append(nn.MaxPool2d(2))
            continue
        conv = nn.Conv2d(w[0], w[1], 3, padding=1)
        nn.init.normal_(conv.weight, 0.0, std)
        nn.init.zeros_(conv.bias)
        layers += [conv, nn.ReLU()]
    head = nn.Linear(32, CLASSES)
    nn.init.normal_(head.weight, 0.0, std)
    nn.init.zeros_(head.bias)
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), head)


def _resnet_cfg(**over: Any) -> dict:
    cfg = dict(num_channels=3, embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 4, 1],
               layer_type="bottleneck")
    cfg.update(over)
    return cfg


def resnet_without_norm() -> nn.Module:
    """HF ResNet (basic blocks, one deep stage) with every BatchNorm replaced by Identity (no Fixup rescaling)."""
    model = _hf("ResNetForImageClassification", "ResNetConfig", num_labels=CLASSES,
                **_resnet_cfg(layer_type="basic", hidden_sizes=[16, 32], depths=[12, 2]))()
    _replace(model, nn.BatchNorm2d, lambda m: nn.Identity())
    return model


def resnet_bn_bias(bias: float = -3.0) -> nn.Module:
    """HF ResNet whose BatchNorm biases are all ``bias``: every ReLU sees N(bias, 1)."""
    model = _hf("ResNetForImageClassification", "ResNetConfig", num_labels=CLASSES, **_resnet_cfg())()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            nn.init.constant_(m.bias, bias)
    return model


def bn_reset(build: Callable[[], nn.Module]) -> Callable[[], nn.Module]:
    """The model with every BatchNorm at weight 1, bias 0 (PyTorch's, timm's and the papers' init)."""

    def make() -> nn.Module:
        model = build()
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        return model

    return make


def _replace(model: nn.Module, cls: type, make: Callable[[nn.Module], nn.Module]) -> None:
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, cls):
                setattr(parent, name, make(child))


def mlp(depth: int, width: int, act: Callable[[], nn.Module], init: str | None, bias: float | None = None,
        classes: int = CLASSES) -> nn.Module:
    """``depth`` x (Linear + act) + Linear head; ``init`` 'kaiming' | 'xavier' | None (PyTorch's default)."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        lin = nn.Linear(width, width)
        if init == "kaiming":
            nn.init.kaiming_normal_(lin.weight, nonlinearity="relu")
            nn.init.zeros_(lin.bias)
        elif init == "xavier":
            nn.init.xavier_normal_(lin.weight)
            nn.init.zeros_(lin.bias)
        if bias is not None:
            nn.init.constant_(lin.bias, bias)
        layers += [lin, act()]
    return nn.Sequential(*layers, nn.Linear(width, classes))


def randn_products(depth: int = 40, width: int = 512) -> nn.Module:
    model = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(depth)])
    with torch.no_grad():
        for lin in model:
            lin.weight.copy_(torch.randn(width, width))
    return model


def fp16_overflow(layer: int = 3, factor: float = 1e5) -> nn.Module:
    """Kaiming ReLU MLP (run under float16 autocast) with one hidden Linear's weights x ``factor``."""
    model = mlp(6, 128, nn.ReLU, "kaiming")
    with torch.no_grad():
        model[2 * layer].weight.mul_(factor)
    return model


# ----------------------------------------------------------------------------- cases
@dataclass
class Case:
    name: str
    library: str
    build: Callable[[], nn.Module]
    data: Callable[..., tuple]  # (generator, white=False) -> (inputs tuple, labels)
    healthy: bool
    why: str
    expect: dict[str, str] = field(default_factory=dict)  # flag -> first layer it must fire on
    expect_sgd: dict[str, str] | None = None  # where SGD's first bad layer differs
    lr: dict[str, float] = field(default_factory=lambda: {"sgd": 0.01, "adamw": 1e-3})
    loss: Callable[[Any, torch.Tensor], torch.Tensor] = ce
    image: bool = False  # takes an image: white noise can replace the smooth images
    autocast: torch.dtype | None = None  # forward under torch.autocast("cpu", dtype=...) (fp32 weights, AMP-style)


def _text(name: str, model_cls: str, config_cls: str, data, why: str, loss=ce, **cfg: Any) -> Case:
    return Case(name, "transformers", _hf(model_cls, config_cls, **cfg), data, True, why, loss=loss)


def _vision(name: str, model_cls: str, config_cls: str, why: str, size: int = 32, **cfg: Any) -> Case:
    return Case(name, "transformers", _hf(model_cls, config_cls, num_labels=CLASSES, **cfg), _img(size), True,
                why, image=True)


_BERTLIKE = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, intermediate_size=128,
                 max_position_embeddings=64)
_LLAMALIKE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, attn_implementation="eager")
_VITLIKE = dict(image_size=32, patch_size=4, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                intermediate_size=128)
_EFFNET = dict(image_size=64, width_coefficient=0.25, depth_coefficient=1.0, hidden_dim=320, dropout_rate=0.2)
_MOBILEVIT = dict(image_size=64, hidden_sizes=[32, 48, 64], neck_hidden_sizes=[8, 16, 24, 32, 40, 48, 96])

HEALTHY = [
    _text("bert_mlm", "BertForMaskedLM", "BertConfig", _mlm(), "BERT, post-LN, N(0, 0.02), MLM head tied to the"
          " word embeddings", **_BERTLIKE),
    _text("roberta_mlm", "RobertaForMaskedLM", "RobertaConfig", _mlm(), "RoBERTa: BERT's body, positions offset by"
          " the padding index", **{**_BERTLIKE, "max_position_embeddings": 66, "pad_token_id": 1}),
    _text("distilbert_mlm", "DistilBertForMaskedLM", "DistilBertConfig", _mlm(), "DistilBERT: 4 post-LN blocks,"
          " N(0, 0.02)", vocab_size=VOCAB, dim=64, n_layers=4, n_heads=4, hidden_dim=128, max_position_embeddings=64),
    _text("albert_mlm", "AlbertForMaskedLM", "AlbertConfig", _mlm(), "ALBERT: one shared layer called 4 times,"
          " factorised embeddings (32 -> 64)", vocab_size=VOCAB, embedding_size=32, hidden_size=64,
          num_hidden_layers=4, num_attention_heads=4, intermediate_size=128, max_position_embeddings=64),
    _text("gpt2_lm", "GPT2LMHeadModel", "GPT2Config", _causal(), "GPT-2: pre-LN, N(0, 0.02), residual projections"
          " N(0, 0.02/sqrt(2L)), tied head", loss=causal_ce, vocab_size=VOCAB, n_embd=64, n_layer=4, n_head=4,
          n_positions=64, attn_implementation="eager"),
    _text("llama_lm", "LlamaForCausalLM", "LlamaConfig", _causal(), "Llama: RMSNorm, SwiGLU, RoPE, GQA, N(0, 0.02)",
          loss=causal_ce, **_LLAMALIKE),
    _text("mistral_lm", "MistralForCausalLM", "MistralConfig", _causal(), "Mistral: Llama's body, sliding window",
          loss=causal_ce, **_LLAMALIKE),
    _text("qwen2_lm", "Qwen2ForCausalLM", "Qwen2Config", _causal(), "Qwen2: Llama's body with q/k/v biases",
          loss=causal_ce, **_LLAMALIKE),
    # OLMo2's pad_token_id is 1 and its embedding row is all zero: a sequence that starts with it (unmasked) keeps an
    # exactly-zero residual stream through every block, where each RMSNorm's backward gain is 1/sqrt(eps) = 316, so
    # that token's gradient grows ~8x per block (2.5e6x over 8) while no weight sees it (their inputs are 0 there).
    # Text has no pad token, and padding is masked: the content tokens are drawn above the special ids, as _mlm's are
    _text("olmo2_lm", "Olmo2ForCausalLM", "Olmo2Config", _causal(low=5), "OLMo2: no pre-norm, x + RMSNorm(branch(x)),"
          " QK-norm, embeddings at rms 0.02: the residual grows from 0.02 to ~3 over 8 blocks and v_proj's gradient"
          " falls ~3x per block (~10x over the first two, 1.2-2x deeper), inside the band of a chain with norms",
          loss=causal_ce, **{**_LLAMALIKE, "num_hidden_layers": 8}),
    _text("t5_seq2seq", "T5ForConditionalGeneration", "T5Config", _seq2seq(), "T5: 4+4 RMS-norm blocks, relative"
          " positions, its own (fan-scaled) init, tied head rescaled by d_model^-0.5", vocab_size=VOCAB, d_model=64,
          d_kv=16, d_ff=128, num_layers=4, num_heads=4, decoder_start_token_id=0),
    _vision("vit", "ViTForImageClassification", "ViTConfig", "ViT: 64 patches of 4x4 + CLS, pre-LN, truncated"
            " N(0, 0.02)", **_VITLIKE),
    _vision("deit", "DeiTForImageClassification", "DeiTConfig", "DeiT: ViT with a distillation token", **_VITLIKE),
    _vision("beit", "BeitForImageClassification", "BeitConfig", "BEiT: relative position bias, LayerScale 0.1,"
            " mean pooling", use_mean_pooling=True, **_VITLIKE),
    _vision("data2vec_vision", "Data2VecVisionForImageClassification", "Data2VecVisionConfig", "Data2Vec-vision:"
            " BEiT's body", use_mean_pooling=True, **_VITLIKE),
    _vision("dinov2", "Dinov2ForImageClassification", "Dinov2Config", "DINOv2: LayerScale 1.0, interpolated"
            " position embeddings", hidden_size=64, num_hidden_layers=4, num_attention_heads=4, mlp_ratio=2,
            image_size=32, patch_size=4),
    _vision("swin", "SwinForImageClassification", "SwinConfig", "Swin: windowed attention, patch merging",
            image_size=32, patch_size=2, embed_dim=16, depths=[2, 4], num_heads=[2, 4], window_size=4),
    _vision("convnext", "ConvNextForImageClassification", "ConvNextConfig", "ConvNeXt: depthwise 7x7 + inverted MLP,"
            " LayerScale 1e-6", hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 4, 1], image_size=32),
    _vision("convnextv2", "ConvNextV2ForImageClassification", "ConvNextV2Config", "ConvNeXt-V2: global response"
            " norm (zero-init gamma/beta), no LayerScale", hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 4, 1],
            image_size=32),
    _vision("resnet", "ResNetForImageClassification", "ResNetConfig", "ResNet-50-shaped bottlenecks, BatchNorm,"
            " Kaiming fan_out", size=64, **_resnet_cfg()),
    _vision("regnet", "RegNetForImageClassification", "RegNetConfig", "RegNet-Y: grouped convs, squeeze-excite",
            size=64, embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 4, 1], groups_width=8),
    _vision("mobilenet_v2", "MobileNetV2ForImageClassification", "MobileNetV2Config", "MobileNetV2: inverted"
            " residuals, ReLU6, linear bottlenecks", size=64, image_size=64, depth_multiplier=0.35),
    Case("efficientnet", "transformers", bn_reset(_hf("EfficientNetForImageClassification", "EfficientNetConfig",
         num_labels=CLASSES, **_EFFNET)), _img(64), True, "EfficientNet-B0-shaped at width 0.25: MBConv, SiLU,"
         " squeeze-excite; BatchNorm reset to (1, 0) (HF 5.x draws its weights from N(0, 0.02): efficientnet_hf_init)",
         image=True),
    _vision("levit", "LevitForImageClassification", "LevitConfig", "LeViT: conv stem (stride 16), attention with"
            " biases, Hardswish, BatchNorm in every linear", size=64, image_size=64, hidden_sizes=[32, 48, 64],
            num_attention_heads=[2, 3, 4], depths=[4, 4, 4], key_dim=[8, 8, 8]),
    _vision("poolformer", "PoolFormerForImageClassification", "PoolFormerConfig", "PoolFormer: average-pool token"
            " mixer, GroupNorm, LayerScale 1e-5", hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 4, 1]),
    Case("mobilevit", "transformers", bn_reset(_hf("MobileViTForImageClassification", "MobileViTConfig",
         num_labels=CLASSES, **_MOBILEVIT)), _img(64), True, "MobileViT: MobileNetV2 blocks + transformer over"
         " unfolded patches, SiLU; BatchNorm reset to (1, 0) (HF draws its weights from N(0, 0.02): mobilevit_hf_init)",
         image=True),
    Case("kaiming_mlp_fp16", "torch", lambda: mlp(6, 128, nn.ReLU, "kaiming"), _vec(128), True,
         "6 x Linear+ReLU, Kaiming, forward under float16 autocast: activations ~1, far from 65504 (the control"
         " for fp16_overflow)", autocast=torch.float16),
]

BROKEN = [
    Case("vgg_plain_std0.01", "torch", vgg_plain, _img(32), False,
         "Simonyan & Zisserman's N(0, 0.01) without BatchNorm: each 3x3 conv multiplies the rms by"
         " sqrt(fan_in * 1e-4 / 2) = 0.04 (first conv, fan_in 27, no ReLU before), 0.085 (16 ch), 0.12 (32 ch): the"
         " signal vanishes from the first conv on, forward and backward; the first conv is already 25x down",
         {"vanishing": "0"}, image=True),
    Case("resnet_without_norm", "transformers", resnet_without_norm, _img(32), False,
         "BatchNorm -> Identity, Kaiming fan_out kept (Fixup, Zhang et al. 2019): each basic block adds a branch of"
         " variance ~2x its input's to the identity, so the residual sum's second moment grows ~2x per block"
         " (measured ~1.4x in rms): forward and backward exploding along the 12-block stage, ~40x end to end."
         " No single layer is the cause; the growth starts at the first block, and its gradient is the largest",
         {"exploding": "resnet.encoder.stages.0.layers.0.layer.0.convolution"}, image=True),
    Case("xavier_relu_mlp", "torch", lambda: mlp(30, 256, nn.ReLU, "xavier"), _vec(256), False,
         "Xavier before ReLU halves the second moment per layer, forward and backward (He et al. 2015):"
         " 30 layers = 2^-15 in variance", {"vanishing": "0"}),
    Case("tanh_mlp_default_init", "torch", lambda: mlp(12, 128, nn.Tanh, None), _vec(128), False,
         "PyTorch's default Linear init is U(-1/sqrt(n), 1/sqrt(n)) = Glorot & Bengio's 'standard' init: n*Var(W) ="
         " 1/3, so in tanh's linear regime the backward gradient shrinks by sqrt(3) per layer with nothing to stop it"
         " (3^-5.5 ~ 2e-3 over 12 layers); the forward shrinks too until the biases (var 1/(3n)) hold it near"
         " std 0.06: backward vanishing, worst at the first Linear", {"vanishing": "0"}),
    Case("randn_products", "torch", randn_products, _vec(512, 512, 16), False,
         "randn(512, 512) weights multiply the std by sqrt(512) = 22.6 per layer; float32 overflows at 0-based layer"
         " 27 (ref/002: NaN after ~28 products)", {"exploding": "0", "nonfinite": "27"}),
    Case("dead_bias_mlp", "torch", lambda: mlp(12, 128, nn.ReLU, "kaiming", bias=-3.0), _vec(128), False,
         "every bias -3 before ReLU: the first pre-activation is N(-3, 2) (inputs N(0,1), Kaiming), so 98 % of the"
         " first ReLU's outputs are 0 and deeper ones are ~100 % 0", {"dead": "1"}),
    Case("resnet_bn_bias_-3", "transformers", resnet_bn_bias, _img(64), False,
         "every BatchNorm bias -3: each ReLU sees N(-3, 1), 99.9 % zeros, from the stem's ReLU on",
         {"dead": "resnet.embedder.embedder.activation"}, image=True),
    Case("learning_rate_too_high", "transformers", _hf("GPT2LMHeadModel", "GPT2Config", vocab_size=VOCAB, n_embd=64,
         n_layer=4, n_head=4, n_positions=64, attn_implementation="eager"), _causal(), False,
         "GPT-2 at AdamW lr 1 (Adam's first step moves every weight by ~lr, 50x the 0.02 init) / SGD lr 1000:"
         " one step replaces the weights", {"large_updates": "transformer.wte"},
         lr={"sgd": 1000.0, "adamw": 1.0}, loss=causal_ce),
    Case("fp16_overflow", "torch", fp16_overflow, _vec(128), False,
         "Kaiming MLP under float16 autocast with Linear '6' x 1e5: its outputs' rms is ~1e5 > 65504, so it is the"
         " first layer that holds inf; its inputs (rms ~1) and the layers before are fine", {"nonfinite": "6"},
         autocast=torch.float16),
    Case("bert_init_range_1", "transformers", _hf("BertForSequenceClassification", "BertConfig", num_labels=CLASSES,
         initializer_range=1.0, **_BERTLIKE), _seq_cls(), False,
         "initializer_range 1 (50x BERT's 0.02): q and k have std 8 after the LayerNorm'd input, so the attention"
         " logits have std ~64 and the softmax is one-hot: attention entropy collapsed from block 0 (on its first"
         " watched layer, the query); the LayerNorms hold every block at unit scale, so no drift; the pooler's"
         " Linear (N(0,1), 64 inputs) gives its tanh pre-activations of std 8: ~75 % of the outputs beyond 0.99",
         {"saturated": "bert.pooler.activation", "attention_entropy": "bert.encoder.layer.0.attention.self.query"}),
]

BROKEN += [
    Case("efficientnet_hf_init", "transformers", _hf("EfficientNetForImageClassification", "EfficientNetConfig",
         num_labels=CLASSES, **_EFFNET), _img(64), False,
         "transformers 5.x's EfficientNet._init_weights draws every BatchNorm weight from N(0, 0.02): each BN"
         " multiplies its normalised output by ~0.02, and most MBConv blocks have no residual, so the signal"
         " shrinks ~50x per BN from the stem on (measured: gradient at the stem 1e-39 of the head's); the stem's"
         " BatchNorm is the first layer to blame", {"vanishing": "efficientnet.embeddings.batchnorm"}, image=True),
    Case("mobilevit_hf_init", "transformers", _hf("MobileViTForImageClassification", "MobileViTConfig",
         num_labels=CLASSES, **_MOBILEVIT), _img(64), False,
         "MobileViT._init_weights draws every BatchNorm weight from N(0, 0.02): the stem's BN scales the signal"
         " by ~0.02 and so does every conv block without a residual (the transformer's LayerNorms then divide a"
         " signal of 1e-6 by sqrt(eps): their outputs grow block after block, a consequence)",
         {"vanishing": "mobilevit.conv_stem.normalization"}, image=True),
]

CASES = HEALTHY + BROKEN


# ----------------------------------------------------------------------------- running
def verdict(case: Case, optimizer: str, fired: dict[str, tuple[str, int]]) -> str | None:
    """None if what fired is right for the case, else why not: the hand-built zoo's rule (``tests/helpers/zoo.py``)."""
    from tests.helpers.zoo import verdict as zoo_verdict

    return zoo_verdict(case, optimizer, fired)


def _optimizer(case: Case, name: str, model: nn.Module) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "adamw":
        return torch.optim.AdamW(params, lr=case.lr["adamw"])
    if name == "sgd":
        return torch.optim.SGD(params, lr=case.lr["sgd"], momentum=0.9)
    raise ValueError(f"optimizer must be 'adamw' or 'sgd', got {name!r}")


def run(case: Case, optimizer: str = "adamw", steps: int = 3, pass_optimizer: bool = True, seed: int = 0,
        white: bool = False, scaler: bool = False) -> dict:
    """Train ``steps`` steps under ``torchdiag.watch``; return {flag: (first layer, step)}, the warnings, the report.

    ``pass_optimizer``: ``watch(model, optimizer=opt)`` (a step ends at ``opt.step()``, update ratios are
    measured); else ``watch(model)`` and the loop calls ``diag.step()`` after ``opt.step()``. ``scaler``: the AMP
    recipe of float16 training, a ``GradScaler`` (given to the watch) around the case's autocast.
    """
    torch.manual_seed(seed)
    model = case.build()
    model.train()
    g = torch.Generator().manual_seed(seed + 1)
    opt = _optimizer(case, optimizer, model)
    fired: dict[str, tuple[str, int]] = {}
    report = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        amp = torch.amp.GradScaler("cpu") if scaler else None
        with torchdiag.watch(model, optimizer=opt if pass_optimizer else None, scaler=amp) as diag:
            for _ in range(steps):
                inputs, labels = case.data(g, white=white)
                with _autocast(case):
                    loss = case.loss(model(*inputs), labels)
                if amp is not None:
                    amp.scale(loss).backward()
                    amp.step(opt)  # with optimizer=opt this ends the watcher's step (unless the scaler skips it)
                    amp.update()
                else:
                    loss.backward()
                    opt.step()  # with optimizer=opt this ends the watcher's step
                opt.zero_grad()
                report = diag.step()  # the report of the step that just ended
                if report is None:
                    continue
                for layer in report.layers:
                    for flag in sorted(layer.status):
                        fired.setdefault(flag, (layer.name, report.step))
    msgs = [str(w.message) for w in caught if issubclass(w.category, torchdiag.DiagnosticWarning)]
    return {"fired": fired, "warnings": msgs, "report": report}


def check_case(case: Case, seed: int = 0, white: bool = False) -> torchdiag.Report:
    """``torchdiag.check`` on the freshly built model with the case's own loss (one forward and backward)."""
    torch.manual_seed(seed)
    model = case.build()
    model.train()
    inputs, labels = case.data(torch.Generator().manual_seed(seed + 1), white=white)
    with _autocast(case):
        return torchdiag.check(model, *inputs, loss_fn=lambda out: case.loss(out, labels))


def _autocast(case: Case) -> Any:
    return torch.autocast("cpu", dtype=case.autocast) if case.autocast is not None else contextlib.nullcontext()


def _cell(fired: dict[str, tuple[str, int]], flag: str) -> str:
    return f"`{fired[flag][0]}`@{fired[flag][1]}" if flag in fired else ""


def table(cases: list[Case] | None = None, optimizers=("adamw", "sgd"), steps: int = 3, white: bool = False,
          out=sys.stdout) -> dict:
    """Print the markdown table (one row per model x optimizer x passed optimizer=); return the tallies."""
    cases = CASES if cases is None else cases
    print("| model | library | healthy | optimizer | passed optimizer= | " + " | ".join(FLAGS) + " | s |", file=out)
    print("|" + " --- |" * (6 + len(FLAGS)), file=out)
    false_alarms, runs, judged, misses, times = [], 0, 0, [], []
    for case in cases:
        for opt in optimizers:
            for passed in (True, False):
                t0 = time.perf_counter()
                res = run(case, opt, steps, pass_optimizer=passed, white=white and case.image)
                dt = time.perf_counter() - t0
                times.append((dt, case.name))
                fired = res["fired"]
                cells = [_cell(fired, f) for f in FLAGS]
                print(f"| {case.name} | {case.library} | {'yes' if case.healthy else 'no'} | {opt} |"
                      f" {'yes' if passed else 'no'} | " + " | ".join(cells) + f" | {dt:.2f} |", file=out, flush=True)
                if case.healthy:
                    runs += 1
                    if fired:
                        false_alarms.append((case.name, opt, passed))
                elif "large_updates" in case.expect and not passed:
                    pass  # update ratios need watch(..., optimizer=): nothing to miss
                else:
                    judged += 1
                    bad = verdict(case, opt, fired)
                    if bad:
                        misses.append((case.name, opt, passed, bad))
    healthy_runs = runs
    print(f"\nfalse alarms: {len(false_alarms)} of {healthy_runs} healthy model-runs fired a flag", file=out)
    print(f"misses: {len(misses)} of {judged} broken model-runs not flagged right (large_updates without"
          " optimizer= is not judged)", file=out)
    for m in misses:
        print(f"  - {m[0]} ({m[1]}, optimizer= {'yes' if m[2] else 'no'}): {m[3]}", file=out)
    total = sum(t for t, _ in times)
    slowest = max(times) if times else (0.0, "")
    print(f"time: {total:.1f} s for {len(times)} runs ({total / max(len(times), 1):.2f} s mean,"
          f" slowest {slowest[0]:.2f} s: {slowest[1]})", file=out)
    return {"false_alarms": false_alarms, "misses": misses, "times": times}


def model_table(cases: list[Case] | None = None, steps: int = 3, white: bool = False, out=sys.stdout) -> int:
    """One row per model (the table in docs/diagnosis.md): what fired where over its four runs (AdamW and SGD, with and
    without ``optimizer=``), what should; returns the number of healthy model-runs with a false alarm."""
    cases = CASES if cases is None else cases
    print("| library | model | healthy | what fired (first layer @ step, over AdamW/SGD, with/without optimizer=)"
          " | right answer |", file=out)
    print("| --- | --- | --- | --- | --- |", file=out)
    false_alarms = 0
    for case in cases:
        fired: dict[str, set[str]] = {}
        for opt in ("adamw", "sgd"):
            for passed in (True, False):
                got = run(case, opt, steps, pass_optimizer=passed, white=white and case.image)["fired"]
                false_alarms += bool(case.healthy and got)
                for flag, (layer, step) in got.items():
                    fired.setdefault(flag, set()).add(f"`{layer}` @{step}")
        what = "; ".join(f"{flag} {', '.join(sorted(v))}" for flag, v in fired.items()) or "nothing"
        right = "nothing" if case.healthy else "; ".join(f"{k} `{v}`" for k, v in case.expect.items())
        print(f"| {case.library} | {case.name} | {'yes' if case.healthy else 'no'} | {what} | {right} |", file=out,
              flush=True)
    print(f"\nfalse alarms: {false_alarms} healthy model-runs with any flag", file=out)
    return false_alarms


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--white-noise", action="store_true", help="white-noise images instead of smooth ones")
    parser.add_argument("--only", default="", help="comma-separated case names")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--by-model", action="store_true", help="one row per model (the table in docs/diagnosis.md)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cases = CASES
    if args.only:
        names = set(args.only.split(","))
        cases = [c for c in [*CASES, *KNOWN_FALSE_ALARMS, DEEP_LLAMA] if c.name in names]
    if args.by_model:
        model_table(cases, steps=args.steps, white=args.white_noise)
        return
    table(cases, steps=args.steps, white=args.white_noise)
    print(f"\ncell = first layer the flag fired on @ the step it first fired ({args.steps} steps, every=1)")


# healthy models torchdiag still flags, run by `--only NAME` (none now: OLMo2, flagged on a batch whose sequence
# started with its zero-embedding pad token, is in HEALTHY with content tokens; docs/training-loops.md)
KNOWN_FALSE_ALARMS: list[Case] = []

DEEP_LLAMA = _text("llama16_lm", "LlamaForCausalLM", "LlamaConfig", _causal(), "Llama at 16 layers: the pre-norm"
                   " residual stream grows with depth and training, v_proj's gradient drifts ~15x along the blocks"
                   " by step 15 (a false alarm while LlamaRMSNorm was not known to be a norm)", loss=causal_ce,
                   **{**_LLAMALIKE, "num_hidden_layers": 16})
DEEP_LLAMA.lr = {"sgd": 0.01, "adamw": 3e-4}

__all__ = ["BROKEN", "CASES", "DEEP_LLAMA", "FLAGS", "HEALTHY", "KNOWN_FALSE_ALARMS", "Case", "check_case",
           "model_table", "run", "table", "verdict"]


if __name__ == "__main__":
    main()
