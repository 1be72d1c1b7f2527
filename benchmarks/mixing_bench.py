"""How well the training reader mixes shards into a global batch: the fraction of sample
pairs in each global micro-batch (what the contrastive loss sees together) that come from
the same shard, over one epoch, for several numbers of ranks. An i.i.d. shuffle of S equal
shards gives about 1/S.

    python benchmarks/mixing_bench.py                      # this tree
    python benchmarks/mixing_bench.py --compare-tree DIR --compare-name "before data streams"
                                            # and a checkout of an older version, side by side

Only what every version has is used (DataConfig, TrainStream, tiny PNG shards); a version
without data streams reads its per-rank, per-worker layout. data.streams is left at its
default unless --streams is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def same_shard_fraction(folder: Path, world: int, per_rank: int, workers: int, per_shard: int,
                        streams: int | None) -> tuple[float, int, int | None]:
    """(same-shard pairs / pairs over the epoch's global micro-batches, micro-batches, streams used)."""
    from alignvl_scale.config import DataConfig
    from alignvl_scale.data.reader import ImageTextDecoder, TrainStream
    from alignvl_scale.data.samples import DecodeLimits
    from alignvl_scale.data.transforms import ImageTransform

    cfg = DataConfig(train=[str(folder)], batch_size=per_rank, workers=workers, shuffle_window=per_shard)
    if streams is not None:
        cfg = dataclasses.replace(cfg, streams=streams)
    ranks = [TrainStream(cfg, ImageTextDecoder(DecodeLimits(), ImageTransform(8, [0.5] * 3, [0.5] * 3)), r, world, 0)
             for r in range(world)]
    per_rank_batches = [[[int(c.split()[1]) // per_shard for c in b["captions"]] for b in stream] for stream in ranks]
    same = pairs = 0
    for step in range(min(map(len, per_rank_batches))):
        shards = [s for rank in per_rank_batches for s in rank[step]]
        for a, b in itertools.combinations(shards, 2):
            same += a == b
            pairs += 1
    return same / pairs, min(map(len, per_rank_batches)), getattr(ranks[0], "streams", None)


def measure(args) -> list[dict]:
    from alignvl_scale.data.synthetic import write_image_shards

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "shards"
        write_image_shards(folder, [args.per_shard] * args.shards)
        for world in args.worlds:
            fraction, steps, streams = same_shard_fraction(folder, world, args.global_batch // world, args.workers,
                                                           args.per_shard, args.streams)
            rows.append({"world": world, "same_shard_pairs": fraction, "micro_batches": steps, "streams": streams})
    return rows


def measured_in(tree: Path, script: str, argv: list[str]) -> object:
    """What `script --json-only ARGV` measures with another checkout's package (`tree`): the JSON
    of its last line. The script itself is this tree's, so it may use only what both have."""
    env = {**os.environ, "PYTHONPATH": str(tree.resolve())}
    out = subprocess.run([sys.executable, script, "--json-only", *argv], env=env, capture_output=True, text=True,
                         check=True, cwd=tree)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=64)
    parser.add_argument("--per-shard", type=int, default=32)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--streams", type=int, default=None)
    parser.add_argument("--compare-tree", type=Path, default=None, help="a checkout of another version")
    parser.add_argument("--compare-name", default=None, help="its name in the table (default: its path)")
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/mixing_bench.json"))
    args = parser.parse_args()
    if args.json_only:
        print(json.dumps(measure(args)))
        return
    results = {"this tree": measure(args)}
    if args.compare_tree is not None:
        results[args.compare_name or str(args.compare_tree)] = measured_in(
            args.compare_tree, __file__, ["--shards", str(args.shards), "--per-shard", str(args.per_shard),
                                          "--global-batch", str(args.global_batch), "--workers", str(args.workers),
                                          "--worlds", *map(str, args.worlds)])
    iid = 1 / args.shards
    print(f"{args.shards} shards x {args.per_shard}, global micro-batch {args.global_batch}, {args.workers} workers "
          f"per rank; an i.i.d. shuffle: {iid:.3f}")
    print(f"{'reader':<28} {'ranks':>5} {'streams':>7} {'same-shard pairs':>17} {'micro-batches':>13}")
    for name, rows in results.items():
        for row in rows:
            print(f"{name:<28} {row['world']:>5} {row['streams'] or '-':>7} {row['same_shard_pairs']:>17.3f} "
                  f"{row['micro_batches']:>13}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "iid": iid, "args": vars(args)}, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
