"""A checkpoint written under one ZeRO stage and number of ranks, made loadable under
another: DeepSpeed's universal checkpoint (`ds_to_universal`), plus what that tool leaves
stage-specific, so that one converted folder loads under ZeRO 0, 1, 2 and 3 alike.

    step_N/state/                  DeepSpeed's own checkpoint, as saved (never touched)
    step_N.universal/state/zero/   one folder per parameter: fp32.pt, exp_avg.pt, exp_avg_sq.pt, step.pt
    step_N.universal/state/*_model_states.pt   metadata, under the names every stage looks for
    step_N.universal/COMPLETE      written last: every file of the conversion with its size

DeepSpeed 0.19's converter and loaders disagree across stages in four places, fixed here
after conversion: the ZeRO-3 loader looks for `zero_pp_rank_0_mp_rank_00_model_states.pt`
(ZeRO 1-2 write `mp_rank_00_model_states.pt`, and the reverse); it reads Adam's step from
`optimizer_state_dict.state[0].step` (ZeRO 1-2 from each parameter's `step.pt`, which a
ZeRO-3 conversion does not write); a ZeRO-3 conversion stores each state as a bare flat
tensor, where ZeRO 1-2 want {"param": tensor of the parameter's shape}; and ZeRO 1-2 need
`ds_version` in the optimizer state. DeepSpeed neither converts ZeRO-0 (plain data parallel:
the module and torch's optimizer state, whole, in one file) nor loads a universal folder under
it: `_from_zero0` writes the same folder from the one file, by the parameter names the
checkpoint's meta lists per optimizer group, and `load_into_zero0` reads it back into the
module and torch's optimizer by name. `clip_grad` is
dropped so that the resumed run clips as its own config says. The converted folder is
written aside and renamed into place, and it counts as done only when its COMPLETE marker is
there and every file it lists is as written: an unfinished or damaged folder (a copy cut short,
files deleted by hand) is converted again.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from alignvl_scale.checkpoint.rundir import universal_dir
from alignvl_scale.checkpoint.store import (
    TAG,
    ZERO3_MODULE,
    ZERO12_MODULE,
    CheckpointError,
    read_meta,
    weights_only_loads,
)
from alignvl_scale.runtime import compat
from alignvl_scale.runtime.files import written_aside
from alignvl_scale.runtime.log import say

OPTIMIZER_STATE_DICT = "optimizer_state_dict"  # deepspeed.checkpoint.constants.OPTIMIZER_STATE_DICT
COMPLETE = "COMPLETE"


def convert(checkpoint: Path, out_dir: Path) -> None:
    """Checkpoint folder `checkpoint` (step_N) -> universal folder `out_dir` (its state/),
    loadable under every ZeRO stage on any number of ranks. Callers wrap it in
    weights_only_loads: DeepSpeed's converter unpickles in full."""
    meta = read_meta(checkpoint)
    if meta.get("zero_stage") == 0:
        _from_zero0(checkpoint / TAG, out_dir, meta["optimizer_params"])
    else:
        compat.ds_to_universal(checkpoint / TAG, out_dir)
        (out_dir.parent / "latest_universal").unlink(missing_ok=True)  # written beside out_dir; we name tags ourselves
    _for_every_stage(out_dir)


def _from_zero0(state_dir: Path, out_dir: Path, names: list[list[str]]) -> None:
    """What ds_to_universal writes for ZeRO 1-2, from a ZeRO-0 checkpoint's one file: each
    trained parameter's weight and Adam state under its name (`names`: per optimizer group, in
    the group's order, as the manager recorded them), the metadata without the optimizer, the
    groups' hyperparameters. ZeRO-0 trains fp32 parameters (bf16 is autocast), so the module's
    weights are the fp32 masters."""
    saved = torch.load(state_dir / ZERO12_MODULE, weights_only=True)
    optimizer, module, zero = saved.pop("optimizer"), saved["module"], out_dir / "zero"
    steps = [s["step"] for s in optimizer["state"].values() if "step" in s]
    shapes = []
    for group, group_names in zip(optimizer["param_groups"], names, strict=True):
        shapes.append({})
        for index, name in zip(group["params"], group_names, strict=True):
            weight = module[name]
            state = optimizer["state"].get(index, {})  # none yet for a parameter no step has reached
            (zero / name).mkdir(parents=True)
            torch.save({"param": weight.float()}, zero / name / "fp32.pt")
            for key in ("exp_avg", "exp_avg_sq"):
                torch.save({"param": state.get(key, torch.zeros_like(weight))}, zero / name / f"{key}.pt")
            torch.save(state.get("step", steps[0] if steps else torch.tensor(0.0)), zero / name / "step.pt")
            shapes[-1][name] = weight.shape
    torch.save({**saved, "param_shapes": shapes}, out_dir / ZERO12_MODULE)
    groups = [{**group, "params": [i]} for i, group in enumerate(optimizer["param_groups"])]  # as ZeRO 1-2 save them
    torch.save({"param_groups": groups}, zero / "optimizer_state.pt")


