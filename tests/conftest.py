import io
import os
import sys
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))  # tests/distributed.py for spawned ranks
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def png_bytes(seed: int, size: int = 8) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def write_image_shards(folder: Path, sizes: list[int], captions_per_sample: int = 1, start: int = 0) -> list[str]:
    """Shards of tiny PNGs, caption 'caption {i}' (plus ' alt {k}' variants), sizes[s]
    samples in shard s; returns the first caption of every sample."""
    import webdataset as wds

    from alignvl_scale.data.shards import MANIFEST_FORMAT, SHARD_PATTERN, sample_members, write_json_atomic

    folder.mkdir(parents=True, exist_ok=True)
    index, firsts, shards = start, [], []
    for s, size in enumerate(sizes):
        name = SHARD_PATTERN.format(s)
        with wds.TarWriter(str(folder / name), encoder=False) as writer:
            for _ in range(size):
                captions = [f"caption {index}"] + [f"caption {index} alt {k}" for k in range(1, captions_per_sample)]
                writer.write(sample_members(f"{index:06d}", png_bytes(index), "png", captions))
                firsts.append(captions[0])
                index += 1
        shards.append({"name": name, "samples": size})
    write_json_atomic(folder / "manifest.json", {"format": MANIFEST_FORMAT, "kind": "image-text",
                                                 "shards": shards, "samples": index - start})
    return firsts

