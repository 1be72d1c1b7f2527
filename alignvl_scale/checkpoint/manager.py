"""One checkpoint manager over a run's stateful parts (torchtitan's `CheckpointManager(states=...)`):

    manager = CheckpointManager(run_dir, engine, optimizer, states={"progress": ..., "data": ...,
                                "random": ..., "logger": ...}, ...)
    manager.save(step)          # every rank; a checkpoint that survives a kill at any moment
    notes = manager.load(plan)  # every rank; the plan made before any process group (plan.py)

A part is anything with `state_dict()` and `load_state_dict(state)` (torch's Stateful); its
state is saved per rank (store.py's layout). When the checkpoint was written by another number
of ranks, a part that is per rank may take every old rank's state through
`load_resharded(states, step)` (the data streams continue on the new ranks, the random
streams re-seed); the others get old rank 0's. A part whose saved state `needs_every_rank`
gets them on the same world too (a data stream saved before data streams is re-dealt). A
load may return a line for the resume note.

Every rank writes into `.step_N.partial`; once all are done rank 0 renames it to `step_N`
and flips `latest` atomically, so a save that dies half way leaves `latest` on the previous
complete checkpoint; a save that fails (a full disk) removes its partial folder and stops the
run with the path and the cause. Retention keeps the newest `keep` checkpoints *up to the step
just saved* (never the new one, never a later step left by an earlier run). Every load goes
through `weights_only_loads`: DeepSpeed unpickles with weights_only=False, which runs any code
a handed checkpoint holds. The run folder must be on storage every node sees.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Protocol

import torch

from alignvl_scale.checkpoint.plan import ResumePlan
from alignvl_scale.checkpoint.rundir import CONFIG, LATEST, checkpoint_dir, checkpoints_dir, step_of, universal_dir
from alignvl_scale.checkpoint.store import (
    FORMAT,
    META,
    TAG,
    CheckpointError,
    point_latest,
    rank_file,
    read_states,
    weights_only_loads,
)
from alignvl_scale.checkpoint.universal import ensure_universal, load_into_zero0
from alignvl_scale.config import counted
from alignvl_scale.runtime import compat
from alignvl_scale.runtime.distributed import all_gather_objects, barrier, broadcast_from_rank0
from alignvl_scale.runtime.files import replace_dir
from alignvl_scale.runtime.log import say


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> str | None: ...


class CheckpointManager:
    def __init__(self, run_dir: str | Path, engine, optimizer: torch.optim.Optimizer, states: dict[str, Stateful],
                 rank: int, world: int, zero_stage: int, keep: int, config_yaml: str, fingerprint: dict,
                 trust: bool = False, meta: dict | None = None) -> None:
        """engine: the DeepSpeed engine (weights, optimizer, ZeRO partitions); optimizer: the
        torch optimizer inside it, whose groups DeepSpeed's universal load disturbs; meta: what
        a resume plan reads before any process group, besides the world, stage and model
        (the run's data streams)."""
        self.run_dir, self.engine, self.optimizer, self.states = Path(run_dir), engine, optimizer, states
        self.rank, self.world, self.zero_stage, self.keep = rank, world, zero_stage, keep
        self.config_yaml, self.fingerprint, self.trust, self.meta = config_yaml, fingerprint, trust, meta or {}
        self.saved, self.saved_step = None, None  # the last checkpoint this run wrote, and its step

    # -- saving ----------------------------------------------------------------------------
    def save(self, step: int) -> Path:
        """Every rank calls this (ZeRO shards live on every rank). An OSError on any rank (a
        full disk) removes the partial folder, leaves `latest` as it was and raises
        CheckpointError naming the path and the cause on every rank."""
        root, final = checkpoints_dir(self.run_dir), checkpoint_dir(self.run_dir, step)
        partial = root / f".{final.name}.partial"
        error = None
        if self.rank == 0:
            try:
                root.mkdir(parents=True, exist_ok=True)
                shutil.rmtree(partial, ignore_errors=True)  # a save of this step that died earlier
            except OSError as exc:
                error = exc
        barrier()
        if error is None:
            try:
                self.engine.save_checkpoint(str(partial), tag=TAG)
            except (OSError, RuntimeError) as exc:  # torch.save reports a full disk as RuntimeError
                error = exc
                barrier()  # DeepSpeed's closing barrier, where the ranks whose writes succeeded wait
        if error is None:
            error = self._write_parts(partial, step)
        failures = [e for e in all_gather_objects(None if error is None else _why(error, partial)) if e]
        if failures:
            if self.rank == 0:
                shutil.rmtree(partial, ignore_errors=True)
            raise CheckpointError(f"checkpoint of step {step} not written: {failures[0]}; the partial folder is "
                                  f"removed and `latest` still names {self._latest_name()}")
        if self.rank == 0:
            shutil.rmtree(universal_dir(final), ignore_errors=True)  # converted from what this replaces
            replace_dir(partial, final)
            point_latest(self.run_dir, final)
            self._retire(step)
        barrier()
        self.saved, self.saved_step = final, step
        return final

    def _write_parts(self, partial: Path, step: int) -> Exception | None:
        try:
            torch.save({name: part.state_dict() for name, part in self.states.items()}, rank_file(partial, self.rank))
            if self.rank == 0:
                meta = {"format": FORMAT, "step": step, "world": self.world, "zero_stage": self.zero_stage,
                        "fingerprint": self.fingerprint, "parts": list(self.states), **self.meta}
                if self.zero_stage == 0:  # what the universal conversion needs (ZeRO 1-3 record it themselves)
                    names = {id(p): name for name, p in self.engine.module.named_parameters()}
                    meta["optimizer_params"] = [[names[id(p)] for p in group["params"]]
                                                for group in self.optimizer.param_groups]
                (partial / META).write_text(json.dumps(meta, indent=1))
                (partial / CONFIG).write_text(self.config_yaml)
        except (OSError, RuntimeError) as exc:
            return exc
        return None

    def _latest_name(self) -> str:
        pointer = checkpoints_dir(self.run_dir) / LATEST
        return pointer.read_text().strip() if pointer.is_file() else "none yet"

    def _retire(self, step: int) -> None:
        """Keep the newest `keep` checkpoints up to `step` (with their universal conversions);
        later steps (left by an earlier run that went further, before an explicit --resume of
        an older step) are not touched."""
        root = checkpoints_dir(self.run_dir)
        steps = {p: step_of(p) for p in root.glob("step_*") if p.is_dir()}
        mine = sorted((p for p, s in steps.items() if s is not None and s <= step), key=steps.get)
        for old in mine[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
            shutil.rmtree(universal_dir(old), ignore_errors=True)
        for leftover in root.glob(".step_*"):  # partial saves of killed runs, old copies of re-saved steps
            shutil.rmtree(leftover, ignore_errors=True)

    # -- loading ---------------------------------------------------------------------------
    def load(self, plan: ResumePlan) -> list[str]:
        """Weights and optimizer state into the engine (as saved, or from the universal
        conversion `prepare_resume` made), then every part. Returns the resume note's pieces."""
        with weights_only_loads(self.trust), compat.optimizer_groups_kept(self.optimizer):
            try:
                if plan.universal and plan.stage == 0:  # DeepSpeed loads universal folders under ZeRO 1-3 only
                    load_into_zero0(self.engine, self.optimizer, plan.load_dir() / TAG)
                else:
                    self.engine.load_checkpoint(str(plan.load_dir()), tag=TAG, load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
            except RuntimeError as exc:  # the model's shapes: a tower folder that changed under the same name
                if "size mismatch" not in str(exc) and "Missing key" not in str(exc):
                    raise
                detail = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), str(exc))
                raise CheckpointError(f"--resume {plan.path}: its weights do not fit the model this config builds "
                                      f"({detail[:200]}); resume with the towers it was trained with") from None
        notes = [plan.describe()] + ([f"loaded from {universal_dir(plan.path).name}"] if plan.universal else [])
        saved = read_states(plan.path, self.rank if not plan.resized else 0)
        every_rank = [name for name, part in self.states.items() if plan.resized or
                      getattr(part, "needs_every_rank", lambda _: False)(saved[name])]
        old = [read_states(plan.path, r) for r in range(plan.saved_world)] if every_rank else []
        for name, part in self.states.items():
            if name in every_rank and hasattr(part, "load_resharded"):
                notes.append(part.load_resharded([o[name] for o in old], plan.step))
            else:
                notes.append(part.load_state_dict(saved[name]))
        return [note for note in notes if note]


def prepare_resume(plan: ResumePlan, rank: int, trust: bool = False) -> None:
    """Every rank, once the process group exists and before the model is built (a conversion
    holds a whole checkpoint in memory): all ranks resume the same checkpoint, and rank 0
    writes its universal conversion where the plan needs one while the others wait (at most
    engine.collective_timeout)."""
    paths = all_gather_objects(str(plan.path))
    if len(set(paths)) > 1:
        raise CheckpointError(f"the ranks chose different checkpoints to resume ({sorted(set(paths))}); was "
                              "`latest` moved during the launch?")
    if not plan.universal:
        return
    if rank == 0:
        say(f"{plan.path.name}: converting to a universal checkpoint for ZeRO-{plan.stage} on "
            f"{counted(plan.world, 'rank')} -> {universal_dir(plan.path)}")
    error = ensure_universal(plan.path, trust) if rank == 0 else None
    barrier()
    error = broadcast_from_rank0(error)
    if error:
        raise CheckpointError(error)


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
