"""Checkpoint -> fp32 safetensors + config, and the small inference API that loads it.

    EXPORT/model.safetensors    fp32 weights of the trained model (towers too when they
                                were part of it; cached-feature runs hold the head only)
    EXPORT/config.yaml          the run config, tower names pointing at EXPORT/*_tower
    EXPORT/image_tower/, EXPORT/text_tower/   architecture and preprocessing files (HF towers)

`export_hf` writes the same model as a transformers folder instead (alignvl_scale/export/hf.py).
Both write beside OUT and rename into place when complete (`written_aside`): an export
killed half way leaves an earlier export at OUT whole.

Nothing here runs code from a file a user may have been handed: exports are safetensors,
the config is YAML, the tower files are JSON and tokenizer files, and a training
checkpoint is read with weights_only=True (`weights_only_loads`), also where DeepSpeed's
zero_to_fp32 asks for a full unpickle, unless the user passes --trust-checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoProcessor

from alignvl_scale.checkpoint.rundir import CONFIG, SUMMARY, step_of
from alignvl_scale.checkpoint.weights import consolidated_state_dict, is_training_checkpoint
from alignvl_scale.config import RunConfig, config_from_dict
from alignvl_scale.evaluation.evaluate import Encoder
from alignvl_scale.export.hf import save_hf
from alignvl_scale.losses.registry import OBJECTIVES
from alignvl_scale.model.finetune import merge_lora
from alignvl_scale.model.head import (
    AlignVLHead,
    AlignVLModel,
    Preprocessing,
    build_model,
    build_preprocessing,
    build_towers,
)
from alignvl_scale.model.towers import HFTower, ProcessorTransform, Tokenize, save_tower_files
from alignvl_scale.runtime.files import written_aside

WEIGHTS = "model.safetensors"
HF_CONFIG = "config.json"  # what an `export --format hf` folder holds instead of config.yaml


def read_run_config(folder: Path) -> RunConfig:
    """The config saved beside a checkpoint or an export (validated again on load)."""
    return config_from_dict(yaml.safe_load((folder / CONFIG).read_text()), validate=False)


def export(checkpoint: str | Path, out: str | Path, trust: bool = False) -> Path:
    checkpoint = Path(checkpoint)
    if not is_training_checkpoint(checkpoint):
        raise FileNotFoundError(f"{checkpoint}: not a training checkpoint")
    with written_aside(out) as folder:
        _export(checkpoint, folder, trust)
    return Path(out)


def _export(checkpoint: Path, out: Path, trust: bool) -> None:
    cfg = read_run_config(checkpoint)
    state = consolidated_state_dict(checkpoint, trust)
    if cfg.data.kind != "features":  # towers are in the weights: keep their files beside them
        towers = build_towers(cfg, load_weights=True)
        preprocessing = build_preprocessing(cfg)
        state = merge_lora_into(state, cfg, towers)
        for modality, tower, prep in zip(("image", "text"), towers, (preprocessing.image_transform,
                                                                   preprocessing.tokenize), strict=True):
            if isinstance(tower, HFTower):
                save_tower_files(tower, prep, out / f"{modality}_tower")
                getattr(cfg.model, f"{modality}_tower").name = f"{modality}_tower"
    save_file(state, str(out / WEIGHTS))
    (out / CONFIG).write_text(yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))


def merge_lora_into(state: dict[str, torch.Tensor], cfg: RunConfig, towers) -> dict[str, torch.Tensor]:
    """The weights with each LoRA tower's updates merged into its base weights (the plain
    tower's keys), through the towers export built anyway (loaded with these weights and
    merged, in place); the config's towers marked finetune: full to match. Other weights as
    they are."""
    for prefix, tower, tower_cfg in zip(("image_tower.", "text_tower."), towers,
                                        (cfg.model.image_tower, cfg.model.text_tower), strict=True):
        if not (tower_cfg.trainable and tower_cfg.finetune == "lora"):
            continue
        tower.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)})
        merge_lora(tower)
        state = {k: v for k, v in state.items() if not k.startswith(prefix)}
        state.update({prefix + k: v.float().contiguous() for k, v in tower.state_dict().items()})
        tower_cfg.finetune = "full"
    return state


def export_hf(checkpoint: str | Path, out: str | Path, trust: bool = False) -> Path:
    """A checkpoint as a transformers folder (see alignvl_scale/export/hf.py), with a model card
    that quotes the run's final evaluation when the checkpoint is the run's last step."""
    checkpoint, out = Path(checkpoint), Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        export(checkpoint, tmp, trust)
        encoder = load_encoder(tmp)
        model = AlignVLModel(encoder.model.head, encoder.image_tower, encoder.text_tower)
        summary_path = checkpoint.parent.parent / SUMMARY
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
        if summary and summary.get("step") != step_of(checkpoint):
            summary = None  # the run's final numbers are not this checkpoint's
        with written_aside(out) as folder:
            save_hf(model, read_run_config(checkpoint), encoder.preprocessing, folder, summary)
    return out


def load_encoder(path: str | Path, device: str = "cpu", trust_checkpoint: bool = False) -> Encoder:
    """An exported model (either format), or a training checkpoint (consolidated on the fly),
    ready to `encode_images` / `encode_texts`. trust_checkpoint: see `weights_only_loads`."""
    path = Path(path)
    if (path / HF_CONFIG).is_file() and not (path / CONFIG).is_file():
        return _hf_encoder(path, torch.device(device))
    cfg = read_run_config(path)
    for tower in (cfg.model.image_tower, cfg.model.text_tower):  # names relative to the export
        if tower.name and not Path(tower.name).is_absolute() and (path / tower.name).is_dir():
            tower.name = str(path / tower.name)
    if (path / WEIGHTS).exists():
        state = load_file(str(path / WEIGHTS))
    else:
        state = consolidated_state_dict(path, trust_checkpoint)
    if cfg.data.kind == "features":
        # Cached-feature runs train the head only; the towers keep their pretrained weights.
        image_tower, text_tower = build_towers(cfg, load_weights=True)
        model = build_model(cfg)
    else:
        model = build_model(cfg, load_weights=False)
        image_tower, text_tower = model.image_tower, model.text_tower
    model.load_state_dict(state, strict=True)
    for module in (model, image_tower, text_tower):
        module.to(device).eval()
    return Encoder(model, build_preprocessing(cfg), torch.device(device), torch.float32,
                   image_tower, text_tower)


def _hf_encoder(path: Path, device: torch.device) -> Encoder:
    """An `export --format hf` folder as an Encoder: its towers and the package's head with its
    weights, preprocessed by its own processor (what a transformers user gets, too)."""
    hf = AutoModel.from_pretrained(path).to(device).eval()  # this package's classes (export/hf.py registers them)
    processor = AutoProcessor.from_pretrained(path)
    h = hf.config.head
    head = AlignVLHead(h["image_dim"], h["text_dim"], h["embed_dim"], h["adapter"], h["adapter_depth"], h["dropout"],
                       objective=OBJECTIVES[h["objective"]])
    towers = ("image_tower.", "text_tower.")
    head.load_state_dict({k: v for k, v in hf.state_dict().items() if not k.startswith(towers)})
    model = AlignVLModel(head, hf.image_tower, hf.text_tower).to(device).eval()
    preprocessing = Preprocessing(ProcessorTransform(processor.image_processor),
                                  Tokenize(processor.tokenizer, processor.max_length, processor.prefix))
    return Encoder(model, preprocessing, device, torch.float32)
