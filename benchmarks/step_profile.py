"""Where a trainer step's time goes under one engine: py-spy samples every rank of a real
torchrun launch of train_bench's run (real-shape towers, both trained; 2 ranks), and the
samples inside the ranks' training loops (not start-up) are summed by what they were doing,
the innermost match first: DeepSpeed's gradient norm, its gradient copies and flattening, the
communication (the gradient reduce, ZeRO-3's parameter gathers; gloo on the same cores), the
optimizer step, backward, forward, the rest (data hand-over, logging, DeepSpeed's other step
bookkeeping). Samples are CPU time (py-spy
drops idle threads), so a rank waiting on its peer counts nothing.

    pip install py-spy        # or the .[bench] extra
    python benchmarks/step_profile.py --stage 2      # about 3 minutes here

Prints a table and writes JSON; `--stage` takes train_bench's names (0, 1, 1c, 2, 2c, 3, 3r, ...).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_bench import ROOT, engine_overrides, write_bench_config  # noqa: E402

from alignvl_scale.runtime.distributed import free_port  # noqa: E402

# (what, substrings of a frame's function or file), checked from the innermost frame outwards.
CATEGORIES = [
    ("gradient norm", ("get_grad_norm_direct", "l2_norm_all_reduced", "scaled_global_norm", "clip_grad_norm")),
    ("gradient copies and flattening", ("copy_grads_in_partition", "flatten", "get_flat_partition",
                                        "_copy_to_ipg", "async_accumulate_grad_in_cpu", "copy_gradients_to_cpu")),
    ("communication (reduce, gather)", ("all_reduce", "reduce_scatter", "allreduce", "average_tensor",
                                         "reduce_ipg_grads", "all_gather", "broadcast", "barrier")),
    ("optimizer step", ("_optimizer_step", "adamw", "_single_tensor_adam", "_fused_adam", "_multi_tensor_adam",
                        "update_lp_params", "_post_step")),
    ("backward", ("backward", "run_backward")),
    ("forward", ("forward",)),
]


def categorize(stack: list[str]) -> str:
    for frame in reversed(stack):  # innermost first
        name = frame.split(" (")[0].lower()
        for what, needles in CATEGORIES:
            if any(n in name for n in needles):
                return what
    return "other"


def summarize(raw: Path) -> Counter:
    """py-spy's raw (collapsed) output -> samples per category, over the ranks' training loops
    (start-up, the first launch's imports and DeepSpeed's initialization left out)."""
    counts: Counter = Counter()
    for line in raw.read_text().splitlines():
        stack, _, samples = line.rpartition(" ")
        frames = stack.split(";")
        if not samples.isdigit() or "train_loop (alignvl_scale/training/trainer.py" not in stack:
            continue
        counts[categorize(frames)] += int(samples)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stage", default="2")
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--rate", type=int, default=50, help="py-spy samples per second")
    parser.add_argument("--out", type=Path, default=None, help="default: benchmarks/results/step_profile_<stage>.json")
    parser.add_argument("--raw", type=Path, default=None, help="keep py-spy's collapsed stacks here")
    args = parser.parse_args()
    out = args.out or Path(f"benchmarks/results/step_profile_{args.stage}.json")
    spy = shutil.which("py-spy")
    if spy is None:
        sys.exit("py-spy is not installed: pip install py-spy (or the .[bench] extra)")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = write_bench_config(tmp, real=True, batch=8, steps=args.steps)
        raw = tmp / "profile.txt"
        torchrun = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(args.world),
                    "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "launchers/train.py",
                    "--config", str(config), *engine_overrides(args.stage, tmp)]
        env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // args.world)),
               "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.run([spy, "record", "-r", str(args.rate), "-f", "raw", "--subprocesses", "-o", str(raw),
                               "--", *torchrun], cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
        counts = summarize(raw)
        if args.raw:
            shutil.copyfile(raw, args.raw)
    total = sum(counts.values())
    rows = [{"what": what, "samples": counts[what], "share": counts[what] / total}
            for what in [c for c, _ in CATEGORIES] + ["other"]]
    print(f"ZeRO-{args.stage}, {args.world} ranks, {args.steps} steps, {total} samples in the ranks' training loops")
    print(f"{'what':<34} {'share':>7}")
    for row in rows:
        print(f"{row['what']:<34} {row['share']:>7.1%}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
