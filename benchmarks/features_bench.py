"""Cached-feature training vs end-to-end training, and against this machine's matmul rate.

- cached features: the demo head (MLP adapters on EfficientNet-Lite0 1280-d and MiniLM
  384-d features) trained by the real trainer on synthetic feature shards at a global
  batch of --batch (chunked loss), one process;
- end to end: the same head behind the frozen EfficientNet-Lite0 + MiniLM towers on
  rendered emoji images (the demo data), batch --e2e-batch;
- the possible: fp32 matmul GFLOP/s measured here, and the FLOPs per sample the trainer
  counts (perf/tflop_per_step_per_rank: adapters forward and backward, and the fused
  loss's tiles, recomputation included), so the table says what fraction of the
  machine's matmul rate the cached-feature path reaches.

    python benchmarks/features_bench.py        # about 5 minutes here
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from alignvl_scale.config import PROJECT_ROOT
from alignvl_scale.data.samples import FEATURE_IMAGE, FEATURE_TEXT, encode_npy
from alignvl_scale.data.shards import sample_members, write_shards
from alignvl_scale.runtime.perf import cpu_matmul_tflops
from alignvl_scale.studies.benchmarks import DEMO_CONFIG
from alignvl_scale.studies.emoji import build_demo_data


def synthetic_features(folder: Path, n: int, image_dim: int, text_dim: int) -> None:
    rng = np.random.default_rng(0)
    samples = (sample_members(f"{i:07d}", **{FEATURE_IMAGE: encode_npy(rng.normal(size=image_dim).astype(np.float16)),
                                             FEATURE_TEXT: encode_npy(rng.normal(size=text_dim).astype(np.float16))})
               for i in range(n))
    write_shards(samples, folder, n // 8, kind="features", progress=False,
                 extra={"image_dim": image_dim, "text_dim": text_dim})


def train_rate(config: Path, overrides: list[str], run_dir: Path) -> tuple[float, float]:
    """Median samples/s and FLOPs per sample (the trainer's own count) after start-up."""
    cmd = [sys.executable, "-m", "alignvl_scale.cli", "train", "--config", str(config), *overrides,
           f"run_dir={run_dir}", "eval.data=[]", "eval.every=0"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=PROJECT_ROOT,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in rows if "perf/samples_per_s" in r][1:]  # after start-up
    batch = windows[0]["train/contrastive_batch"]
    return (statistics.median(r["perf/samples_per_s"] for r in windows),
            windows[0]["perf/tflop_per_step_per_rank"] * 1e12 / batch)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--e2e-batch", type=int, default=64)
    parser.add_argument("--e2e-steps", type=int, default=8)
    parser.add_argument("--demo-data", type=Path, default=Path("runs/demo/shards"))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/features_bench.json"))
    args = parser.parse_args()
    image_dim, text_dim = 1280, 384
    peak = cpu_matmul_tflops() * 1e3  # GFLOP/s
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        synthetic_features(tmp / "features", args.batch * 3, image_dim, text_dim)
        cached, flops = train_rate(DEMO_CONFIG, [f"data.train=[{tmp / 'features'}]", f"data.batch_size={args.batch}",
                                          "train.epochs=null", f"train.steps={args.steps}", "train.log_every=2",
                                          "loss.chunk_size=4096", "data.workers=2"], tmp / "cached")
        build_demo_data(args.demo_data)
        e2e, _ = train_rate(DEMO_CONFIG, [f"data.train=[{args.demo_data / 'train'}]", "data.kind=image-text",
                                       f"data.batch_size={args.e2e_batch}", "train.epochs=null",
                                       f"train.steps={args.e2e_steps}", "train.log_every=2", "data.workers=1"],
                         tmp / "e2e")
    achieved = cached * flops / 1e9
    print(f"{'path':<34} {'batch':>6} {'samples/s':>10}")
    print(f"{'cached features (adapters + loss)':<34} {args.batch:>6} {cached:>10.1f}")
    print(f"{'end to end (frozen towers)':<34} {args.e2e_batch:>6} {e2e:>10.1f}")
    print(f"cached / end to end = {cached / e2e:.0f}x")
    print(f"matmul rate here: {peak:.0f} GFLOP/s; cached path: {flops / 1e6:.0f} MFLOP/sample -> {achieved:.0f} "
          f"GFLOP/s = {achieved / peak:.0%} of it")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"cached_samples_per_s": cached, "e2e_samples_per_s": e2e,
                                    "matmul_gflops": peak, "flops_per_sample": flops,
                                    "fraction_of_matmul_rate": achieved / peak, "args": vars(args)},
                                   indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
