"""Where one cached-feature ablation run's time goes, launched the old way and the new way.

    python benchmarks/ablation_bench.py --data-dir runs/demo [--epochs 10] [--repeats 3]

Each repeat times (in alternating order):
- separate, unfused AdamW: one `train.main` in a fresh process, with the optimizer as it
  was before (torch's per-tensor AdamW), as `ablate` launched every run before;
- separate: the same with the fused AdamW the trainer now uses;
- in-process: the second and third run of one worker process (`ablate`'s default now: the
  interpreter, imports, DeepSpeed's checks and the process group paid once per worker).
A run's time is split into start-up (process start and imports: the fresh process's wall
time minus what its run measured inside), engine (Trainer(): model, DeepSpeed engine,
data stream), training (the epochs), checkpoint and evaluation. The runs are the demo's
config (configs/demo.yaml) on the benchmark's features, 1 process, one thread.
Prints a table of medians and writes benchmarks/results/ablation_bench.json.
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

ROOT = Path(__file__).resolve().parents[1]
PHASES = ("startup", "engine", "training", "checkpoint", "evaluation")


def child(args: argparse.Namespace) -> None:
    """In a fresh process: `args.runs` runs back to back, each's phases as one JSON line."""
    started = time.perf_counter()
    import torch

    from alignvl_scale.studies.benchmarks import DEMO_CONFIG, demo_overrides
    from alignvl_scale.training import main as train

    if args.unfused:  # the optimizer before: AdamW's default per-tensor loop on CPU
        class UnfusedAdamW(torch.optim.AdamW):
            def __init__(self, *a, fused=None, **kw):
                super().__init__(*a, **kw)

        torch.optim.AdamW = UnfusedAdamW
    phases: dict[str, float] = {}

    def timed(name: str, method):
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return method(*a, **kw)
            finally:
                phases[name] = phases.get(name, 0.0) + time.perf_counter() - start
        return wrapper

    for name, method in (("engine", "__init__"), ("training", "train_loop"), ("checkpoint", "save"),
                         ("evaluation", "evaluate")):
        setattr(train.Trainer, method, timed(name, getattr(train.Trainer, method)))
    before_first_run = time.perf_counter() - started
    for run in range(args.runs):
        phases.clear()
        start = time.perf_counter()
        train.main(["--config", str(DEMO_CONFIG), *demo_overrides(Path(args.data_dir)), f"seed={run}",
                    f"run_dir={args.out}/run{run}", f"train.epochs={args.epochs}", "train.steps=null",
                    "eval.every=0", "train.log_every=1000000", "--overwrite"], keep_process_group=True)
        print(json.dumps({"run": run, "wall": time.perf_counter() - start, "imports": before_first_run, **phases}),
              flush=True)


def launch(args: argparse.Namespace, mode: str, out: Path) -> list[dict]:
    """A fresh process running 1 run (separate) or 3 (in-process); its runs' phase records."""
    cmd = [sys.executable, __file__, "--child", "--data-dir", str(args.data_dir), "--epochs", str(args.epochs),
           "--out", str(out), "--runs", "3" if mode == "in-process" else "1",
           *(["--unfused"] if mode == "separate, unfused AdamW" else [])]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{mode} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    runs = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    if mode != "in-process":
        runs[0]["startup"] = wall - runs[0]["wall"]  # interpreter, imports, exit: what a separate launch adds
        return runs
    for run in runs[1:]:
        run["startup"] = 0.0
    return runs[1:]  # the runs after a worker's first: what every later cell costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=ROOT / "runs" / "demo",
                        help="a benchmark folder with features/ (alignvl-scale demo makes one)")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("/tmp/ablation_bench"))
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "ablation_bench.json")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--runs", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--unfused", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    modes = ["separate, unfused AdamW", "separate", "in-process"]
    records: dict[str, list[dict]] = {m: [] for m in modes}
    for repeat in range(args.repeats):
        for mode in modes if repeat % 2 == 0 else modes[::-1]:  # alternate the order against drift
            records[mode] += launch(args, mode, args.out / mode.replace(" ", "_").replace(",", ""))
            print(f"repeat {repeat}: {mode} done", file=sys.stderr, flush=True)
    table = {m: {p: statistics.median(r.get(p, 0.0) for r in rs) for p in (*PHASES, "wall")}
             for m, rs in records.items()}
    for row in table.values():
        row["total"] = row["wall"] + row["startup"]
    base = table[modes[0]]["total"]
    print(f"\nOne cached-feature run ({args.epochs} epochs, demo config, 1 thread), medians of {args.repeats}; "
          "seconds:")
    print(f"{'launch':<26}" + "".join(f"{p:>12}" for p in (*PHASES, "total")) + f"{'vs before':>11}")
    for mode, row in table.items():
        print(f"{mode:<26}" + "".join(f"{row[p]:>12.2f}" for p in (*PHASES, "total"))
              + f"{row['total'] / base:>10.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"epochs": args.epochs, "repeats": args.repeats, "data_dir": str(args.data_dir),
                                     "medians_s": table, "records": records}, indent=1))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
