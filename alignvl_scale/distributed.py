"""The process-group helpers every module shares: who am I, wait for the others, reduce a
few floats, agree on a flag, and which backend to use. Each works without a process group
too (one rank), so library code calls them unconditionally.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_world() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    return (dist.get_rank(), dist.get_world_size()) if is_distributed() else (0, 1)


def backend() -> str:
    """nccl on GPUs, gloo elsewhere (DeepSpeed's CPU accelerator has no other without oneCCL)."""
    return "nccl" if torch.cuda.is_available() else "gloo"


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_floats(values: list[float], device: torch.device, op: str = "sum") -> list[float]:
    """Reduce a few numbers over ranks in float64 (exact for counts up to 2**53).
    op: sum | min | max."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if is_distributed():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op])
    return t.tolist()


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on some rank ("does any rank still have work")."""
    return bool(all_reduce_floats([float(flag)], device, "max")[0])


def every_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when it is true on all of them ("does every rank have a batch")."""
    return bool(all_reduce_floats([float(flag)], device, "min")[0])


def broadcast_from_rank0(value: object) -> object:
    """Rank 0's value (a picklable object) on every rank."""
    box = [value]
    if is_distributed():
        dist.broadcast_object_list(box, src=0)
    return box[0]
