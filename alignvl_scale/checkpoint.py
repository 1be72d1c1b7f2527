"""Checkpoints that survive a kill: every rank saves, a `latest` pointer flips atomically
once all ranks are done, the last K are kept.

    RUN_DIR/checkpoints/step_00000100/state/...      DeepSpeed engine (weights, optimizer, scheduler)
    RUN_DIR/checkpoints/step_00000100/rank_0.json    trainer state of rank 0: step, data position, counts
    RUN_DIR/checkpoints/step_00000100/rng_0.pt       RNG states of rank 0 (tensors only)
    RUN_DIR/checkpoints/latest                       text: "step_00000100"

A save that dies half way leaves `latest` on the previous, complete checkpoint. The run
folder must be on storage that every node sees.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

from alignvl_scale.distributed import barrier, broadcast_from_rank0, rank_world

TAG = "state"
LATEST = "latest"


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
    root = Path(run_dir) / "checkpoints"
    path = root / f"step_{step:08d}"
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        if path.exists():  # a save of this step that died earlier; `latest` never pointed here
            shutil.rmtree(path)
    barrier()
    engine.save_checkpoint(str(path), tag=TAG)
    (path / f"rank_{rank}.json").write_text(json.dumps({**trainer_state, "step": step, "world": world}))
    torch.save(rng_state(random_modules), path / f"rng_{rank}.pt")
    if rank == 0:
        (path / "config.yaml").write_text(config_yaml)
    barrier()
    if rank == 0:
        tmp = root / f".{LATEST}.tmp"
        tmp.write_text(path.name)
        os.replace(tmp, root / LATEST)
        for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    barrier()
    return path


def resolve_resume(run_dir: str | Path, resume: str) -> Path | None:
    """'latest' -> the checkpoint `latest` names (None when there is none yet); else a path.
    Decided on rank 0 and broadcast, so every rank loads the same one."""
    choice = None
    if rank_world()[0] == 0:
        if resume == "latest":
            pointer = Path(run_dir) / "checkpoints" / LATEST
            choice = str(pointer.parent / pointer.read_text().strip()) if pointer.exists() else None
        else:
            choice = str(Path(resume))
    choice = broadcast_from_rank0(choice)
    if choice is not None and not Path(choice, TAG).is_dir():
        raise FileNotFoundError(f"--resume {resume}: {choice} is not a checkpoint (no {TAG}/ inside)")
    return Path(choice) if choice else None


def load_checkpoint(engine, path: Path, random_modules: dict) -> dict:
    rank, world = rank_world()
    state = json.loads((path / f"rank_{rank}.json").read_text())
    if state["world"] != world:
        raise RuntimeError(f"{path} was written by {state['world']} ranks, this run has {world}: the data position "
                           "is per rank; resume with the same number of ranks")
    engine.load_checkpoint(str(path), tag=TAG, load_optimizer_states=True, load_lr_scheduler_states=True)
    load_rng_state(torch.load(path / f"rng_{rank}.pt", weights_only=True), random_modules)
    return state
