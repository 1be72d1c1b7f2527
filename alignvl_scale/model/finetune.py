"""How a trainable tower trains (`model.<modality>_tower.finetune`), and the learning rate of
each part of the model.

- `full`: every weight.
- `lora`: PEFT LoRA updates B @ A on the tower's frozen Linear layers; export merges them into
  the base weights (`merge_lora`), so an exported tower is the plain architecture again.
- `last_n`: the tower's last n blocks (the longest `nn.ModuleList` in it: Llama's `layers`,
  ViT's and BERT's `encoder.layer`) and what follows them (final norm, pooler); the
  embeddings and earlier blocks stay frozen.

Frozen parameters stay in the model (ZeRO-3 partitions them too, without optimizer state).
"""

from __future__ import annotations

from torch import nn

from alignvl_scale.config import ConfigError, LoraSettings, TowerConfig
from alignvl_scale.runtime.compat import full_shape


def apply_finetune(tower: nn.Module, cfg: TowerConfig, key: str) -> None:
    """Sets which of the tower's parameters train, adds LoRA modules where asked, and marks
    the tower `trainable` (it then runs in train mode and under autograd). key names the
    tower's config section in errors."""
    tower.requires_grad_(cfg.trainable and cfg.finetune == "full")
    tower.trainable = cfg.trainable
    if cfg.trainable and cfg.finetune == "last_n":
        unfreeze_last_blocks(tower, cfg.last_n, f"{key}.last_n")
    if cfg.trainable and cfg.finetune == "lora":
        add_lora(tower, cfg.lora, f"{key}.lora")


def transformer_blocks(tower: nn.Module) -> tuple[str, nn.ModuleList]:
    """The tower's block list: its longest nn.ModuleList (first of equals), with its name."""
    lists = [(name, m) for name, m in tower.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"{type(tower).__name__} has no nn.ModuleList of blocks")
    return max(lists, key=lambda item: len(item[1]))


def unfreeze_last_blocks(tower: nn.Module, n: int, key: str) -> None:
    try:
        name, blocks = transformer_blocks(tower)
    except ValueError as exc:
        raise ConfigError(f"{key}: {exc}") from None
    if n > len(blocks):
        raise ConfigError(f"{key}: must be at most the tower's {len(blocks)} blocks ({name}), got {n}")
    for block in list(blocks)[-n:]:
        block.requires_grad_(True)
    # What follows the blocks: parameters outside the block list and outside the embeddings.
    for param_name, param in tower.named_parameters():
        if not param_name.startswith(name + ".") and "embed" not in param_name:
            param.requires_grad_(True)


def _lora_layers(module: nn.Module):
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


def add_lora(tower: nn.Module, lora: LoraSettings, key: str) -> None:
    """Wraps tower.model (an HF tower's transformers model; other kinds: the tower's `model`
    attribute) in a PEFT model with LoRA on `lora.target_modules`; only the updates train.

    B starts at zero, so the tower starts as the pretrained one. Under ZeRO-3's zero.Init the
    new parameters are partitioned as they are made and PEFT's initialization writes into
    empty partitions (B would keep nn.Linear's random init): they are initialized again
    here, gathered, on rank 0 and broadcast."""
    from peft import LoraConfig, get_peft_model
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as DEFAULT_TARGETS

    base = getattr(tower, "model", None)
    if not isinstance(base, nn.Module):
        raise ConfigError(f"{key}: {type(tower).__name__} has no `model` submodule to put LoRA on")
    targets = lora.target_modules
    if targets is None:
        model_type = getattr(getattr(base, "config", None), "model_type", None)
        if model_type not in DEFAULT_TARGETS:
            raise ConfigError(f"{key}.target_modules: PEFT has no default for {model_type or type(base).__name__}; "
                              "name the Linear layers (e.g. [q_proj, v_proj])")
        targets = list(DEFAULT_TARGETS[model_type])
    config = LoraConfig(r=lora.rank, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets)
    try:
        tower.model = get_peft_model(base, config)
    except ValueError as exc:  # no module matched the names
        raise ConfigError(f"{key}.target_modules: {exc}") from None
    layers = _lora_layers(tower.model)
    params = [p for layer in layers for name, p in layer.named_parameters() if "lora_" in name]
    if params and hasattr(params[0], "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
            for layer in layers:
                for adapter in layer.active_adapters:
                    layer.reset_lora_parameters(adapter, True)


def merge_lora(tower: nn.Module) -> bool:
    """LoRA updates folded into the base weights and the PEFT wrapper removed, in place:
    the tower is its plain architecture again (state-dict keys included). False when the
    tower has no LoRA."""
    from peft import PeftModel

    if not isinstance(getattr(tower, "model", None), PeftModel):
        return False
    tower.model = tower.model.merge_and_unload()
    return True


def param_groups(model: nn.Module, cfg) -> list[dict]:
    """AdamW groups: the head's parameters at train.lr, then each trainable tower's at its
    `lr` (null: train.lr); each part split into matrices (weight decay) and 1-D parameters
    (biases, norms, the temperature: no decay). A group's `base_lr` is its peak rate (the
    trainer sets lr = base_lr x the schedule every step); `part` names whose rate it is (a tower
    without an `lr` of its own is on the head's)."""
    parts = [("head", model.head, cfg.train.lr)]
    for part in ("image_tower", "text_tower"):
        tower, tower_cfg = getattr(model, part), getattr(cfg.model, part)
        if tower is not None:
            parts.append((part if tower_cfg.lr else "head", tower, tower_cfg.lr or cfg.train.lr))
    groups = []
    for part, module, lr in parts:
        params = [p for p in module.parameters() if p.requires_grad]
        matrix = [len(full_shape(p)) >= 2 for p in params]  # under zero.Init: the partition's whole shape
        groups += [{"params": [p for p, m in zip(params, matrix, strict=True) if m],
                    "weight_decay": cfg.train.weight_decay, "lr": lr, "base_lr": lr, "part": part},
                   {"params": [p for p, m in zip(params, matrix, strict=True) if not m],
                    "weight_decay": 0.0, "lr": lr, "base_lr": lr, "part": part}]
    return [g for g in groups if g["params"]]
