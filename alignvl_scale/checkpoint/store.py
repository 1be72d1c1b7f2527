"""One checkpoint on disk: what it holds, whether it is whole, and reading it without running
any code it may hide. The only module besides the universal conversion and the weights
reader that knows DeepSpeed's file names.

    step_N/state/            DeepSpeed's engine: weights, optimizer, ZeRO partitions (TAG)
    step_N/meta.json         step, world and ZeRO stage that wrote it, the model's fingerprint
    step_N/rank_R.pt         every stateful part of rank R: {part name: its state_dict()}
    step_N/config.yaml       the run config (a checkpoint exports and evaluates on its own)

Checkpoints written before the manager (format 1) hold rank_R.json (trainer state) and
rng_R.pt (random streams) instead of meta.json and rank_R.pt; they are read as the same parts.
"""

from __future__ import annotations

import json
import zipfile
from contextlib import contextmanager
from pathlib import Path

import torch

from alignvl_scale.checkpoint.rundir import LATEST, checkpoint_dir, checkpoints_dir, step_of
from alignvl_scale.config import UserError
from alignvl_scale.runtime import compat
from alignvl_scale.runtime.files import write_text_atomic

TAG = "state"  # DeepSpeed's tag: the engine's files live in step_N/state/
META = "meta.json"
FORMAT = 2
ZERO12_MODULE = "mp_rank_00_model_states.pt"  # ZeRO 1-2's module file (ZeRO-3: one per rank)
ZERO3_MODULE = "zero_pp_rank_0_mp_rank_00_model_states.pt"


class CheckpointError(UserError):
    """A checkpoint cannot be used; the message names the file and what to do instead."""


def rank_file(path: Path, rank: int) -> Path:
    return path / f"rank_{rank}.pt"


@contextmanager
def weights_only_loads(trust: bool = False):
    """Inside, every `torch.load` (DeepSpeed's checkpoint engine and zero_to_fp32 ask for
    weights_only=False) runs with weights_only=True and DeepSpeed's few types allowed, so a
    checkpoint someone hands you cannot run code; a file holding anything else raises
    CheckpointError. trust=True (the user vouches for the file) leaves torch.load alone."""
    if trust:
        yield
        return

    def load(real_load, *args, **kwargs):
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

    with compat.torch_load_replaced(load), torch.serialization.safe_globals(compat.deepspeed_checkpoint_types()):
        yield


def read_meta(path: Path) -> dict:
    """step, world, zero_stage (absent in old checkpoints) and fingerprint (likewise)."""
    if (path / META).is_file():
        return json.loads((path / META).read_text())
    legacy = json.loads((path / "rank_0.json").read_text())
    return {"step": legacy["step"], "world": legacy["world"], **({"zero_stage": legacy["zero_stage"]}
                                                              if "zero_stage" in legacy else {})}


def _rank_files(path: Path, world: int) -> list[Path]:
    if (path / META).is_file():
        return [rank_file(path, r) for r in range(world)]
    return [path / f"{kind}_{r}.{ext}" for r in range(world) for kind, ext in (("rank", "json"), ("rng", "pt"))]


def read_states(path: Path, rank: int) -> dict:
    """Rank `rank`'s parts: {name: state}. Format-1 checkpoints are read as the same parts."""
    if (path / META).is_file():
        return torch.load(rank_file(path, rank), weights_only=True)
    legacy = json.loads((path / f"rank_{rank}.json").read_text())
    counters = ("step", "skipped_steps", "bad_steps_in_a_row", "total_steps", "budget", "contrastive_batch")
    return {"progress": {k: legacy[k] for k in counters if k in legacy}, "data": legacy["data"],
            "random": torch.load(path / f"rng_{rank}.pt", weights_only=True), "logger": {"step": legacy["step"]}}


def problems(path: Path, deep: bool = True) -> list[str]:
    """Why a checkpoint folder is not complete and readable ([] when it is): every rank's file
    present, JSON that parses, and (deep) torch files whose zip records check out (a truncated
    file fails here, by name, instead of deep inside a load)."""
    if not (path / TAG).is_dir() or not ((path / META).is_file() or (path / "rank_0.json").is_file()):
        return [f"{path}: not a checkpoint (no {TAG}/ or {META})"]
    try:
        files = _rank_files(path, read_meta(path)["world"])
        for file in (f for f in files if f.suffix == ".json"):
            json.loads(file.read_text())
    except (OSError, ValueError, KeyError) as exc:
        return [f"{path}: trainer state unreadable: {exc}"]
    missing = [f"{file}: missing" for file in files if not file.is_file()]
    if missing or not deep:
        return missing
    found = []
    for file in sorted([*path.glob(f"{TAG}/*.pt"), *(f for f in files if f.suffix == ".pt")]):
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
    root = checkpoints_dir(run_dir)
    found = [p for p in root.glob("step_*") if p.is_dir() and step_of(p) is not None] if root.is_dir() else []
    return [p for p in sorted(found, key=step_of) if not problems(p)]


def point_latest(run_dir: str | Path, path: Path | None) -> None:
    """`latest` names `path` (atomically), or is removed (None)."""
    pointer = checkpoints_dir(run_dir) / LATEST
    if path is None:
        pointer.unlink(missing_ok=True)
    else:
        write_text_atomic(pointer, path.name)


def demote_checkpoint(run_dir: str | Path, step: int) -> str:
    """Rank 0, when a run stops on non-finite steps right after saving `step`: that
    checkpoint may hold the diverged weights (finite, ~1e30), so it moves aside to
    `suspect_step_N` and `latest` names the newest complete one before it. Returns the
    sentence to tell the user."""
    import os
    import shutil

    path = checkpoint_dir(run_dir, step)
    if not path.is_dir():
        return ""
    suspect = path.with_name(f"suspect_{path.name}")
    shutil.rmtree(suspect, ignore_errors=True)
    os.replace(path, suspect)
    earlier = complete_checkpoints(run_dir)
    point_latest(run_dir, earlier[-1] if earlier else None)
    said = (f"checkpoint {path.name}, saved right before the first non-finite step, may hold diverged weights: "
            f"moved to {suspect}; ")
    return said + (f"`latest` now names {earlier[-1].name}" if earlier else
                   "there is no earlier checkpoint, so --resume latest starts over")
