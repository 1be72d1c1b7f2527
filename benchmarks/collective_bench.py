"""ZeRO-3's gradient reduce on gloo, two ways, on the gradients of train_bench's real towers
(ViT-S/16 and all-MiniLM-L6-v2, every parameter trained; 303 tensors, 44.5 M values): DeepSpeed
0.19.8's `reduce_scatter_coalesced` (what ZeRO-3 runs with `reduce_scatter` on: every gradient
interleaved into one new buffer by rank, then one reduce-scatter) against one all-reduce of the
contiguous gradient buffer in place (what it runs with `reduce_scatter` off, the shipped
zero3*.json's "auto" on CPU; each rank then reads its partition out of the result). Beside them,
gloo's bare reduce-scatter, all-gather and all-reduce of the flat buffer.

Each way runs --repeats times on --ranks gloo ranks (one thread each, torchrun), the ways'
order alternating, between barriers; the table has rank 0's median and the ratio to the
in-place all-reduce.

    python benchmarks/collective_bench.py         # about a minute here
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

ROOT = Path(__file__).resolve().parents[1]


def worker(args: argparse.Namespace) -> None:
    import deepspeed.comm as dist
    from deepspeed.runtime.comm.coalesced_collectives import reduce_scatter_coalesced
    from grad_norm_bench import tower_gradients  # this folder is on sys.path: run as a script

    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    # Before the process group: transformers' save_pretrained writes the config on rank 0 only.
    grads = tower_gradients(seed=rank)
    dist.init_distributed(dist_backend="gloo", verbose=False)
    world = dist.get_world_size()
    if args.scale != 1:
        grads = [g.flatten()[: max(1, int(g.numel() * args.scale))].clone() for g in grads]
    flat = torch.cat([g.flatten() for g in grads])
    flat = flat[: flat.numel() // world * world].clone()
    part = torch.empty(flat.numel() // world)

    def all_reduce_in_place():
        flat.div_(world)
        dist.all_reduce(flat)

    ways = {
        "all_reduce, contiguous buffer in place (reduce_scatter off)": all_reduce_in_place,
        "DeepSpeed reduce_scatter_coalesced (reduce_scatter on)": lambda: reduce_scatter_coalesced(grads),
        "gloo reduce_scatter_tensor, flat": lambda: dist.reduce_scatter_fn(part, flat),
        "gloo all_gather_into_tensor, flat": lambda: dist.allgather_fn(flat, part),
    }
    times: dict[str, list[float]] = {name: [] for name in ways}
    for repeat in range(args.repeats):
        for name in list(ways) if repeat % 2 == 0 else list(ways)[::-1]:
            dist.barrier()
            start = time.perf_counter()
            ways[name]()
            dist.barrier()
            times[name].append(time.perf_counter() - start)
    if rank == 0:
        base = statistics.median(next(iter(times.values())))
        rows = [{"way": name, "median_ms": 1e3 * statistics.median(t), "ratio": statistics.median(t) / base,
                 "runs_ms": [1e3 * x for x in t]} for name, t in times.items()]
        print(f"{world} gloo ranks, {len(grads)} gradients, {flat.numel() / 1e6:.1f} M values, one thread each")
        print(f"{'way':<62} {'median ms':>10} {'ratio':>6}")
        for row in rows:
            print(f"{row['way']:<62} {row['median_ms']:>10.1f} {row['ratio']:>6.2f}")
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1, default=str))
        print(f"wrote {args.out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--scale", type=float, default=1.0, help="keep this fraction of every gradient (tests)")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/collective_bench.json"))
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    from alignvl_scale.runtime.distributed import free_port

    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(args.ranks), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), __file__, "--worker", "--repeats", str(args.repeats),
           "--scale", str(args.scale), "--out", str(args.out.resolve())]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    sys.exit(subprocess.run(cmd, cwd=ROOT, env=env, timeout=1800).returncode)


if __name__ == "__main__":
    main()
