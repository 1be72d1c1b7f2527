"""Forward+backward time and peak memory of the contrastive loss: ours plain, ours chunked
(the fused one-pass path, at each --precisions) and, when open-clip-torch is installed,
open_clip's loss (--objective infonce: ClipLoss, gather with grad, local loss; siglip:
SigLipLoss, its default bidirectional neighbour exchange), side by side in one run.

Each (N, world, mode) cell runs in fresh processes (gloo ranks when world > 1, CPU only),
so peak memory is that cell's alone: on CPU the growth of the peak RSS after the inputs
exist (max over ranks), on CUDA the allocator's peak above the inputs. Time is the median
over --rounds fresh processes (the modes' order alternating round to round) of the median of
--reps forward+backward passes in each (after one warm-up pass on CUDA), as seen by rank 0.
Ratios are against open_clip's loss where it ran, else against our plain loss.

    python benchmarks/loss_bench.py                                  # CPU: the README table
    python benchmarks/loss_bench.py --device cuda --sizes 16384 65536 262144 --worlds 1
    python benchmarks/loss_bench.py --sizes 4096 --rounds 1          # a quick look
    python benchmarks/loss_bench.py --objective siglip               # the sigmoid loss: README's second table
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from alignvl_scale.losses.infonce import align_vl_loss
from alignvl_scale.losses.sigmoid import sigmoid_loss
from alignvl_scale.runtime.distributed import free_port
from alignvl_scale.runtime.perf import peak_rss_bytes

GIB = 2**30
EXIT_ABORT = "terminate called without an active exception"
# Live B x N fp32 buffers at the peak of the plain loss and of ClipLoss (logits and
# log-softmax per direction, their grads): cells whose estimate does not fit are skipped.
FULL_LOGITS_BUFFERS = 6


OPEN_CLIP_LOSSES = {"infonce": "ClipLoss", "siglip": "SigLipLoss"}


def open_clip_loss_class(objective: str = "infonce"):
    """open_clip's loss for the objective, or None when open-clip-torch is not installed.
    Its package import needs torchvision; its loss module does not, so that is loaded by
    path when the package import fails (a CPU machine with only CUDA torchvision wheels)."""
    try:
        from open_clip import loss as module
    except Exception:  # noqa: BLE001 - any import failure means: load the module file alone
        spec = importlib.util.find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            return None
        path = Path(list(spec.submodule_search_locations)[0]) / "loss.py"
        module_spec = importlib.util.spec_from_file_location("open_clip_loss", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    return getattr(module, OPEN_CLIP_LOSSES[objective])


def _reset_peak(device: torch.device) -> int:
    """Reset the peak counter; return the baseline the peak is measured above."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated()
    Path("/proc/self/clear_refs").write_text("5")
    return peak_rss_bytes()


def _peak(device: torch.device) -> int:
    return torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_bytes()


def make_loss(mode: str, args: argparse.Namespace, rank: int, world: int, bias: torch.Tensor):
    """loss(u, v, scale) of the cell's mode; the sigmoid ones also use (and differentiate) `bias`."""
    siglip = args.objective == "siglip"
    if mode == "clip":
        if siglip:
            loss = open_clip_loss_class("siglip")(rank=rank, world_size=world)
            return lambda u, v, scale: loss(u, v, scale, bias)
        clip = open_clip_loss_class()(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)
        return lambda u, v, scale: clip(u, v, scale)
    chunk, precision = (None, "fp32") if mode == "plain" else (args.chunk, mode.partition("-")[2] or "fp32")
    if siglip:
        return lambda u, v, scale: sigmoid_loss(u, v, scale, bias, smoothing=args.smoothing, chunk_size=chunk,
                                                matmul_precision=precision)
    return lambda u, v, scale: align_vl_loss(u, v, scale, smoothing=args.smoothing, chunk_size=chunk,
                                             matmul_precision=precision)


