"""Checkpoints that survive a kill and that nobody can hide code in.

    RUN_DIR/checkpoints/step_00000100/state/...      DeepSpeed engine (weights, optimizer)
    RUN_DIR/checkpoints/step_00000100/rank_0.json    trainer state of rank 0: step, data position, counts
    RUN_DIR/checkpoints/step_00000100/rng_0.pt       RNG states of rank 0 (tensors only)
    RUN_DIR/checkpoints/step_00000100/config.yaml    the run config
    RUN_DIR/checkpoints/latest                       text: "step_00000100"

Every rank writes into `.step_N.partial`; once all are done rank 0 renames it to `step_N`
and flips `latest` atomically, so a save that dies half way leaves `latest` on the previous
complete checkpoint. Retention keeps the newest `keep` checkpoints *up to the step just
saved* (never the new one, never a later step left by an earlier run). Every load goes
through `weights_only_loads`: DeepSpeed unpickles with weights_only=False, which runs any
code a handed checkpoint holds. The run folder must be on storage every node sees.
"""

from __future__ import annotations

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

from alignvl_scale.distributed import barrier, broadcast_from_rank0, rank_world
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
                                      "code when loaded; refused. If you trust its source, pass --trust-checkpoint. "
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


def problems(path: Path) -> list[str]:
    """Why a checkpoint folder is not complete and readable ([] when it is): every rank's
    state and RNG file present, JSON that parses, torch files whose zip records check out
    (a truncated file fails here, by name, instead of deep inside a load)."""
    if not (path / TAG).is_dir() or not (path / "rank_0.json").is_file():
        return [f"{path}: not a checkpoint (no {TAG}/ or rank_0.json)"]
    try:
        world = json.loads((path / "rank_0.json").read_text())["world"]
        for rank in range(world):
            json.loads((path / f"rank_{rank}.json").read_text())
    except (OSError, ValueError, KeyError) as exc:
        return [f"{path}: trainer state unreadable: {exc}"]
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
    """Keep the newest `keep` checkpoints up to `step`; later steps (left by an earlier run
    that went further, before an explicit --resume of an older step) are not touched."""
    mine = sorted((p for p in root.glob("step_*") if p.is_dir() and (step_of(p) or 0) <= step), key=step_of)
    for old in mine[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
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
                    keep: int, config_yaml: str) -> Path:
    """Every rank calls this (ZeRO shards live on every rank). The run config is saved
    with it, so that a checkpoint exports and evaluates on its own."""
    rank, world = rank_world()
    root = Path(run_dir) / CHECKPOINTS
    final, partial = root / f"step_{step:08d}", root / f".step_{step:08d}.partial"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)  # a save of this step that died earlier
    barrier()
    engine.save_checkpoint(str(partial), tag=TAG)
    (partial / f"rank_{rank}.json").write_text(json.dumps({**trainer_state, "step": step, "world": world}))
    torch.save(rng_state(random_modules), partial / f"rng_{rank}.pt")
    if rank == 0:
        (partial / CONFIG).write_text(config_yaml)
    barrier()
    if rank == 0:
        if final.exists():  # the same step saved by an earlier run: replace it, not merge into it
            os.replace(final, root / f".step_{step:08d}.old")
        os.replace(partial, final)
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(final.name)
        os.replace(tmp, root / LATEST)
        _retire(root, step, keep)
    barrier()
    return final


def demote_checkpoint(run_dir: str | Path, step: int) -> str:
    """Rank 0, when a run stops on non-finite losses right after saving `step`: that
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
        return (f"checkpoint {path.name}, saved right before the first non-finite loss, may hold diverged weights: "
                f"moved to {suspect}; `latest` now names {earlier[-1].name}")
    (root / LATEST).unlink(missing_ok=True)
    return (f"checkpoint {path.name}, saved right before the first non-finite loss, may hold diverged weights: "
            f"moved to {suspect}; there is no earlier checkpoint, so --resume latest starts over")


def _choose(run_dir: Path, resume: str) -> Path | None:
    """Rank 0's decision for --resume (raises CheckpointError with what to do instead)."""
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
    found = problems(path)
    if found:
        raise CheckpointError(f"--resume {resume}: {found[0]}" + offer())
    return path


def resolve_resume(run_dir: str | Path, resume: str) -> Path | None:
    """'latest' -> the checkpoint `latest` names (None when there is no checkpoint yet); else
    a path. Decided and checked on rank 0 and broadcast, so that every rank loads the same
    one or raises the same error (none waits for another in a collective)."""
    choice: tuple[str | None, str | None] = (None, None)
    if rank_world()[0] == 0:
        try:
            path = _choose(Path(run_dir), resume)
            choice = (str(path) if path else None, None)
        except CheckpointError as exc:
            choice = (None, str(exc))
    path, error = broadcast_from_rank0(choice)
    if error:
        raise CheckpointError(error)
    return Path(path) if path else None


def load_checkpoint(engine, path: Path, random_modules: dict) -> dict:
    rank, world = rank_world()
    state = json.loads((path / f"rank_{rank}.json").read_text())
    if state["world"] != world:
        raise CheckpointError(f"{path} was written by {state['world']} ranks, this run has {world}: the data "
                              "position is per rank; resume with the same number of ranks")
    with weights_only_loads():
        engine.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=False)
        load_rng_state(torch.load(path / f"rng_{rank}.pt", weights_only=True), random_modules)
    return state
