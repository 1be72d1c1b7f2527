"""How a run continues from a checkpoint, decided once before any process group from what the
checkpoint recorded (its world, ZeRO stage and model fingerprint), and handed on: no part of
the run reads the world or the stage again to decide how to load.

What a resume may change: the number of ranks (one that divides the run's data streams: the
same global batches follow; a checkpoint from before data streams has its epoch re-dealt), the
ZeRO stage (any into any through the universal checkpoint: DeepSpeed's conversion for ZeRO
1-3, universal.py's for ZeRO-0), the batch, the schedule. What it may not: the
model (`config.model_fingerprint`: towers, their training, dims, adapter, objective).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import yaml

from alignvl_scale.checkpoint.rundir import CONFIG, LATEST, STEP_DIR, checkpoints_dir, universal_dir
from alignvl_scale.checkpoint.store import TAG, CheckpointError, complete_checkpoints, problems, read_meta
from alignvl_scale.config import config_from_dict, counted, model_fingerprint


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    path: Path  # the checkpoint folder, step_N
    step: int
    saved_world: int  # the ranks that wrote it
    saved_stage: int | None  # the ZeRO stage that wrote it (None: 1 or 2, from a checkpoint that did not say)
    world: int  # the ranks that resume it
    stage: int
    universal: bool  # load its universal conversion (another world, or a stage change with ZeRO-0 or 3 in it)
    data_streams: int | None = None  # the run's data.streams (None: a checkpoint from before data streams)

    @property
    def resized(self) -> bool:
        return self.saved_world != self.world

    def load_dir(self) -> Path:
        return universal_dir(self.path) if self.universal else self.path

    def describe(self) -> str:
        written = f"ZeRO-{self.saved_stage if self.saved_stage is not None else '1/2'} on " + counted(
            self.saved_world, "rank")
        if not self.universal and not self.resized:
            return f"written by {written}"
        return f"written by {written}, now ZeRO-{self.stage} on {counted(self.world, 'rank')}"


def _choose(run_dir: Path, resume: str, deep: bool) -> Path | None:
    """The checkpoint --resume names (raises CheckpointError with what to do instead).
    deep: also check every torch file's zip records (the launch's rank 0; it reads every file)."""
    root = checkpoints_dir(run_dir)

    def offer() -> str:
        """The complete checkpoints, for an error message only: checking them reads every file."""
        complete = complete_checkpoints(run_dir)
        return (f"; complete checkpoints: {', '.join(p.name for p in complete)} (resume one with --resume "
                f"{complete[-1]})" if complete else "; there is no complete checkpoint to offer")

    if resume != "latest":
        path = Path(resume)
    else:
        pointer = root / LATEST
        if not pointer.exists():
            if complete_checkpoints(run_dir):
                raise CheckpointError(f"--resume latest: {pointer} is missing" + offer())
            return None
        name = pointer.read_bytes().decode("utf-8", errors="replace").strip()
        if STEP_DIR.fullmatch(name) is None:
            raise CheckpointError(f"--resume latest: {pointer} does not name a checkpoint ({name[:40]!r})" + offer())
        path = root / name
    found = problems(path, deep)
    if found:
        raise CheckpointError(f"--resume {resume}: {found[0]}" + offer())
    return path


def _saved_stage(path: Path, meta: dict) -> int | None:
    """The ZeRO stage that wrote a checkpoint: recorded since this project saves it; for older
    ones read off DeepSpeed's file names (3; 0; None for 1 or 2, which load into each other)."""
    if "zero_stage" in meta:
        return meta["zero_stage"]
    if list((path / TAG).glob("zero_pp_rank_*_model_states.pt")):
        return 3
    return 0 if not list((path / TAG).glob("*optim_states.pt")) else None


def saved_fingerprint(path: Path, meta: dict) -> dict:
    """The model a checkpoint holds: recorded in its meta, or (older checkpoints) read off the
    run config saved with it."""
    if "fingerprint" in meta:
        return meta["fingerprint"]
    return model_fingerprint(config_from_dict(yaml.safe_load((path / CONFIG).read_text()), validate=False))


def check_same_model(path: Path, saved: dict, fingerprint: dict) -> None:
    """Every difference of the model in one line, with its key."""
    changed = [f"{key} {saved.get(key)} -> {fingerprint.get(key)}" for key in fingerprint
               if saved.get(key) != fingerprint.get(key)]
    if changed:
        raise CheckpointError(f"--resume {path}: the checkpoint holds another model than this run's config builds "
                              f"({'; '.join(changed)}); a resume may change the number of ranks, the ZeRO stage, the "
                              "batch and the schedule, not the model: set those keys back, or start a new run_dir")


def plan_resume(run_dir: str | Path, resume: str, world: int, stage: int, fingerprint: dict,
                deep: bool) -> ResumePlan | None:
    """Before any process group, on every rank: which checkpoint --resume names (checked in
    full where `deep`, the launch's rank 0), that it holds this run's model, and whether it
    loads as saved or through a universal conversion (another number of ranks under ZeRO 1-3, or
    a move into or out of ZeRO-0 or ZeRO-3). None: `latest` with no checkpoint yet. A change that cannot be resumed
    is one CheckpointError."""
    path = _choose(Path(run_dir), resume, deep)
    if path is None:
        return None
    meta = read_meta(path)
    check_same_model(path, saved_fingerprint(path, meta), fingerprint)
    saved_world, saved_stage = meta["world"], _saved_stage(path, meta)
    stages = {saved_stage if saved_stage is not None else 2, stage}
    same_partitioning = saved_world == world and (saved_stage == stage or stages <= {1, 2})
    universal = not (same_partitioning or stages == {0})
    if universal and saved_stage == 0 and "optimizer_params" not in meta:
        raise CheckpointError(f"--resume {resume}: {path} was written under ZeRO-0 by a version that did not name "
                              "its optimizer's parameters, which a move to another ZeRO stage needs; resume it under "
                              "ZeRO-0 (engine.ds_config=zero0), on any number of ranks")
    return ResumePlan(path, meta["step"], saved_world, saved_stage, world, stage, universal, meta.get("data_streams"))
