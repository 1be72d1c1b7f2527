"""The run folder: its layout (every name below is read from here, nowhere else), one run at a
time (a lock), and no silent second run on top of an earlier one (as the HF Trainer refuses a
non-empty output folder).

    RUN_DIR/config.yaml  metrics.jsonl  tb/  summary.json  profile/  .lock
    RUN_DIR/checkpoints/step_00000100/           one checkpoint (checkpoint/manager.py)
    RUN_DIR/checkpoints/step_00000100.universal/ its conversion for another world or stage
    RUN_DIR/checkpoints/latest                   text: the newest complete checkpoint's name

`claim_run_dir` runs before any process group, on the launch's rank 0 only (the folder is
on storage every node sees, so one rank decides: preflight.py); it holds the lock until the
process ends.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import socket
from pathlib import Path

from alignvl_scale.config import UserError

CONFIG = "config.yaml"
METRICS = "metrics.jsonl"
SAMPLE_KEYS = "sample_keys.jsonl"  # log.sample_keys
RELIABILITY = "reliability"  # the final evaluation's reliability diagrams
TENSORBOARD = "tb"
SUMMARY = "summary.json"
CHECKPOINTS = "checkpoints"
PROFILE = "profile"
LOCK = ".lock"
RUN_OUTPUTS = (CONFIG, METRICS, SAMPLE_KEYS, RELIABILITY, TENSORBOARD, SUMMARY, CHECKPOINTS, PROFILE)
LATEST = "latest"
STEP_DIR = re.compile(r"step_(\d{8})")


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def checkpoint_dir(run_dir: str | Path, step: int) -> Path:
    return checkpoints_dir(run_dir) / f"step_{step:08d}"


def step_of(path: Path) -> int | None:
    """The step of a checkpoint folder's name; None for any other name."""
    match = STEP_DIR.fullmatch(Path(path).name)
    return int(match.group(1)) if match else None


def universal_dir(path: Path) -> Path:
    """Where checkpoint `path`'s universal conversion lives (beside it)."""
    return path.with_name(f"{path.name}.universal")

_held_locks: dict[Path, object] = {}  # run_dir -> its open lock file, held until the run ends or the process does


class RunDirError(UserError):
    """The run folder cannot be used as asked; the message says what to do instead."""


def _lock(run_dir: Path) -> None:
    handle = (run_dir / LOCK).open("a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown process"
        handle.close()
        raise RunDirError(f"run_dir {run_dir} is in use by another run ({holder}); wait for it to end or set "
                          "another run_dir") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    handle.flush()
    _held_locks[run_dir.resolve()] = handle


def release_run_dir(run_dir: str | Path) -> None:
    """Unlock RUN_DIR before the process ends (a process that trains several runs)."""
    handle = _held_locks.pop(Path(run_dir).resolve(), None)
    if handle is not None:
        handle.close()  # closing the file drops its flock


def claim_run_dir(run_dir: str | Path, resume: str | None, overwrite: bool) -> None:
    """Lock RUN_DIR for this run. Without --resume, a folder that already holds a run is
    refused, unless `overwrite` (then its outputs are deleted first)."""
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        _lock(run_dir)
    except OSError as exc:  # a read-only mount, /proc, no permission, a file in the way
        raise RunDirError(f"run_dir {run_dir} cannot be written ({exc.strerror}: {exc.filename}); set run_dir to a "
                          "folder this user can create and write") from None
    earlier = [name for name in RUN_OUTPUTS if (run_dir / name).exists()]
    if not earlier or resume:
        return
    if not overwrite:
        raise RunDirError(f"run_dir {run_dir} already holds a run ({', '.join(earlier)}): continue it with "
                          "--resume latest, start over with --overwrite (deletes those), or set another run_dir")
    for name in earlier:
        target = run_dir / name
        shutil.rmtree(target) if target.is_dir() else target.unlink()
