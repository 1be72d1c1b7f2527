"""When things happen in a run: the learning rate of each optimizer step, and whether a periodic
job (log, checkpoint, eval) is due after a step (big_vision's one helper for it)."""

from __future__ import annotations

import math

from alignvl_scale.config import TrainConfig


def learning_rate(cfg: TrainConfig, step: int, total_steps: int) -> float:
    """The learning rate of optimizer step `step` (0-based): linear warmup over
    train.warmup_steps, then cosine from train.lr towards train.lr * train.min_lr_ratio,
    reached at step `total_steps` (transformers' cosine-with-warmup schedule).

    A pure function of the step, so a resumed run cannot drift from it, and no scheduler
    goes through `accelerator.prepare`: Accelerate's wrapper steps a prepared scheduler once
    per process per optimizer step, so the schedule would run world_size times too fast.
    """
    warmup, floor = cfg.warmup_steps, cfg.min_lr_ratio
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    return cfg.lr * (floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def due(step: int, every: int, total_steps: int) -> bool:
    """Is it time for a periodic job after `step`? Every `every` steps (0: never), and not at
    the last step, which the run ends with anyway."""
    return every > 0 and step % every == 0 and step < total_steps
