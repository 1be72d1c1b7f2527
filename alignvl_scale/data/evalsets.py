"""Retrieval eval sets (images with one or more captions) and rank-sharded encoding.

A set comes from shards (a folder, manifest or brace list, as for training) or from a JSONL
file whose lines are {"image": "relative/path.png", "captions": ["...", ...]}. Bad samples
are skipped and counted, as in training. Feature shards give pre-extracted features.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from alignvl_scale.data.samples import (
    DecodeLimits,
    SkipCounts,
    SkipSample,
    clean_captions,
    decode_captions,
    decode_features,
    decode_image,
    image_member,
    raw_samples,
    read_image_file,
)
from alignvl_scale.data.shards import DataSourceError, iter_caption_rows, manifest_of, resolve_spec


@dataclass
class RetrievalSet:
    """images[i] is raw image bytes (image-text sets) or a feature vector (feature sets);
    texts[t] is a caption string or a feature vector; caption_to_image[t] its image."""

    images: list = field(default_factory=list)
    texts: list = field(default_factory=list)
    caption_to_image: list[int] = field(default_factory=list)
    kind: str = "image-text"
    counts: SkipCounts = field(default_factory=SkipCounts)

    def add(self, image: object, texts: list) -> None:
        self.caption_to_image.extend([len(self.images)] * len(texts))
        self.images.append(image)
        self.texts.extend(texts)
        self.counts.good += 1


def _from_jsonl(path: Path, limits: DecodeLimits, allow_outside: bool) -> RetrievalSet:
    out = RetrievalSet()
    for row, where in iter_caption_rows(path):
        try:
            if not isinstance(row.get("image"), str):
                raise SkipSample("missing_image", where)
            _, data = read_image_file(path.parent / row["image"], path.parent, limits, allow_outside)
            out.add(data, clean_captions(row.get("captions", row.get("caption")), limits))
        except SkipSample as skip:
            out.counts.record(skip)
    return out


def _from_shards(spec: str, limits: DecodeLimits) -> RetrievalSet:
    manifest = manifest_of(spec) or {}
    out = RetrievalSet(kind=manifest.get("kind", "image-text"))
    for shard in resolve_spec(spec):
        for raw in raw_samples(shard.url, limits.max_member_bytes):
            try:
                if out.kind == "features":
                    image, text = decode_features(raw.check())
                    out.add(image.astype(np.float32), list(np.atleast_2d(text).astype(np.float32)))
                else:
                    captions, _ = decode_captions(raw.check(), limits)
                    decode_image(raw.members, limits)  # checked now, decoded again when encoded
                    out.add(image_member(raw.members)[1], captions)
            except SkipSample as skip:
                out.counts.record(skip)
            out.counts.unsafe_members += raw.unsafe
    return out


def load_retrieval_set(spec: str, limits: DecodeLimits | None = None, allow_outside: bool = False) -> RetrievalSet:
    """An eval set from a `.jsonl` file or from shards; raises if nothing usable is left.
    A JSONL set's images must lie inside its folder unless `allow_outside`."""
    limits = limits or DecodeLimits()
    path = Path(spec)
    if path.suffix.lower() == ".jsonl":
        if not path.is_file():
            raise DataSourceError(f"{spec}: eval JSONL not found")
        out = _from_jsonl(path, limits, allow_outside)
    else:
        out = _from_shards(spec, limits)
    if not out.images:
        raise DataSourceError(f"{spec}: no usable eval samples (skipped: {dict(out.counts.skipped)})")
    return out
