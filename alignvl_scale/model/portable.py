"""The model as inference needs it, in torch and transformers alone. `export --format hf` copies
this very file into the export (as modeling_alignvl.py, named by config.json's `auto_map`), so
that transformers loads the folder with no other package:

    from transformers import AutoModel, AutoProcessor, pipeline
    model = AutoModel.from_pretrained(folder, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    out = model(**processor(text=["a dog"], images=[image], return_tensors="pt"))

The package trains with the same pieces (model/head.py, model/towers.py): how a tower's tokens
become one vector (`pool`), the adapters, the temperature and the bias. The offline image tower
(EfficientNet-Lite0) is here parameter for parameter as efficientnet-lite-pytorch builds it.
Nothing in this file may import alignvl_scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import transformers
from torch import Tensor, nn
from transformers import AutoConfig, AutoModel, BatchFeature, PretrainedConfig, PreTrainedModel, ProcessorMixin
from transformers.utils import ModelOutput

# -- towers -----------------------------------------------------------------------------------


def pool(pooling: str, last_hidden_state: Tensor, attention_mask: Tensor | None = None,
         pooler_output: Tensor | None = None) -> Tensor:
    """One vector per input from a tower's outputs. `cls`: the first token; `mean`: the mean
    over the tokens the mask keeps; `last_token`: the last position the mask keeps, with left or
    right padding (decoder-only LLMs); `pooler`: the model's own pooler_output."""
    if pooling == "pooler":
        if pooler_output is None:
            raise ValueError("the tower has no pooler_output; pool with cls or mean")
        return pooler_output
    if pooling == "cls":
        return last_hidden_state[:, 0]
    if attention_mask is None:  # image tokens: all valid
        return last_hidden_state[:, -1] if pooling == "last_token" else last_hidden_state.mean(dim=1)
    if pooling == "mean":
        weights = attention_mask.to(last_hidden_state.dtype).unsqueeze(-1)
        return (last_hidden_state * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (positions * attention_mask.bool()).argmax(dim=1)  # the last kept position, whichever side pads
    return last_hidden_state[torch.arange(last_hidden_state.shape[0], device=last_hidden_state.device), last]


class _SameConv(nn.Conv2d):
    """TensorFlow's 'SAME' convolution with its padding fixed for `image_size` at construction
    (efficientnet-lite-pytorch's Conv2dStaticSamePadding: the same pads, the same weights)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, image_size: int, groups: int = 1) -> None:
        super().__init__(cin, cout, kernel, stride, groups=groups, bias=False)
        out = math.ceil(image_size / stride)
        pad = max((out - 1) * stride + kernel - image_size, 0)
        self.pads = (pad // 2, pad - pad // 2, pad // 2, pad - pad // 2)

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(F.pad(x, self.pads), self.weight, None, self.stride, 0, self.dilation, self.groups)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, momentum=0.01, eps=1e-3)


class _MBConv(nn.Module):
    def __init__(self, kernel: int, stride: int, expand: int, cin: int, cout: int, image_size: int) -> None:
        super().__init__()
        mid = cin * expand
        if expand != 1:
            self._expand_conv, self._bn0 = _SameConv(cin, mid, 1, 1, image_size), _bn(mid)
        self._depthwise_conv = _SameConv(mid, mid, kernel, stride, image_size, groups=mid)
        self._bn1 = _bn(mid)
        self._project_conv, self._bn2 = _SameConv(mid, cout, 1, 1, math.ceil(image_size / stride)), _bn(cout)
        self.skip = stride == 1 and cin == cout

    def forward(self, x: Tensor) -> Tensor:
        y = F.relu6(self._bn0(self._expand_conv(x))) if hasattr(self, "_expand_conv") else x
        y = self._bn2(self._project_conv(F.relu6(self._bn1(self._depthwise_conv(y)))))
        return x + y if self.skip else y


class EfficientNetLite0(nn.Module):
    """EfficientNet-Lite0 (no squeeze-excitation, ReLU6, fixed stem and head) at 224 px, its
    globally pooled 1280-d features; the state dict of efficientnet-lite-pytorch's model."""

    # (repeats, kernel, stride, expansion, in, out) of each stage
    STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
              (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))
    output_dim = 1280

    def __init__(self, image_size: int = 224) -> None:
        super().__init__()
        self._conv_stem, self._bn0 = _SameConv(3, 32, 3, 2, image_size), _bn(32)
        size, blocks = math.ceil(image_size / 2), []
        for repeats, kernel, stride, expand, cin, cout in self.STAGES:
            for i in range(repeats):
                blocks.append(_MBConv(kernel, stride if i == 0 else 1, expand, cin if i == 0 else cout, cout, size))
                size = math.ceil(size / stride) if i == 0 else size
        self._blocks = nn.ModuleList(blocks)
        self._conv_head, self._bn1 = _SameConv(320, 1280, 1, 1, size), _bn(1280)
        self._fc = nn.Linear(1280, 1000)  # the ImageNet classifier its weights come with; unused

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = F.relu6(self._bn0(self._conv_stem(pixel_values)))
        for block in self._blocks:
            x = block(x)
        return F.relu6(self._bn1(self._conv_head(x))).mean(dim=(2, 3))


