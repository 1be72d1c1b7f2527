"""A checkpoint's model weights, fp32, whole: what export and evaluation read from a training
checkpoint of any ZeRO stage."""

from __future__ import annotations

import io
from contextlib import redirect_stdout
from pathlib import Path

import torch

from alignvl_scale.checkpoint.store import TAG, ZERO12_MODULE, weights_only_loads


def consolidated_state_dict(checkpoint: Path, trust: bool = False) -> dict[str, torch.Tensor]:
    """Every weight, fp32, from a DeepSpeed checkpoint of any ZeRO stage (1-3), gathered
    offline. DeepSpeed's consolidation (zero_to_fp32) covers the optimized parameters, and
    the frozen ones only where it recorded them (ZeRO 2-3; 0.19.8 `_common_checkpoint_state`):
    a ZeRO-1 checkpoint's frozen weights (frozen towers, LoRA and last_n base weights) come
    from rank 0's module state, where ZeRO 1-2 hold every parameter whole."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    module_file = Path(checkpoint) / TAG / ZERO12_MODULE
    with redirect_stdout(io.StringIO()), weights_only_loads(trust):  # it prints per-tensor progress
        state = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint), tag=TAG)
        module = torch.load(module_file, map_location="cpu", mmap=True)["module"] if module_file.exists() else {}
    for key, value in module.items():
        if key not in state and value.numel():
            state[key] = value.float()
    return {k: v.contiguous() for k, v in state.items()}


def is_training_checkpoint(path: Path) -> bool:
    return (Path(path) / TAG).is_dir()
