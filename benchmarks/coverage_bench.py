"""How much of an epoch the training reader trains: the share of samples an epoch never
reaches, and how many it trains twice (padding), for uneven shard sets on 1, 2 and 3 ranks
with the default and explicit data.streams, over 3 epochs. Issue 41's sets: 7 shards of
64/63/64/49/64/10/64 samples (img2dataset's short last shard, a small one), and 13 shards of
3-40 samples with a shard of 3, and with an empty one too (which a version may refuse).

    python benchmarks/coverage_bench.py                        # this tree
    python benchmarks/coverage_bench.py --compare-tree DIR --compare-name "whole-shard streams"

Only what every version since data streams has is used (DataConfig, TrainStream, tiny PNG
shards). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from collections import Counter
from pathlib import Path

from mixing_bench import measured_in

THIRTEEN = [40, 3, 27, 38, 19, 35, 31, 22, 40, 32, 6, 35, 39]  # 3-40 samples, 367
SETS = {"7 shards (378)": [64, 63, 64, 49, 64, 10, 64], "13 shards (367)": THIRTEEN,
        "15: +3, +empty": THIRTEEN + [3, 0]}
LAYOUTS = [(1, None), (2, None), (3, None), (1, 6), (2, 6), (3, 6), (3, 3)]  # (ranks, data.streams)


def epoch_coverage(folder: Path, total: int, world: int, streams: int | None, global_batch: int, epochs: int) -> dict:
    from alignvl_scale.config import DataConfig
    from alignvl_scale.data.reader import ImageTextDecoder, TrainStream
    from alignvl_scale.data.samples import DecodeLimits
    from alignvl_scale.data.transforms import ImageTransform

    cfg = DataConfig(train=[str(folder)], batch_size=global_batch // world, workers=0, shuffle_window=8)
    cfg = dataclasses.replace(cfg, streams=streams)
    decode = ImageTextDecoder(DecodeLimits(), ImageTransform(8, [0.5] * 3, [0.5] * 3))
    ranks = [TrainStream(cfg, decode, r, world, 0) for r in range(world)]
    unseen, twice = [], []
    for _ in range(epochs):
        per_rank = [[c for batch in stream for c in batch["captions"]] for stream in ranks]
        seen = Counter(c for rank in per_rank for c in rank)
        unseen.append(1 - len(seen) / total)
        twice.append(sum(n - 1 for n in seen.values()))
        for stream in ranks:
            stream.next_epoch()
    return {"ranks": world, "streams": ranks[0].state.streams, "samples": total, "unseen": unseen, "twice": twice}


def measure(args) -> dict:
    from alignvl_scale.data.synthetic import write_image_shards

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, sizes in SETS.items():
            folder = Path(tmp) / name.split()[0]
            write_image_shards(folder, sizes)
            rows = []
            for world, streams in LAYOUTS:
                try:
                    rows.append(epoch_coverage(folder, sum(sizes), world, streams, args.global_batch, args.epochs))
                except Exception as exc:  # noqa: BLE001 - a version refuses the layout (or an empty shard)
                    rows.append({"ranks": world, "streams": streams, "error": str(exc)[:80]})
            results[name] = rows
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--global-batch", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--compare-tree", type=Path, default=None, help="a checkout of another version")
    parser.add_argument("--compare-name", default=None, help="its name in the table (default: its path)")
    parser.add_argument("--json-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/coverage_bench.json"))
    args = parser.parse_args()
    if args.json_only:
        print(json.dumps(measure(args)))
        return
    results = {"this tree": measure(args)}
    if args.compare_tree is not None:
        results[args.compare_name or str(args.compare_tree)] = measured_in(
            args.compare_tree, __file__, ["--global-batch", str(args.global_batch), "--epochs", str(args.epochs)])
    print(f"global micro-batch {args.global_batch}, {args.epochs} epochs; unseen: samples an epoch never trains "
          f"(each epoch's), twice: trained twice in it (padding)")
    print(f"{'reader':<22} {'shards':<16} {'ranks':>5} {'streams':>7} {'unseen per epoch':>22} {'twice':>12}")
    for reader, sets in results.items():
        for name, rows in sets.items():
            for row in rows:
                if "error" in row:
                    print(f"{reader:<22} {name:<16} {row['ranks']:>5} {row['streams'] or '-':>7}  refused: "
                          f"{row['error']}")
                    continue
                unseen = " ".join(f"{u:5.1%}" for u in row["unseen"])
                twice = " ".join(str(t) for t in row["twice"])
                print(f"{reader:<22} {name:<16} {row['ranks']:>5} {row['streams']:>7} {unseen:>22} {twice:>12}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"results": results, "args": vars(args)}, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