def worker(mode: str, n: int, args: argparse.Namespace) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    device = torch.device(args.device)
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    g = torch.Generator().manual_seed(rank)
    b = n // world
    u = F.normalize(torch.randn(b, args.dim, generator=g), dim=1).to(device).requires_grad_(True)
    v = F.normalize(torch.randn(b, args.dim, generator=g), dim=1).to(device).requires_grad_(True)
    siglip = args.objective == "siglip"
    scale = torch.tensor([10.0 if siglip else 1 / 0.07], device=device, requires_grad=True)
    bias = torch.tensor([-10.0], device=device, requires_grad=True)
    loss_fn = make_loss(mode, args, rank, world, bias)
    times, peaks = [], []
    warmup = 1 if device.type == "cuda" else 0  # CUDA: the first pass warms up (allocator, kernels)
    for rep in range(args.reps + warmup):
        u.grad = v.grad = scale.grad = bias.grad = None
        base = _reset_peak(device)
        if world > 1:
            dist.barrier()
        start = time.perf_counter()
        loss_fn(u, v, scale).backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if world > 1:
            dist.barrier()
        if rep >= warmup:
            times.append(time.perf_counter() - start)
            peaks.append(_peak(device) - base)
    peak = torch.tensor([max(peaks)], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(peak, op=dist.ReduceOp.MAX)
        dist.destroy_process_group()
    if rank == 0:
        print(json.dumps({"seconds": statistics.median(times), "peak_gib": peak.item() / GIB}))


def run_cell(mode: str, n: int, world: int, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--worker", mode, "--sizes", str(n), "--dim", str(args.dim),
           "--chunk", str(args.chunk), "--reps", str(args.reps if n < 65536 or args.device == "cuda" else 1),
           "--smoothing", str(args.smoothing), "--device", args.device, "--objective", args.objective]
    port = str(free_port())
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={
        **os.environ, "RANK": str(r), "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": port, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world))})
        for r in range(world)]
    outputs = [p.communicate() for p in procs]
    # gloo ranks now and then abort at interpreter exit after their work is done (environment.md):
    # with rank 0's measurement printed, such an exit is not a failed cell.
    done = procs[0].returncode == 0 and outputs[0][0].strip()
    failed = [p for p, (_, err) in zip(procs, outputs, strict=True)
              if p.returncode and not (done and p.returncode == -signal.SIGABRT and EXIT_ABORT in err)]
    if failed:
        error = next(err for (_, err), p in zip(outputs, procs, strict=True) if p in failed).strip()
        return {"status": f"failed (exit {[p.returncode for p in procs]}): {error.splitlines()[-1][:200]}"}
    return {"status": "ok", **json.loads(outputs[0][0].strip().splitlines()[-1])}


def combined(results: list[dict]) -> dict:
    """One cell over its rounds: the median time, the largest peak, the first failure if any."""
    failed = [r for r in results if r["status"] != "ok"]
    if failed:
        return failed[0]
    return {"status": "ok", "seconds": statistics.median(r["seconds"] for r in results),
            "peak_gib": max(r["peak_gib"] for r in results), "round_seconds": [r["seconds"] for r in results]}


def device_memory(device: str) -> int:
    if device == "cuda":
        return torch.cuda.get_device_properties(0).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def parse_args() -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--sizes", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--worlds", type=int, nargs="+", default=None,
                        help="ranks per cell (default: 1 2 on CPU; CUDA runs one rank)")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=None, help="columns per tile of the chunked path "
                        "(default 1024 on CPU, 4096 on CUDA)")
    parser.add_argument("--precisions", nargs="+", default=None, choices=["fp32", "tf32", "bf16"],
                        help="tile matmul precisions of the chunked path (default fp32 on CPU; fp32 tf32 bf16 on CUDA)")
    parser.add_argument("--reps", type=int, default=1, help="passes per process (their median is the round's)")
    parser.add_argument("--rounds", type=int, default=3,
                        help="fresh processes per cell, the modes' order alternating; time is their median")
    parser.add_argument("--modes", nargs="+", default=None,
                        help="a subset of plain, chunked[-tf32|-bf16], clip (default: all that can run)")
    parser.add_argument("--smoothing", type=float, default=0.1)
    parser.add_argument("--objective", choices=list(OPEN_CLIP_LOSSES), default="infonce",
                        help="infonce (ours vs ClipLoss) or siglip (ours vs SigLipLoss)")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON (default benchmarks/results/loss_bench[_cuda].json)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    return parser, parser.parse_args()


