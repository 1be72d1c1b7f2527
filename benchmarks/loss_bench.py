"""Forward+backward time and peak memory of the plain vs chunked Align-VL loss.

Each (N, world, mode) cell runs in fresh processes (gloo ranks when world > 1), so peak
memory is that cell's alone: the kernel's peak-RSS counter is reset after the inputs
exist, and the growth above that point is reported (max over ranks). Time is the median
of --reps forward+backward passes, as seen by rank 0.

    python benchmarks/loss_bench.py                       # the full table (about 15 min here)
    python benchmarks/loss_bench.py --sizes 4096 --reps 2 # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from alignvl_scale.engine import free_port
from alignvl_scale.loss import align_vl_loss

GIB = 2**30
# Plain-path live B x N fp32 buffers at the peak (logits and log-softmax per direction, their
# grads): cells whose estimate does not fit in memory are reported as skipped, not run.
PLAIN_BUFFERS = 6


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def worker(n: int, dim: int, chunk: int | None, reps: int, smoothing: float) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    g = torch.Generator().manual_seed(rank)
    b = n // world
    u = F.normalize(torch.randn(b, dim, generator=g), dim=1).requires_grad_(True)
    v = F.normalize(torch.randn(b, dim, generator=g), dim=1).requires_grad_(True)
    scale = torch.tensor([1 / 0.07], requires_grad=True)
    times, peaks = [], []
    for _ in range(reps):
        u.grad = v.grad = scale.grad = None
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
        base = _rss_bytes("VmRSS")
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        align_vl_loss(u, v, scale, smoothing=smoothing, chunk_size=chunk).backward()
        if world > 1:
            dist.barrier()
        times.append(time.perf_counter() - start)
        peaks.append(_rss_bytes("VmHWM") - base)
    peak = torch.tensor([max(peaks)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({"seconds": statistics.median(times), "peak_gib": peak.item() / GIB}))


def run_cell(n: int, world: int, chunk: int | None, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", "--sizes", str(n), "--dim", str(args.dim),
           "--chunk", str(chunk or 0), "--reps", str(args.reps if n < 65536 else 1),
           "--smoothing", str(args.smoothing)]
    port = str(free_port())
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={
        **os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world))})
        for r in range(world)]
    outputs = [p.communicate()[0] for p in procs]
    if any(p.returncode for p in procs):
        return {"status": f"failed (exit {[p.returncode for p in procs]})"}
    return {"status": "ok", **json.loads(outputs[0].strip().splitlines()[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=1024, help="column tile of the chunked path")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--smoothing", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/loss_bench.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.sizes[0], args.dim, args.chunk or None, args.reps, args.smoothing)
        return

    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    rows = []
    header = (f"{'N':>7} {'ranks':>5} {'mode':>8} {'fwd+bwd s':>10} {'peak GiB/rank':>14} {'time x plain':>13} "
              f"{'mem / plain':>12}")
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        for world in args.worlds:
            plain_need = PLAIN_BUFFERS * (n // world) * n * 4 * world
            cells = {}
            for mode, chunk in (("plain", None), ("chunked", args.chunk)):
                if mode == "plain" and plain_need > 0.8 * memory:
                    cells[mode] = {"status": f"skipped: needs ~{plain_need / GIB:.0f} GiB"}
                else:
                    cells[mode] = run_cell(n, world, chunk, args)
                cell = {"N": n, "world": world, "mode": mode, "chunk": chunk, "dim": args.dim, **cells[mode]}
                plain = cells["plain"]
                if mode == "chunked" and plain["status"] == "ok" and cell["status"] == "ok":
                    cell["time_ratio"] = cell["seconds"] / plain["seconds"]
                    cell["memory_ratio"] = cell["peak_gib"] / plain["peak_gib"]
                rows.append(cell)
                if cell["status"] == "ok":
                    ratios = (f"{cell['time_ratio']:>13.2f} {cell['memory_ratio']:>12.3f}"
                              if "time_ratio" in cell else "")
                    print(f"{n:>7} {world:>5} {mode:>8} {cell['seconds']:>10.2f} {cell['peak_gib']:>14.3f} "
                          f"{ratios}")
                else:
                    print(f"{n:>7} {world:>5} {mode:>8} {cell['status']}")
                sys.stdout.flush()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": {"cpus": os.cpu_count(), "memory_gib": memory / GIB,
                                                "torch": torch.__version__}, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
