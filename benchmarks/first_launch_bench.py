"""DeepSpeed's CPU shared-memory op: what building it costs a launch, and what it buys training.

On CPU, DeepSpeed JIT-builds `deepspeed_shm_comm` when its communication backend starts
(deepspeed/comm/torch.py, build_shm_op) and uses it only in `inference_all_reduce`; the
trainer skips it (alignvl_scale/runtime/ds_ops.py). This measures both ways, each cell a real
2-rank torchrun training launch (cached features, the demo's adapters) into a fresh
TORCH_EXTENSIONS_DIR: the first launch (which builds the op when it is on), a second launch
(op already built), and steady-state samples/s of both launches. Cells alternate between
the two ways; run it on an otherwise idle machine.

    python benchmarks/first_launch_bench.py      # about 10 minutes here
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from alignvl_scale.data.synthetic import write_feature_shards
from alignvl_scale.runtime.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
WAYS = {"skip the op (ours)": "0", "build the op (DeepSpeed's default)": "1"}


def launch(config: Path, run_dir: Path, extensions: Path, build: str, steps: int) -> float:
    """Wall seconds of one 2-rank training launch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(extensions),
           "ALIGNVL_DS_SHM_COMM": build}
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "launchers/train.py"), "--config", str(config),
           f"run_dir={run_dir}", f"train.steps={steps}", "--overwrite"]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return time.perf_counter() - start


def steady_rate(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return statistics.median([r["perf/samples_per_s"] for r in rows if "perf/samples_per_s" in r][1:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/first_launch_bench.json"))
    args = parser.parse_args()
    cells: dict[str, dict[str, list[float]]] = {way: {"first": [], "second": [], "rate": []} for way in WAYS}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_feature_shards(tmp / "features", 64 * 16, dim=256, shards=16)
        config = tmp / "bench.yaml"
        config.write_text(yaml.safe_dump({
            "model": {"embed_dim": 128, "adapter": "mlp", "adapter_depth": 2, "noise_sigma": 0.01},
            "data": {"kind": "features", "train": [str(tmp / "features")], "batch_size": 32, "workers": 1},
            "train": {"steps": args.steps, "log_every": 20}, "engine": {"ds_config": "zero2"}}))
        for repeat in range(args.repeats):
            order = list(WAYS) if repeat % 2 == 0 else list(reversed(WAYS))
            for way in order:
                extensions, run_dir = tmp / f"ext{repeat}{WAYS[way]}", tmp / f"run{repeat}{WAYS[way]}"
                cells[way]["first"].append(launch(config, run_dir, extensions, WAYS[way], args.steps))
                cells[way]["rate"].append(steady_rate(run_dir))
                cells[way]["second"].append(launch(config, run_dir, extensions, WAYS[way], args.steps))
                cells[way]["rate"].append(steady_rate(run_dir))
    rows = [{"way": way, **{k: statistics.median(v) for k, v in c.items()}, "runs": c} for way, c in cells.items()]
    print(f"{'':<36} {'first launch s':>15} {'second launch s':>16} {'samples/s':>10}")
    for r in rows:
        print(f"{r['way']:<36} {r['first']:>15.1f} {r['second']:>16.1f} {r['rate']:>10.1f}")
    base, other = rows
    print(f"building costs the first launch {other['first'] - base['first']:+.1f} s; steady samples/s ratio "
          f"(build / skip) {other['rate'] / base['rate']:.3f} (medians of {args.repeats} launches, "
          f"{2 * args.repeats} for samples/s; 2 ranks, "
          f"{args.steps} steps)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