class Tower(nn.Module):
    """A tower as an export describes it: {"kind": "hf", "config": the transformers config of
    the whole model, "sub": "vision_model" | "text_model" | null (the part of a dual encoder it
    is), "pooling": ...} or {"kind": "efficientnet_lite0"}."""

    def __init__(self, spec: dict) -> None:
        super().__init__()
        self.pooling = spec.get("pooling")
        if spec["kind"] == "efficientnet_lite0":
            self.model = EfficientNetLite0()
            return
        config = AutoConfig.for_model(**spec["config"])
        model = AutoModel.from_config(config)
        self.model = getattr(model, spec["sub"]) if spec.get("sub") else model

    def forward(self, **inputs: Tensor) -> Tensor:
        if isinstance(self.model, EfficientNetLite0):
            return self.model(inputs["pixel_values"])
        out = self.model(**inputs)
        return pool(self.pooling, out.last_hidden_state, inputs.get("attention_mask"),
                    getattr(out, "pooler_output", None))


# -- the head ---------------------------------------------------------------------------------


class ResidualMLPBlock(nn.Module):
    def __init__(self, dim: int, expansion: int, dropout: float) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, expansion * dim), nn.GELU(),
                                  nn.Dropout(dropout), nn.Linear(expansion * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


def build_adapter(kind: str, in_dim: int, out_dim: int, depth: int = 2, expansion: int = 4,
                  dropout: float = 0.1) -> nn.Module:
    """`mlp`: the FuseMix residual MLP (depth blocks, then LayerNorm + Linear to out_dim);
    `linear`: one Linear. Outputs are not normalized here."""
    if kind == "linear":
        return nn.Linear(in_dim, out_dim)
    if kind == "mlp":
        blocks = [ResidualMLPBlock(in_dim, expansion, dropout) for _ in range(depth)]
        return nn.Sequential(*blocks, nn.LayerNorm(in_dim), nn.Linear(in_dim, out_dim))
    raise ValueError(f"adapter kind must be 'mlp' or 'linear', got {kind!r}")


class _ClampMaxComeBack(torch.autograd.Function):
    """min(x, limit) whose gradient above the limit still lets x come down.

    A plain clamp has zero gradient above the limit, so a parameter that overshoots stays
    there for ever. Here, above the limit, a gradient that would lower x (positive, under
    gradient descent) passes through and one that would raise x further is dropped.
    """

    @staticmethod
    def forward(ctx, x: Tensor, limit: float) -> Tensor:
        ctx.save_for_backward(x)
        ctx.limit = limit
        return x.clamp(max=limit)

    @staticmethod
    def backward(ctx, grad: Tensor):
        (x,) = ctx.saved_tensors
        above = x > ctx.limit
        return torch.where(above & (grad < 0), torch.zeros_like(grad), grad), None


class Temperature(nn.Module):
    """Learnable log temperature t; forward gives exp(t), at most `max_scale`.

    The parameter is 1-D (shape [1]): DeepSpeed 0.19 crashes on 0-dim parameters. The clamp
    is in forward (under ZeRO the optimizer updates fp32 master copies, not the module's
    parameter), with a gradient that lets an overshooting t come back down
    (`_ClampMaxComeBack`). Under bf16 the parameter stays fp32 (autocast), so t moves with
    fp32 resolution.
    """

    def __init__(self, init: float, max_scale: float) -> None:
        super().__init__()
        self.log_scale = nn.Parameter(torch.full((1,), math.log(init)))
        self.max_scale = max_scale

    def forward(self) -> Tensor:
        return _ClampMaxComeBack.apply(self.log_scale.float().exp(), self.max_scale)


class LearnedBias(nn.Module):
    """The sigmoid objective's logit bias b; a module (ZeRO-3 gathers a parameter for its
    module's forward) holding a 1-D fp32 parameter, like Temperature."""

    def __init__(self, init: float) -> None:
        super().__init__()
        self.value = nn.Parameter(torch.full((1,), float(init)))

    def forward(self) -> Tensor:
        # A tensor of its own, not a view of the parameter: the optimizer steps the parameter
        # in place (a cached or logged value would change with it), and ZeRO-3 may release it.
        return self.value.float().clone()


# -- the transformers classes ---------------------------------------------------------------


class AlignVLConfig(PretrainedConfig):
    """image_tower, text_tower: `Tower` specs (the text tower's also: max_length, prefix,
    padding_side, as trained); head: adapter, adapter_depth, dropout, image_dim, text_dim,
    embed_dim, max_logit_scale, logit_bias (whether the objective has one), objective."""

    model_type = "alignvl"

    def __init__(self, image_tower: dict | None = None, text_tower: dict | None = None, head: dict | None = None,
                 **kwargs) -> None:
        self.image_tower, self.text_tower, self.head = image_tower or {}, text_tower or {}, head or {}
        super().__init__(**kwargs)


class AlignVLSiglipConfig(AlignVLConfig):
    """The same for the sigmoid objective: transformers' zero-shot image classification
    pipeline reads sigmoid scores off model types with "siglip" in them (softmax otherwise)."""

    model_type = "alignvl_siglip"


@dataclass
class AlignVLOutput(ModelOutput):
    image_embeds: Tensor | None = None  # unit norm, (images, embed_dim)
    text_embeds: Tensor | None = None
    logits_per_image: Tensor | None = None  # scale * image . text (+ bias): (images, texts)
    logits_per_text: Tensor | None = None


class AlignVLModel(PreTrainedModel):
    """Both towers and the Align-VL head. get_image_features / get_text_features give unit-norm
    embeddings; forward with both inputs gives CLIP's outputs (logits_per_image, ...), which is
    what transformers' zero-shot image classification pipeline reads."""

    config_class = AlignVLConfig
    base_model_prefix = "alignvl"
    main_input_name = "pixel_values"

    def __init__(self, config: AlignVLConfig) -> None:
        super().__init__(config)
        head = config.head
        self.image_tower, self.text_tower = Tower(config.image_tower), Tower(config.text_tower)
        self.image_adapter = build_adapter(head["adapter"], head["image_dim"], head["embed_dim"],
                                           head["adapter_depth"], dropout=head["dropout"])
        self.text_adapter = build_adapter(head["adapter"], head["text_dim"], head["embed_dim"], head["adapter_depth"],
                                          dropout=head["dropout"])
        self.temperature = Temperature(1.0, head["max_logit_scale"])
        self.logit_bias = LearnedBias(0.0) if head["logit_bias"] else None
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        """The weights always come from the export."""

    def get_image_features(self, pixel_values: Tensor, **_) -> Tensor:
        features = self.image_tower(pixel_values=pixel_values)
        with torch.autocast(pixel_values.device.type, enabled=False):
            return F.normalize(self.image_adapter(features.float()), dim=-1)

    def get_text_features(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_) -> Tensor:
        """Whatever the tokenizer returned besides these (token_type_ids) is not what training fed."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        features = self.text_tower(input_ids=input_ids, attention_mask=attention_mask)
        with torch.autocast(input_ids.device.type, enabled=False):
            return F.normalize(self.text_adapter(features.float()), dim=-1)

    def forward(self, input_ids: Tensor | None = None, pixel_values: Tensor | None = None,
                attention_mask: Tensor | None = None, **_) -> AlignVLOutput:
        out = AlignVLOutput()
        if pixel_values is not None:
            out.image_embeds = self.get_image_features(pixel_values)
        if input_ids is not None:
            out.text_embeds = self.get_text_features(input_ids, attention_mask)
        if out.image_embeds is not None and out.text_embeds is not None:
            logits = self.temperature().reshape(()) * out.image_embeds @ out.text_embeds.T
            if self.logit_bias is not None:  # sigmoid objectives: sigmoid(logits) is a match probability
                logits = logits + self.logit_bias().reshape(())
            out.logits_per_image, out.logits_per_text = logits, logits.T
        return out


class AlignVLSiglipModel(AlignVLModel):
    """The sigmoid objective's: the same model under its own config type (see AlignVLSiglipConfig)."""

    config_class = AlignVLSiglipConfig


MODEL_CLASSES = {AlignVLConfig: AlignVLModel, AlignVLSiglipConfig: AlignVLSiglipModel}


class AlignVLProcessor(ProcessorMixin):
    """Images and captions to the model's inputs as training made them: the image transform
    training used, and each caption after the text tower's prefix, padded and truncated to the
    length training used (only input_ids and attention_mask: what training fed)."""

    attributes = ["image_processor", "tokenizer"]
    if int(transformers.__version__.split(".")[0]) < 5:  # 4.x needs the sub-processors' classes named (5 warns)
        image_processor_class, tokenizer_class = "AutoImageProcessor", "AutoTokenizer"

    def __init__(self, image_processor=None, tokenizer=None, prefix: str = "", max_length: int | None = None,
                 **kwargs) -> None:
        self.prefix, self.max_length = prefix, max_length
        super().__init__(image_processor, tokenizer, **kwargs)

    def __call__(self, text=None, images=None, return_tensors: str | None = "pt", **_) -> BatchFeature:
        out = {}
        if text is not None:
            texts = [text] if isinstance(text, str) else list(text)
            tokens = self.tokenizer([self.prefix + t for t in texts], padding="max_length", truncation=True,
                                    max_length=self.max_length or self.tokenizer.model_max_length,
                                    return_tensors=return_tensors)
            out.update(input_ids=tokens["input_ids"], attention_mask=tokens["attention_mask"])
        if images is not None:
            out["pixel_values"] = self.image_processor(images=images, return_tensors=return_tensors)["pixel_values"]
        return BatchFeature(out, tensor_type=return_tensors)
