"""Reliability diagrams: for each retrieval direction, the queries binned by the model's
top-1 confidence against the fraction of them it got right (metrics.ReliabilityBins; the
diagonal is perfect calibration, bars under it overconfidence), with the ECE in the title.

Written as NAME.json (the bins: count, mean confidence and accuracy per bin, and the ECE)
and NAME.png beside it when matplotlib is installed (the demo extra); without it, the JSON
alone and one line saying so.
"""

from __future__ import annotations

import json
from pathlib import Path

from alignvl_scale.evaluation.metrics import DIRECTIONS, ReliabilityBins
from alignvl_scale.runtime.log import say

DIRECTION_NAMES = {"i2t": "image -> text", "t2i": "text -> image"}


def bins_table(bins: ReliabilityBins) -> list[dict]:
    """Per bin: its confidence range, count, summed confidence and hits, and their means (None
    when empty)."""
    width = 1 / len(bins.counts)
    return [{"low": i * width, "high": (i + 1) * width, "count": n, "confidence_sum": c, "hits": h,
             "confidence": c / n if n else None, "accuracy": h / n if n else None}
            for i, (n, c, h) in enumerate(zip(bins.counts, bins.confidence_sums, bins.hits, strict=True))]


def write_reliability(folder: Path, name: str, bins: dict[str, ReliabilityBins], title: str) -> Path:
    """NAME.json and (matplotlib installed) NAME.png in `folder`: one panel per direction.
    Returns the JSON's path."""
    folder.mkdir(parents=True, exist_ok=True)
    data = {direction: {"ece_percent": 100 * b.ece(), "queries": sum(b.counts), "bins": bins_table(b)}
            for direction, b in bins.items()}
    path = folder / f"{name}.json"
    path.write_text(json.dumps({"title": title, **data}, indent=1))
    try:
        import matplotlib
    except ImportError:
        say(f"{path}: the reliability bins (pip install matplotlib, or the [demo] extra, for {name}.png)")
        return path
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    directions = [d for d in DIRECTIONS if d in data]
    fig, axes = plt.subplots(1, len(directions), figsize=(4.2 * len(directions), 4.2), squeeze=False)
    for ax, direction in zip(axes[0], directions, strict=True):
        table = data[direction]["bins"]
        filled = [b for b in table if b["count"]]
        width = table[0]["high"] - table[0]["low"]
        ax.bar([b["low"] for b in filled], [b["accuracy"] for b in filled], width=width, align="edge",
               edgecolor="black", color="#4c72b0", label="accuracy")
        ax.plot([b["confidence"] for b in filled], [b["confidence"] for b in filled], "o", color="#dd8452",
                markersize=4, label="mean confidence")
        ax.plot([0, 1], [0, 1], "--", color="gray", linewidth=1)
        ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="top-1 confidence", ylabel="fraction correct (R@1)",
               title=f"{DIRECTION_NAMES[direction]}: ECE {data[direction]['ece_percent']:.2f}% "
                     f"({data[direction]['queries']} queries)")
        ax.legend(loc="upper left", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(folder / f"{name}.png", dpi=110)
    plt.close(fig)
    return path


def read_bins(path: Path) -> dict[str, ReliabilityBins]:
    """The bins a `write_reliability` JSON holds, by direction."""
    data = json.loads(path.read_text())
    out = {}
    for direction in DIRECTIONS:
        if direction in data:
            table = data[direction]["bins"]
            out[direction] = ReliabilityBins([b["count"] for b in table], [b["confidence_sum"] for b in table],
                                             [b["hits"] for b in table])
    return out
