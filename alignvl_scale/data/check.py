"""`alignvl-scale data check`: every shard through the training decoder, counted."""

from __future__ import annotations

import json
import random
from pathlib import Path

from alignvl_scale.data.reader import FeatureDecoder, ImageTextDecoder, shard_examples
from alignvl_scale.data.samples import SKIP_REASONS, DecodeLimits, SkipCounts
from alignvl_scale.data.shards import resolve_spec


def check_shards(specs: list[str], kind: str = "image-text", limits: DecodeLimits | None = None,
                 samples_per_shard: int | None = None, bad: list | None = None) -> dict[str, SkipCounts]:
    """Counts per shard url, decoding exactly as training does (transforms aside); with a
    `bad` list, (shard url, sample key, reason and detail) of every skipped sample too."""
    limits = limits or DecodeLimits()
    decode = FeatureDecoder(limits=limits) if kind == "features" else ImageTextDecoder(limits)
    report = {}
    for spec in specs:
        for shard in resolve_spec(spec, samples_per_shard):
            counts = SkipCounts()
            # window 1: file order; the check needs no shuffling
            for _, example, raw in shard_examples(shard.url, decode, 1, random.Random(0), expected=shard.samples):
                if not counts.record(example, raw.unsafe) and bad is not None:
                    bad.append((shard.url, example.key, str(example)))
            counts.skipped = +counts.skipped  # drop zero entries
            report[shard.url] = counts
    return report


def print_report(report: dict[str, SkipCounts], json_path: str | None = None) -> SkipCounts:
    total = SkipCounts()
    reasons = [r for r in SKIP_REASONS if any(c.skipped.get(r) for c in report.values())]
    width = max([len(u) for u in report] + [5])
    print(f"{'shard':<{width}} {'good':>8} {'skipped':>8} {'unsafe':>6}" + "".join(f" {r}" for r in reasons))
    for url, counts in [*report.items(), ("total", total)]:
        if url != "total":
            total.add(counts)
        print(f"{url:<{width}} {counts.good:>8} {counts.total - counts.good:>8} {counts.unsafe_members:>6}"
              + "".join(f" {counts.skipped.get(r, 0):>{len(r)}}" for r in reasons))
    print(f"skip fraction {total.skip_fraction:.2%}")
    if json_path:
        Path(json_path).write_text(json.dumps({"shards": {u: c.as_dict() for u, c in report.items()},
                                               "total": total.as_dict(),
                                               "skip_fraction": total.skip_fraction}, indent=1))
    return total
