"""A checkpoint written under one ZeRO stage and number of ranks, made loadable under
another: DeepSpeed's universal checkpoint (`ds_to_universal`), plus what that tool leaves
stage-specific, so that one converted folder loads under ZeRO 1, 2 and 3 alike.

    step_N/state/                  DeepSpeed's own checkpoint, as saved (never touched)
    step_N.universal/state/zero/   one folder per parameter: fp32.pt, exp_avg.pt, exp_avg_sq.pt, step.pt
    step_N.universal/state/*_model_states.pt   metadata, under the names every stage looks for

DeepSpeed 0.19's converter and loaders disagree across stages in four places, fixed here
after conversion: the ZeRO-3 loader looks for `zero_pp_rank_0_mp_rank_00_model_states.pt`
(ZeRO 1-2 write `mp_rank_00_model_states.pt`, and the reverse); it reads Adam's step from
`optimizer_state_dict.state[0].step` (ZeRO 1-2 from each parameter's `step.pt`, which a
ZeRO-3 conversion does not write); a ZeRO-3 conversion stores each state as a bare flat
tensor, where ZeRO 1-2 want {"param": tensor of the parameter's shape}; and ZeRO 1-2 need
`ds_version` in the optimizer state. `clip_grad` is
dropped so that the resumed run clips as its own config says. The converted folder is
written aside and renamed into place, so a conversion that dies leaves nothing half made.
"""

from __future__ import annotations

import shutil
from argparse import Namespace
from pathlib import Path

import torch

ZERO12_META = "mp_rank_00_model_states.pt"
ZERO3_META = "zero_pp_rank_0_mp_rank_00_model_states.pt"
OPTIMIZER_STATE_DICT = "optimizer_state_dict"  # deepspeed.checkpoint.constants.OPTIMIZER_STATE_DICT


def convert(state_dir: Path, out_dir: Path) -> None:
    """DeepSpeed folder `state_dir` (one tag) -> universal folder `out_dir`, loadable under
    every ZeRO stage >= 1 on any number of ranks. Callers wrap it in weights_only_loads:
    the converter unpickles in full."""
    from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal

    # One worker: the conversion stays in this process, under the caller's safe torch.load.
    ds_to_universal(Namespace(input_folder=str(state_dir), output_folder=str(out_dir), num_extract_workers=1,
                              num_merge_workers=1, keep_temp_folder=False, strict=True,
                              inject_missing_state=True))  # Accelerate-built engines write no universal info
    (out_dir.parent / "latest_universal").unlink(missing_ok=True)  # written beside out_dir; we name tags ourselves
    _for_every_stage(out_dir)


def _for_every_stage(out_dir: Path) -> None:
    import deepspeed

    for have, want in ((ZERO12_META, ZERO3_META), (ZERO3_META, ZERO12_META)):
        if (out_dir / have).exists() and not (out_dir / want).exists():
            shutil.copyfile(out_dir / have, out_dir / want)
    zero = out_dir / "zero"
    shapes = {}
    for group in torch.load(out_dir / ZERO3_META, weights_only=True).get("param_shapes") or []:
        shapes.update(group)
    for name, shape in shapes.items():
        for file in (zero / name).glob("*.pt"):
            value = torch.load(file, weights_only=True)
            if torch.is_tensor(value) and file.stem != "step":
                torch.save({"param": value.reshape(shape)}, file)
    state = torch.load(zero / "optimizer_state.pt", weights_only=True)
    groups = state.get("param_groups") or state[OPTIMIZER_STATE_DICT]["param_groups"]
    steps = sorted(zero.glob("*/step.pt"))
    step = (torch.load(steps[0], weights_only=True) if steps
            else state[OPTIMIZER_STATE_DICT]["state"][0]["step"])
    for folder in (p for p in zero.iterdir() if p.is_dir()):
        if (folder / "exp_avg.pt").exists() and not (folder / "step.pt").exists():
            torch.save(step, folder / "step.pt")
    keep = {k: state[k] for k in ("loss_scaler", "dynamic_loss_scale", "overflow", "zero_stage") if k in state}
    torch.save({**keep, "ds_version": state.get("ds_version", deepspeed.__version__), "param_groups": groups,
                OPTIMIZER_STATE_DICT: {"state": {0: {"step": step}}, "param_groups": groups}},
               zero / "optimizer_state.pt")
