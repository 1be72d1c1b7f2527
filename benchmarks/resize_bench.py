"""What a resize keeps, step by step: the cluster tests' cached-feature run (noise, dropout,
permutation mixup, a decaying learning rate, 6 data streams, global batch 12, 24 steps) trained
uninterrupted on 2 ranks under ZeRO-2, on 3 under ZeRO-3 and on 2 under ZeRO-0 from scratch,
and resumed from their step-7 checkpoints on other worlds and stages; per run, the largest and
the median relative difference of each later step's loss from the 2-rank run's, and whether
every step's sample keys (log.sample_keys) are the same.

    python benchmarks/resize_bench.py       # 9 short torchrun launches, about 4 minutes here
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import GLOBAL_BATCH, cluster_config, logged, resumable_copy, run, sample_keys, torchrun  # noqa: E402

from alignvl_scale.data.synthetic import write_feature_shards  # noqa: E402

FROM_SCRATCH = (("two_zero2", 2, 2), ("three_zero3", 3, 3), ("two_zero0", 2, 0))
RESUMES = (("2 -> 3 ranks, ZeRO-2 -> 3", "two_zero2", 3, 3), ("3 -> 2 ranks, ZeRO-3 -> 2", "three_zero3", 2, 2),
           ("2 -> 1 rank, ZeRO-0", "two_zero0", 1, 0), ("3 -> 1 rank, ZeRO-3 -> 1", "three_zero3", 1, 1))


def compare(run_dir: Path, reference: Path, after: int) -> dict:
    got, want = logged(run_dir, "train/loss"), logged(reference, "train/loss")
    keys, want_keys = sample_keys(run_dir), sample_keys(reference)
    steps = [s for s in sorted(got) if s > after]
    rel = [abs(got[s] / want[s] - 1) for s in steps]
    return {"steps": [steps[0], steps[-1]], "max_rel_diff": max(rel), "median_rel_diff": statistics.median(rel),
            "same_sample_keys": all(keys[s] == want_keys[s] for s in steps)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/resize_bench.json"))
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        write_feature_shards(root / "features", GLOBAL_BATCH * 16, shards=12)
        runs = {}
        for name, ranks, stage in FROM_SCRATCH:
            config, runs[name] = cluster_config(root, root / "features", name, checkpoint={"every": 7, "keep": 4})
            run(torchrun(config, ranks, stage), runs[name])
        reference = runs["two_zero2"]
        rows["3 ranks, ZeRO-3, from scratch"] = compare(runs["three_zero3"], reference, 0)
        rows["2 ranks, ZeRO-0, from scratch"] = compare(runs["two_zero0"], reference, 0)
        for label, source, ranks, stage in RESUMES:
            config, run_dir = cluster_config(root, root / "features", f"resumed_{source}_{ranks}")
            resumable_copy(runs[source], 7, run_dir)
            run(torchrun(config, ranks, stage, "--resume", "latest"), run_dir)
            rows[label] = compare(run_dir, reference, 7)
    print("against 2 ranks under ZeRO-2, uninterrupted:")
    print(f"{'run':<32} {'steps':>6} {'max rel diff':>13} {'median':>9}  same sample keys")
    for label, row in rows.items():
        print(f"{label:<32} {row['steps'][0]:>2}-{row['steps'][1]:<3} {row['max_rel_diff']:>13.2e} "
              f"{row['median_rel_diff']:>9.2e}  {row['same_sample_keys']}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(rows, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