def main() -> None:
    parser, args = parse_args()
    cuda = args.device == "cuda"
    args.chunk = args.chunk or (4096 if cuda else 1024)
    if args.worker:
        worker(args.worker, args.sizes[0], args)
        return
    worlds = args.worlds or ([1] if cuda else [1, 2])
    if cuda and worlds != [1]:
        parser.error("--device cuda runs one rank per cell (--worlds 1)")
    precisions = args.precisions or (["fp32", "tf32", "bf16"] if cuda else ["fp32"])
    modes = ["plain"] + [f"chunked-{p}" if p != "fp32" else "chunked" for p in precisions]
    if open_clip_loss_class(args.objective) is not None:
        modes.append("clip")
    modes = [m for m in modes if m in args.modes] if args.modes else modes
    suffix = ("_siglip" if args.objective == "siglip" else "") + ("_cuda" if cuda else "")
    out = args.out or Path(f"benchmarks/results/loss_bench{suffix}.json")
    memory = device_memory(args.device)
    rows = []
    header = (f"{'N':>7} {'ranks':>5} {'mode':>13} {'fwd+bwd s':>10} {'peak GiB/rank':>14} {'time x base':>12} "
              f"{'mem / base':>11}")
    print(f"device: {torch.cuda.get_device_name(0) if cuda else f'cpu x {os.cpu_count()}'}; d = {args.dim}, "
          f"chunk {args.chunk}, smoothing {args.smoothing}; objective {args.objective}; "
          f"base = {OPEN_CLIP_LOSSES[args.objective] if 'clip' in modes else 'plain'}")
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        for world in worlds:
            full_logits = FULL_LOGITS_BUFFERS * (n // world) * n * 4
            too_big = {mode: {"status": f"skipped: needs ~{full_logits / GIB:.0f} GiB per rank"} for mode in modes
                       if mode in ("plain", "clip") and full_logits > 0.8 * memory / (1 if cuda else world)}
            runs = {mode: [] for mode in modes if mode not in too_big}
            for round_ in range(args.rounds):  # the order alternates: no mode always runs first
                for mode in (list(runs) if round_ % 2 == 0 else list(reversed(runs))):
                    runs[mode].append(run_cell(mode, n, world, args))
            cells = {**too_big, **{mode: combined(results) for mode, results in runs.items()}}
            for mode in modes:
                rows.append({"N": n, "world": world, "mode": mode, "dim": args.dim, "device": args.device,
                             "objective": args.objective,
                             "chunk": None if mode in ("plain", "clip") else args.chunk, **cells[mode]})
            base = cells.get("clip", {"status": "absent"})
            base = base if base["status"] == "ok" else cells["plain"]
            for row in rows[-len(modes):]:
                if row["status"] == "ok" and base["status"] == "ok":
                    row["time_ratio"] = row["seconds"] / base["seconds"]
                    row["memory_ratio"] = row["peak_gib"] / base["peak_gib"]
                    print(f"{n:>7} {world:>5} {row['mode']:>13} {row['seconds']:>10.3f} {row['peak_gib']:>14.3f} "
                          f"{row['time_ratio']:>12.2f} {row['memory_ratio']:>11.3f}")
                elif row["status"] == "ok":
                    print(f"{n:>7} {world:>5} {row['mode']:>13} {row['seconds']:>10.3f} {row['peak_gib']:>14.3f}")
                else:
                    print(f"{n:>7} {world:>5} {row['mode']:>13} {row['status']}")
            sys.stdout.flush()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"machine": {"device": args.device, "cpus": os.cpu_count(), "memory_gib": memory / GIB,
                                           "torch": torch.__version__}, "rows": rows}, indent=1))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
