"""The process-group helpers every module shares: who am I, wait for the others, reduce a
few floats, agree on a flag, and which backend to use. Each works without a process group
too (one rank), so library code calls them unconditionally.
"""

from __future__ import annotations

import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def free_port() -> int:
    """A free TCP port on the loopback interface (for one-machine process groups)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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


_host_group = None  # created by every rank at the same collective call (first use or make_host_group)


def make_host_group(timeout: timedelta | None = None) -> None:
    """Create the host group now (every rank), with the run's collective timeout."""
    global _host_group
    if is_distributed() and dist.get_backend() != "gloo" and _host_group is None:
        _host_group = dist.new_group(backend="gloo", timeout=timeout)


def host_group():
    """The group for small host-side collectives: the default one under gloo; under NCCL a
    gloo group over the same ranks, because reducing a host number through NCCL means a
    copy to the GPU and back, which waits for every kernel queued before it (a host sync
    per call, and the next step's launches cannot run ahead of the GPU)."""
    if dist.get_backend() == "gloo":
        return None
    make_host_group()
    return _host_group


def all_reduce_floats(values: list[float], op: str = "sum") -> list[float]:
    """Reduce a few host numbers over ranks in float64 (exact for counts up to 2**53), on
    the host group. op: sum | min | max."""
    t = torch.tensor(values, dtype=torch.float64)
    if is_distributed():
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "min": dist.ReduceOp.MIN, "max": dist.ReduceOp.MAX}[op],
                        group=host_group())
    return t.tolist()


def all_gather_floats(value: float) -> list[float]:
    """Every rank's host number, in rank order, on the host group."""
    t = torch.tensor([value], dtype=torch.float64)
    if not is_distributed():
        return [value]
    parts = [torch.zeros_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t, group=host_group())
    return [part.item() for part in parts]


def any_rank(flag: bool) -> bool:
    """True on every rank when it is true on some rank ("does any rank still have work")."""
    return bool(all_reduce_floats([float(flag)], "max")[0])


def all_gather_objects(value: object) -> list:
    """Every rank's picklable value (a short message, say), in rank order, on the host group."""
    if not is_distributed():
        return [value]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, value, group=host_group())
    return out


def broadcast_from_rank0(value: object) -> object:
    """Rank 0's value (a picklable object) on every rank."""
    box = [value]
    if is_distributed():
        dist.broadcast_object_list(box, src=0)
    return box[0]
