"""Spawn real CPU ranks with the gloo backend for multi-process tests."""

from __future__ import annotations

import os
import signal
import traceback
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from alignvl_scale.runtime.distributed import free_port


def _entry(rank: int, world: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
    except Exception as exc:  # reported to the parent, which decides whether it was expected
        result = {"error": f"{type(exc).__name__}: {exc}", "traceback": traceback.format_exc()}
    torch.save(result, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


def run_ranks(fn: Callable, world: int, out_dir: Path, *args, timeout: float = 300) -> list:
    """Run fn(rank, world, *args) on `world` gloo ranks; return each rank's result.

    A rank that saved its result and then aborted at interpreter exit ("terminate called
    without an active exception", seen now and then after DeepSpeed runs: environment.md)
    did its work; one that died before saving fails the test."""
    context = mp.spawn(_entry, args=(world, free_port(), str(out_dir), fn, args), nprocs=world, join=False)
    for process in context.processes:
        process.join(timeout)
    for rank, process in enumerate(context.processes):
        if process.is_alive():
            process.kill()
            raise TimeoutError(f"rank {rank} still running after {timeout} s")
        saved = (out_dir / f"rank{rank}.pt").exists()
        assert process.exitcode == 0 or (saved and process.exitcode == -signal.SIGABRT), \
            f"rank {rank} exited with {process.exitcode} (result saved: {saved})"
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=True) for r in range(world)]
