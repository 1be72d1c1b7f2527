"""The parts a run is built from, in the order the trainer builds them: the accelerator (the
process group), the model (partitioned from the start under ZeRO-3), the data stream's decoder,
the optimizer inside the DeepSpeed engine."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch

from alignvl_scale.config import RunConfig
from alignvl_scale.data.reader import FeatureDecoder, ImageTextDecoder
from alignvl_scale.model.finetune import param_groups
from alignvl_scale.model.head import AlignVLModel, Preprocessing, build_model, build_preprocessing
from alignvl_scale.model.towers import tower_warnings
from alignvl_scale.runtime import compat
from alignvl_scale.runtime.distributed import make_host_group
from alignvl_scale.runtime.log import say
from alignvl_scale.runtime.perf import set_cuda_math
from alignvl_scale.runtime.seeding import seed_everything, stream_seed
from alignvl_scale.training.engine import make_accelerator, zero3_init, zero3_leaf_blocks, zero_stage
from alignvl_scale.training.logger import RunLogger, flat_config


@dataclass(frozen=True)
class Device:
    rank: int
    device: torch.device
    dtype: torch.dtype  # what the towers run in (bf16: autocast over fp32 parameters)


def start_accelerator(cfg: RunConfig, ds_config: dict):
    """The Accelerator (it starts the process group, with the run's collective timeout), the
    host group beside it, CUDA's math settings, and this rank's device."""
    others = [name for name in cfg.log.report_to if name != "tensorboard"]  # TensorBoard: the run logger's own
    compat.quiet_deepspeed_deprecations()
    accelerator = make_accelerator(ds_config, others, cfg.run_dir, cfg.engine.collective_timeout)
    make_host_group(timedelta(seconds=cfg.engine.collective_timeout))
    if accelerator.device.type == "cuda":
        set_cuda_math(cfg.train.tf32, cfg.train.cudnn_benchmark)
    dtype = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
    return accelerator, Device(accelerator.process_index, accelerator.device, dtype)


def start_logging(cfg: RunConfig, accelerator, rank: int) -> RunLogger:
    """The run's logger (metrics.jsonl and TensorBoard on rank 0), and the trackers besides
    TensorBoard that log.report_to names, started through Accelerate with the run config."""
    others = [name for name in cfg.log.report_to if name != "tensorboard"]
    if others:
        accelerator.init_trackers(cfg.log.project or Path(cfg.run_dir).name, config=flat_config(cfg.to_dict()))
    return RunLogger(cfg.run_dir, rank == 0, "tensorboard" in cfg.log.report_to, accelerator if others else None)


def build_run_model(cfg: RunConfig, ds_config: dict, rank: int) -> tuple[AlignVLModel, Preprocessing | None]:
    """The model, the same initial weights on every rank, built inside `zero.Init` under ZeRO-3
    (only parameters there: its tensors land on the accelerator), and the towers'
    preprocessing (None for cached features), built outside it. Afterwards this rank's own
    random streams (dropout: another mask on every rank)."""
    preprocessing = None if cfg.data.kind == "features" else build_preprocessing(cfg)
    seed_everything(stream_seed(cfg.seed, "weights"))
    with zero3_init(ds_config):
        model = build_model(cfg, rank)
    if zero_stage(ds_config) == 3 and cfg.engine.zero3_leaf_blocks:
        say(f"ZeRO-3 leaf modules: {zero3_leaf_blocks(model)} tower blocks (engine.zero3_leaf_blocks)")
    seed_everything(stream_seed(cfg.seed, "process", rank))
    for modality, tower in (("image", model.image_tower), ("text", model.text_tower)):
        for warning in tower_warnings(tower, modality, cfg.train.lr):
            say(warning)
    return model, preprocessing


def make_decoder(cfg: RunConfig, preprocessing: Preprocessing | None):
    """What turns a shard sample into a training example: features as they are, or an image
    and a caption through the towers' preprocessing (and the train-time crop)."""
    if preprocessing is None:
        return FeatureDecoder(cfg.seed)
    crop = tuple(cfg.data.augment_crop_scale) if cfg.data.augment_crop_scale else None
    return ImageTextDecoder(cfg.data.limits(), preprocessing.image_transform, preprocessing.tokenize, cfg.seed, crop)


def make_optimizer(model: AlignVLModel, cfg: RunConfig) -> torch.optim.AdamW:
    """AdamW over the model's parameter groups (each part at its own peak rate: `param_groups`).
    DeepSpeed steps it on its fp32 partitions; its groups' "lr" is what every step uses, set
    before each step from the schedule."""
    return torch.optim.AdamW(param_groups(model, cfg), lr=cfg.train.lr, betas=tuple(cfg.train.betas),
                             eps=cfg.train.eps, fused=True)
