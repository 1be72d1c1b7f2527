"""Checkpoints that survive a kill and that nobody can hide code in.

    RUN_DIR/checkpoints/step_00000100/state/...      DeepSpeed engine (weights, optimizer)
    RUN_DIR/checkpoints/step_00000100/rank_0.json    trainer state of rank 0: step, data position, counts
    RUN_DIR/checkpoints/step_00000100/rng_0.pt       RNG states of rank 0 (tensors only)
    RUN_DIR/checkpoints/step_00000100/config.yaml    the run config
    RUN_DIR/checkpoints/latest                       text: "step_00000100"

    RUN_DIR/checkpoints/step_00000100.universal/     the same, converted to resume on another
                                                     number of ranks or ZeRO stage (universal.py)

Every rank writes into `.step_N.partial`; once all are done rank 0 renames it to `step_N`
and flips `latest` atomically, so a save that dies half way leaves `latest` on the previous
complete checkpoint; a save that fails (a full disk) removes its partial folder and stops
the run with the path and the cause. Retention keeps the newest `keep` checkpoints *up to the step just
saved* (never the new one, never a later step left by an earlier run). Every load goes
through `weights_only_loads`: DeepSpeed unpickles with weights_only=False, which runs any
code a handed checkpoint holds. The run folder must be on storage every node sees.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

from alignvl_scale.distributed import all_gather_objects, barrier, rank_world
from alignvl_scale.rundir import CHECKPOINTS, CONFIG

TAG = "state"
LATEST = "latest"
STEP_DIR = re.compile(r"step_(\d{8})")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used; the message names the file and what to do instead."""


def deepspeed_safe_globals() -> list:
    """The only non-tensor types DeepSpeed 0.19 writes into a checkpoint (ZeRO 1-3)."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, ZeroStageEnum, fragment_address]


@contextmanager
def weights_only_loads(trust: bool = False):
    """Inside, every `torch.load` (DeepSpeed's checkpoint engine and zero_to_fp32 ask for
    weights_only=False) runs with weights_only=True and DeepSpeed's few types allowed, so
    a checkpoint someone hands you cannot run code; a file holding anything else raises
    CheckpointError. trust=True (the user vouches for the file) leaves torch.load alone."""
    if trust:
        yield
        return
    real_load = torch.load

    def load(*args, **kwargs):
        kwargs["weights_only"] = True
        try:
            return real_load(*args, **kwargs)
        except Exception as exc:  # torch raises UnpicklingError or RuntimeError, wrapped differently by version
            if "weights_only" in str(exc) or "Unsupported global" in str(exc):
                where = args[0] if args else kwargs.get("f")
                raise CheckpointError(f"{where}: holds objects other than tensors and DeepSpeed's own, which can run "
                                      "code when loaded; refused. If you trust its source, pass --trust-checkpoint "
                                      "(alignvl-scale export and eval, and train). "
                                      f"({str(exc).splitlines()[-1][:200]})") from None
            raise

    torch.load = load
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        torch.load = real_load


def step_of(path: Path) -> int | None:
    match = STEP_DIR.fullmatch(path.name)
    return int(match.group(1)) if match else None


def problems(path: Path, deep: bool = True) -> list[str]:
    """Why a checkpoint folder is not complete and readable ([] when it is): every rank's
    state and RNG file present, JSON that parses, and (deep) torch files whose zip records
    check out (a truncated file fails here, by name, instead of deep inside a load)."""
    if not (path / TAG).is_dir() or not (path / "rank_0.json").is_file():
        return [f"{path}: not a checkpoint (no {TAG}/ or rank_0.json)"]
    try:
        world = json.loads((path / "rank_0.json").read_text())["world"]
        for rank in range(world):
            json.loads((path / f"rank_{rank}.json").read_text())
    except (OSError, ValueError, KeyError) as exc:
        return [f"{path}: trainer state unreadable: {exc}"]
    missing = [f"{path / f'rng_{r}.pt'}: missing" for r in range(world) if not (path / f"rng_{r}.pt").is_file()]
    if missing or not deep:
        return missing
    found = []
    for file in sorted([*path.glob(f"{TAG}/*.pt"), *(path / f"rng_{r}.pt" for r in range(world))]):
        try:
            with zipfile.ZipFile(file) as archive:
                bad = archive.testzip()
            if bad is not None:
                found.append(f"{file}: corrupt member {bad}")
        except (OSError, zipfile.BadZipFile) as exc:
            found.append(f"{file}: {exc}")
    return found


def complete_checkpoints(run_dir: str | Path) -> list[Path]:
    """The run's complete checkpoints, oldest first."""
    root = Path(run_dir) / CHECKPOINTS
    found = [p for p in root.glob("step_*") if p.is_dir() and step_of(p) is not None] if root.is_dir() else []
    return [p for p in sorted(found, key=step_of) if not problems(p)]


