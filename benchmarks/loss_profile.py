"""Where a contrastive loss's forward+backward time goes: torch's profiler over one pass of
our fused loss and of open_clip's, each operator's own time summed into products, exponentials
(and logs), reductions, copies, other elementwise work and the rest. One process, one rank,
after a warm-up pass; the operands as in loss_bench.py.

    PYTHONPATH=<folder with open_clip/> python benchmarks/loss_profile.py              # N = 16384, both objectives
    python benchmarks/loss_profile.py --sizes 4096 --objectives siglip                  # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from loss_bench import make_loss, open_clip_loss_class
from torch.profiler import ProfilerActivity, profile

CATEGORIES = {  # aten operator -> what it spends its time on
    "products": ("mm", "addmm", "bmm", "matmul", "mv", "dot", "linear"),
    "exponentials": ("exp", "exp_", "logsumexp", "softplus", "softplus_backward", "sigmoid", "sigmoid_",
                     "sigmoid_backward", "log_sigmoid_forward", "log_sigmoid_backward", "_log_softmax",
                     "_log_softmax_backward_data", "_softmax", "_softmax_backward_data", "log", "log_", "log1p",
                     "logaddexp"),
    "reductions": ("sum", "amax", "max", "mean", "nll_loss_forward", "nll_loss_backward"),
    "copies": ("clone", "copy_", "cat", "contiguous", "index", "index_put_", "_to_copy", "stack", "t", "transpose"),
    "elementwise": ("add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "where", "neg", "fill_",
                    "zero_", "rsub", "masked_fill_", "eq", "gt"),
}


def category(op: str) -> str:
    name = op.removeprefix("aten::")
    return next((c for c, ops in CATEGORIES.items() if name in ops), "other")


def profile_mode(mode: str, n: int, args: argparse.Namespace) -> dict:
    g = torch.Generator().manual_seed(0)
    u = F.normalize(torch.randn(n, args.dim, generator=g), dim=1).requires_grad_(True)
    v = F.normalize(torch.randn(n, args.dim, generator=g), dim=1).requires_grad_(True)
    siglip = args.objective == "siglip"
    scale = torch.tensor([10.0 if siglip else 1 / 0.07], requires_grad=True)
    bias = torch.tensor([-10.0], requires_grad=True)
    loss_fn = make_loss(mode, args, 0, 1, bias)
    loss_fn(u, v, scale).backward()  # warm-up
    u.grad = v.grad = scale.grad = bias.grad = None
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        loss_fn(u, v, scale).backward()
    seconds = {c: 0.0 for c in [*CATEGORIES, "other"]}
    for event in prof.key_averages():
        seconds[category(event.key)] += event.self_cpu_time_total / 1e6
    return {"total": sum(seconds.values()), **seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[16384])
    parser.add_argument("--objectives", nargs="+", choices=["infonce", "siglip"], default=["infonce", "siglip"])
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--smoothing", type=float, default=0.1)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/loss_profile.json"))
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    columns = [*CATEGORIES, "other"]
    header = f"{'N':>6} {'objective':>9} {'mode':>8} {'total s':>8} " + " ".join(f"{c:>12}" for c in columns)
    print(f"cpu x {os.cpu_count()}, d = {args.dim}, chunk {args.chunk}, smoothing {args.smoothing}; "
          "seconds by what the operators do (each operator's own time)")
    print(header)
    print("-" * len(header))
    for n in args.sizes:
        for objective in args.objectives:
            args.objective = objective
            modes = ["chunked"] + (["clip"] if open_clip_loss_class(objective) is not None else [])
            for mode in modes:
                row = {"N": n, "objective": objective, "mode": mode, **profile_mode(mode, n, args)}
                rows.append(row)
                print(f"{n:>6} {objective:>9} {mode:>8} {row['total']:>8.2f} "
                      + " ".join(f"{row[c]:>12.2f}" for c in columns), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cpus": os.cpu_count(), "torch": torch.__version__, "rows": rows}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