def load_into_zero0(engine, optimizer: torch.optim.Optimizer, folder: Path) -> None:
    """A universal folder (`folder`: its state/) into a ZeRO-0 engine: each trained parameter's
    weight and Adam state by name into the module and torch's `optimizer`, DeepSpeed's step
    counters from the metadata. Frozen weights stay as the model was built: a universal folder
    holds the trained ones only (DeepSpeed's own universal loads leave them alike)."""
    names = {id(p): name for name, p in engine.module.named_parameters()}
    state, index = {}, 0
    for group in optimizer.param_groups:
        for param in group["params"]:
            files = folder / "zero" / names[id(param)]
            if not (files / "fp32.pt").is_file():
                raise CheckpointError(f"{files}: missing; the checkpoint does not hold parameter {names[id(param)]} "
                                      "that this run trains")
            with torch.no_grad():
                param.copy_(torch.load(files / "fp32.pt", weights_only=True)["param"].view_as(param))
            state[index] = {"step": torch.load(files / "step.pt", weights_only=True),
                            **{key: torch.load(files / f"{key}.pt", weights_only=True)["param"].view_as(param)
                               for key in ("exp_avg", "exp_avg_sq")}}
            index += 1
    optimizer.load_state_dict({"state": state, "param_groups": optimizer.state_dict()["param_groups"]})
    counters = torch.load(folder / ZERO12_MODULE, weights_only=True)
    engine.global_steps, engine.skipped_steps = counters["global_steps"], counters["skipped_steps"]
    engine.global_samples = counters.get("global_samples", engine.global_steps * engine.train_batch_size())


def _for_every_stage(out_dir: Path) -> None:
    import deepspeed

    for have, want in ((ZERO12_MODULE, ZERO3_MODULE), (ZERO3_MODULE, ZERO12_MODULE)):
        if (out_dir / have).exists() and not (out_dir / want).exists():
            shutil.copyfile(out_dir / have, out_dir / want)
    zero = out_dir / "zero"
    shapes = {}
    for group in torch.load(out_dir / ZERO3_MODULE, weights_only=True).get("param_shapes") or []:
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


def _incomplete(folder: Path) -> str | None:
    """Why `folder` is not a whole conversion (None when it is): its COMPLETE marker, written
    last, lists every file with its size, and each must still be there as written."""
    marker = folder / COMPLETE
    if not marker.is_file():
        return f"no {COMPLETE} marker"
    try:
        files = json.loads(marker.read_text())
    except ValueError:
        return f"{COMPLETE} unreadable"
    missing = [name for name, size in files.items()
               if not (folder / name).is_file() or (folder / name).stat().st_size != size]
    return f"{len(missing)} of its {len(files)} files missing or changed, {missing[0]} first" if missing else None


def ensure_universal(path: Path, trust: bool = False) -> str | None:
    """The launch's rank 0, once the process group exists and the others wait: checkpoint
    `path`'s universal conversion, written beside it unless a whole one is there (an
    unfinished or damaged one is converted again, with a line saying so). Returns an error
    message, or None."""
    final = universal_dir(path)
    why = _incomplete(final) if final.exists() else "absent"
    if why is None:
        return None
    if final.exists():
        say(f"{final} is not a whole conversion ({why}): converting again")
    try:
        with written_aside(final) as partial, weights_only_loads(trust):
            convert(path, partial / TAG)
            files = {str(f.relative_to(partial)): f.stat().st_size for f in sorted(partial.rglob("*")) if f.is_file()}
            (partial / COMPLETE).write_text(json.dumps(files, indent=0))
    except CheckpointError as exc:
        return str(exc)
    except Exception as exc:  # DeepSpeed's converter asserts and raises what it likes
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}" if str(exc) else type(exc).__name__
        return f"{path} cannot be converted to a universal checkpoint ({detail})"
    return None