def _retire(root: Path, step: int, keep: int) -> None:
    """Keep the newest `keep` checkpoints up to `step` (with their universal conversions);
    later steps (left by an earlier run that went further, before an explicit --resume of an
    older step) are not touched."""
    mine = sorted((p for p in root.glob("step_*") if p.is_dir() and step_of(p) is not None and step_of(p) <= step),
                  key=step_of)
    for old in mine[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(universal_dir(old), ignore_errors=True)
    for leftover in root.glob(".step_*"):  # partial saves of killed runs, old copies of re-saved steps
        shutil.rmtree(leftover, ignore_errors=True)


def rng_state(random_modules: dict) -> dict:
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(keys.astype(np.int64)),
             "numpy_rest": torch.tensor([pos, has_gauss, gauss], dtype=torch.float64),
             "python": torch.tensor(random.getstate()[1], dtype=torch.int64)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    for name, module in random_modules.items():
        if module.rng_state() is not None:
            state[f"module.{name}"] = module.rng_state()
    return state


def load_rng_state(state: dict, random_modules: dict) -> None:
    torch.set_rng_state(state["torch"])
    pos, has_gauss, gauss = state["numpy_rest"].tolist()
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(pos), int(has_gauss), gauss))
    random.setstate((3, tuple(int(x) for x in state["python"]), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
    for name, module in random_modules.items():
        module.load_rng_state(state.get(f"module.{name}"))


def save_checkpoint(engine, run_dir: str | Path, step: int, trainer_state: dict, random_modules: dict,
                    keep: int, config_yaml: str, zero_stage: int) -> Path:
    """Every rank calls this (ZeRO shards live on every rank). The run config is saved
    with it, so that a checkpoint exports and evaluates on its own; each rank's file records
    the world and ZeRO stage that wrote it (a resume on another one converts, `plan_resume`).
    An OSError on any rank (a full disk) removes the partial folder, leaves `latest` as it
    was and raises CheckpointError naming the path and the cause on every rank."""
    rank, world = rank_world()
    root = Path(run_dir) / CHECKPOINTS
    final, partial = root / f"step_{step:08d}", root / f".step_{step:08d}.partial"
    error = None
    if rank == 0:
        try:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(partial, ignore_errors=True)  # a save of this step that died earlier
        except OSError as exc:
            error = exc
    barrier()
    if error is None:
        try:
            engine.save_checkpoint(str(partial), tag=TAG)
        except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError (an iostream error)
            error = exc
            barrier()  # DeepSpeed's closing barrier, where the ranks whose writes succeeded wait
    if error is None:
        try:
            meta = {**trainer_state, "step": step, "world": world, "zero_stage": zero_stage}
            (partial / f"rank_{rank}.json").write_text(json.dumps(meta))
            torch.save(rng_state(random_modules), partial / f"rng_{rank}.pt")
            if rank == 0:
                (partial / CONFIG).write_text(config_yaml)
        except (OSError, RuntimeError) as exc:
            error = exc
    failures = [e for e in all_gather_objects(None if error is None else _why(error, partial)) if e]
    if failures:
        if rank == 0:
            shutil.rmtree(partial, ignore_errors=True)
        latest = (root / LATEST).read_text().strip() if (root / LATEST).is_file() else "none yet"
        raise CheckpointError(f"checkpoint of step {step} not written: {failures[0]}; the partial folder is removed "
                              f"and `latest` still names {latest}")
    if rank == 0:
        if final.exists():  # the same step saved by an earlier run: replace it, not merge into it
            old = root / f".step_{step:08d}.old"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(universal_dir(final), ignore_errors=True)  # converted from what it replaces
        os.replace(partial, final)
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(final.name)
        os.replace(tmp, root / LATEST)
        _retire(root, step, keep)
    barrier()
    return final


def _why(error: Exception, partial: Path) -> str:
    """One line for a failed write: the path and the cause. torch.save reports a full disk
    as a bare stream error ("unexpected pos 128 vs 0"): the free space tells."""
    if isinstance(error, OSError):
        return f"{error.filename or partial}: {error.strerror or error}"
    text = str(error).splitlines()[0][:200] if str(error) else type(error).__name__
    try:
        usage = shutil.disk_usage(partial.parent)
    except OSError:
        return f"{partial}: {text}"
    if usage.free < max(64 * 2**20, usage.total // 100):
        return f"{partial}: no space left on device ({usage.free / 2**20:.1f} MiB free there; torch.save: {text})"
    return f"{partial}: {text}"


def demote_checkpoint(run_dir: str | Path, step: int) -> str:
    """Rank 0, when a run stops on non-finite steps right after saving `step`: that
    checkpoint may hold the diverged weights (finite, ~1e30), so it moves aside to
    `suspect_step_N` and `latest` names the newest complete one before it. Returns the
    sentence to tell the user."""
    root = Path(run_dir) / CHECKPOINTS
    path = root / f"step_{step:08d}"
    if not path.is_dir():
        return ""
    suspect = root / f"suspect_{path.name}"
    shutil.rmtree(suspect, ignore_errors=True)
    os.replace(path, suspect)
    earlier = complete_checkpoints(run_dir)
    if earlier:
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(earlier[-1].name)
        os.replace(tmp, root / LATEST)
        return (f"checkpoint {path.name}, saved right before the first non-finite step, may hold diverged weights: "
                f"moved to {suspect}; `latest` now names {earlier[-1].name}")
    (root / LATEST).unlink(missing_ok=True)
    return (f"checkpoint {path.name}, saved right before the first non-finite step, may hold diverged weights: "
            f"moved to {suspect}; there is no earlier checkpoint, so --resume latest starts over")


def _choose(run_dir: Path, resume: str, deep: bool) -> Path | None:
    """The checkpoint --resume names (raises CheckpointError with what to do instead).
    deep: also check every torch file's zip records (the launch's rank 0; it reads every file)."""
    root = run_dir / CHECKPOINTS

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


def universal_dir(path: Path) -> Path:
    """Where checkpoint `path`'s universal conversion lives (beside it)."""
    return path.with_name(f"{path.name}.universal")


def _saved_stage(path: Path, meta: dict) -> int | None:
    """The ZeRO stage that wrote a checkpoint: recorded since this project saves it; for older
    ones read off DeepSpeed's file names (3; 0; None for 1 or 2, which load into each other)."""
    if "zero_stage" in meta:
        return meta["zero_stage"]
    if list((path / TAG).glob("zero_pp_rank_*_model_states.pt")):
        return 3
    return 0 if not list((path / TAG).glob("*optim_states.pt")) else None


@dataclasses.dataclass(frozen=True)
class ResumePlan:
    """How a run continues from a checkpoint; decided before any process group (`plan_resume`)."""

    path: Path  # the checkpoint folder, step_N
    step: int
    world: int  # the ranks that wrote it
    stage: int | None  # the ZeRO stage that wrote it (None: 1 or 2)
    universal: bool  # load its universal conversion (another world, or a stage change with ZeRO-3 in it)

    @property
    def resized(self) -> bool:
        return self.world != rank_world()[1]

    def load_dir(self) -> Path:
        return universal_dir(self.path) if self.universal else self.path

    def describe(self, world: int, stage: int) -> str:
        written = f"ZeRO-{self.stage if self.stage is not None else '1/2'} on {self.world} ranks"
        if not self.universal and self.world == world:
            return f"written by {written}"
        return f"written by {written}, now ZeRO-{stage} on {world} ranks"


def plan_resume(run_dir: str | Path, resume: str, world: int, stage: int, deep: bool) -> ResumePlan | None:
    """Before any process group, on every rank: which checkpoint --resume names (checked in
    full where `deep`, the launch's rank 0), and whether it loads as saved or through a
    universal conversion (another number of ranks, or a move into or out of ZeRO-3). None:
    `latest` with no checkpoint yet. A change DeepSpeed cannot convert is one CheckpointError."""
    path = _choose(Path(run_dir), resume, deep)
    if path is None:
        return None
    meta = json.loads((path / "rank_0.json").read_text())
    saved_world, saved_stage = meta["world"], _saved_stage(path, meta)
    stages = {saved_stage if saved_stage is not None else 2, stage}
    same_partitioning = saved_world == world and (saved_stage == stage or stages <= {1, 2})
    universal = not (same_partitioning or stages == {0})
    if universal and 0 in stages:
        raise CheckpointError(f"--resume {resume}: {path} was written under ZeRO-{saved_stage} on {saved_world} "
                              f"ranks; this run is ZeRO-{stage} on {world} ranks, and DeepSpeed converts checkpoints "
                              "between ZeRO stages 1-3 only. Resume under the stage that wrote it (engine.ds_config): "
                              "ZeRO-0 on any number of ranks, ZeRO 1-3 into one another")
    return ResumePlan(path, meta["step"], saved_world, saved_stage, universal)


def convert_to_universal(plan: ResumePlan, trust: bool = False) -> str | None:
    """The launch's rank 0, once the process group exists and the others wait: write the
    plan's universal conversion beside its checkpoint (aside, then renamed into place; an
    earlier complete conversion is reused). Returns an error message, or None."""
    from alignvl_scale.universal import convert

    final = universal_dir(plan.path)
    if (final / TAG / "zero").is_dir():
        return None
    partial = final.with_name(f".{final.name}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    try:
        with weights_only_loads(trust):
            convert(plan.path / TAG, partial / TAG)
        os.replace(partial, final)
    except CheckpointError as exc:
        return str(exc)
    except Exception as exc:  # DeepSpeed's converter asserts and raises what it likes
        shutil.rmtree(partial, ignore_errors=True)
        detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}" if str(exc) else type(exc).__name__
        return f"{plan.path} cannot be converted to a universal checkpoint ({detail})"
    return None


def load_checkpoint(engine, plan: ResumePlan, random_modules: dict, trust: bool = False) -> dict:
    """Weights and optimizer state into the engine (as saved, or from the universal
    conversion), and this rank's trainer state: its own when the world is the one that
    saved, else every old rank's (`states`: the data position is re-dealt by the caller)."""
    rank, world = rank_world()
    path = plan.path
    with weights_only_loads(trust):
        engine.load_checkpoint(str(plan.load_dir()), tag=TAG, load_optimizer_states=True,
                               load_lr_scheduler_states=False)
        if not plan.resized:
            load_rng_state(torch.load(path / f"rng_{rank}.pt", weights_only=True), random_modules)
    if not plan.resized:
        return json.loads((path / f"rank_{rank}.json").read_text())
    states = [json.loads((path / f"rank_{r}.json").read_text()) for r in range(plan.world)]
    return {**states[0], "states": states}
