"""What keying the head's randomness by the sample costs (docs/design.md, "Data streams and
randomness keyed by the sample"): the Align-VL head's forward + backward (FuseMix mixup,
Random Perturbation, MLP adapters with dropout) on one rank's batch, its draws keyed by k
data streams (one generator seeding per stream per kind of draw) against the head's own
per-rank generators (no keys: one seeding ever). Medians of --repeats, the cases
alternating in order; one thread.

    python benchmarks/keyed_draws_bench.py                       # CPU, about a minute here
    python benchmarks/keyed_draws_bench.py --device cuda --rows 8192
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from alignvl_scale.data.streams import RowKeys
from alignvl_scale.model.head import AlignVLHead


def step_seconds(head: AlignVLHead, x: torch.Tensor, y: torch.Tensor, keys: RowKeys | None, steps: int) -> float:
    """Seconds per forward + backward, over `steps` after one warm-up."""
    def one(index: int) -> None:
        rows = None if keys is None else RowKeys(0, index, keys.first_stream, keys.count)
        out = head(x, y, rows)
        (out.image.sum() + out.text.sum()).backward()

    one(0)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for index in range(1, steps + 1):
        one(index)
    if x.device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1024, help="one rank's micro-batch")
    parser.add_argument("--image-dim", type=int, default=768)
    parser.add_argument("--text-dim", type=int, default=768)
    parser.add_argument("--embed-dim", type=int, default=512)
    parser.add_argument("--streams", type=int, nargs="+", default=[1, 8, 64], help="data streams this rank serves")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/keyed_draws_bench.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    device = torch.device(args.device)
    torch.manual_seed(0)
    head = AlignVLHead(args.image_dim, args.text_dim, args.embed_dim, adapter_depth=2, dropout=0.1, noise_sigma=0.01,
                       mixup="fusemix", seed=0).to(device).train()
    x = torch.randn(args.rows, args.image_dim, device=device)
    y = torch.randn(args.rows, args.text_dim, device=device)
    cases = {"own generators (no keys)": None, **{f"keyed, {k} streams": RowKeys(0, 0, 0, k) for k in args.streams}}
    times: dict[str, list[float]] = {name: [] for name in cases}
    for repeat in range(args.repeats):
        for name in list(cases) if repeat % 2 == 0 else list(cases)[::-1]:
            times[name].append(step_seconds(head, x, y, cases[name], args.steps))
    medians = {name: statistics.median(v) for name, v in times.items()}
    base = medians["own generators (no keys)"]
    print(f"head fwd+bwd, {args.rows} rows, {args.image_dim}/{args.text_dim} -> {args.embed_dim}, {device}")
    print(f"{'draws':<26} {'ms/step':>9} {'vs no keys':>11}")
    for name, value in medians.items():
        print(f"{name:<26} {1000 * value:>9.2f} {value / base:>11.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"seconds": times, "medians": medians, "vs_no_keys":
                                    {k: v / base for k, v in medians.items()}, "args": vars(args)}, indent=1,
                                   default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
