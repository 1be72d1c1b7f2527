"""The Openclipart benchmark: public-domain clip art with human titles, from Debian.

Source: Debian's `openclipart-svg` (8,121 SVG files, 663 of them links to others, in 22
categories, public domain). Each SVG's RDF metadata holds a human title (`dc:title`) and
keyword tags (`dc:subject`). Rendering: `rsvg-convert` (Debian's `librsvg2-bin`), one
process per file with a time limit, so that a pathological file costs a counted skip, never
a hang or a crash of the builder; it draws no network resource. (cairosvg, from PyPI, took
1.6x as long on a sample here and failed 1 file in 40 that librsvg draws.)

Captions: the title, normalized (lower case, letters only: "Pink-Rose" -> "pink rose",
"guitar1" -> "guitar"), and, where the image has informative tags, the tags as a second
caption ("flag, sign, oceania"), so that evaluation is multi-caption as on COCO.

What is left out, counted by reason (`SKIP_REASONS`), and why:
- a link to another file (the file itself is read once);
- metadata that does not parse, or no title;
- a collection title: a title on more than MAX_TITLE_IMAGES images names a collection
  ("gramastar" on 1,375 stars, "Part of the Flat Icon Collection" on 884 icons), and a
  caption that many images share cannot say which one is meant;
- a file rsvg-convert fails on (or exceeds the time limit), or one it draws as one flat color;
- an image whose pixels equal an earlier file's (a duplicate).

The split (`split`): an image is held out only if its title is its own (no other image has
that title, or uses it as a tags caption) and a hash of the title falls under
TEST_FRACTION; images that share a title stay in training together. A held-out image keeps
its tags caption only where no other image has the same one. So no held-out caption
occurs in training, and no two held-out images share a caption (a shared one would tie,
and ties count against the model: metrics.py).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from alignvl_scale.config import UserError
from alignvl_scale.data.shards import sample_members, write_shards
from alignvl_scale.evaluation.zeroshot import write_zero_shot_set
from alignvl_scale.runtime.log import progress

SVG_ROOT = Path("/usr/share/openclipart/svg")
INSTALL = "apt-get install openclipart-svg librsvg2-bin  (Debian/Ubuntu; the SVGs land in /usr/share/openclipart/svg)"
IMAGE_PX = 224  # the image towers' input size: rendered once at the size they read
MAX_TITLE_IMAGES = 10
TEST_FRACTION = 0.72  # of the images with a title of their own: 1,571 of the package held out
RENDER_TIMEOUT_S = 30
MIN_ZERO_SHOT_IMAGES = 5  # a category with fewer held-out images is no zero-shot class
NOT_CLASSES = {"unsorted", "special"}  # categories that say nothing about the picture
# Tags that describe the file, the collection or nothing, not the picture.
GENERIC_TAGS = {"hash", "unsorted", "special", "magick", "theme", "icons", "icon", "clip art", "clipart", "svg",
                "image", "media", "public domain", "externalsource", "lemon theme icon", "mapsym", "stock"}
MAX_TAGS = 6
SKIP_REASONS = ("link", "unreadable_metadata", "no_title", "collection_title", "does_not_render", "blank_render",
                "duplicate_image")
ZERO_SHOT_TASK = "category"
ZERO_SHOT_TASKS = (ZERO_SHOT_TASK,)
UNIT = "images"
ZERO_SHOT_TEMPLATES = ("a clip art of {}.", "an illustration of {}.")

_DC, _RDF, _CC = ("{http://purl.org/dc/elements/1.1/}", "{http://www.w3.org/1999/02/22-rdf-syntax-ns#}",
                  "{http://web.resource.org/cc/}")


class OpenclipartMissing(UserError):
    """The package or the renderer is not installed; the message says how to install it (one
    line from the command line, exit code 2)."""


def normalize(text: str) -> str:
    """A caption's comparable form: "Clipart by Nicu Buculei - Pink-Rose 2" -> "pink rose"."""
    text = re.sub(r"^\s*clip\s*art by [^-]*-\s*", "", text, flags=re.IGNORECASE)
    return " ".join("".join(c if c.isalpha() else " " for c in text.lower()).split())


def read_metadata(path: Path) -> tuple[str, list[str], str]:
    """(title, tags, creator) from the SVG's RDF metadata ("" where absent). ElementTree
    resolves no external entity, and its expat bounds entity expansion."""
    work = ET.parse(path).getroot().find(f".//{_CC}Work")
    if work is None:
        return "", [], ""
    title = (work.findtext(f"{_DC}title") or "").strip()
    tags = [(li.text or "").strip() for li in work.findall(f"{_DC}subject/{_RDF}Bag/{_RDF}li")]
    creator = (work.findtext(f"{_DC}creator/{_CC}Agent/{_DC}title") or "").strip()
    return title, tags, creator


def tags_caption(tags: list[str], title: str, creator: str) -> str:
    """The informative tags, normalized, in order, at most MAX_TAGS, as one caption ("" if none)."""
    drop = GENERIC_TAGS | {normalize(creator), title}
    kept = list(dict.fromkeys(t for t in map(normalize, tags) if t and t not in drop))[:MAX_TAGS]
    caption = ", ".join(kept)
    return "" if normalize(caption) == title else caption


class NotRendered(Exception):
    """A file that gives no picture; args[0] is its SKIP_REASONS entry."""


def render(path: Path, size: int = IMAGE_PX, timeout_s: float = RENDER_TIMEOUT_S) -> bytes:
    """SVG -> PNG bytes, the drawing fit into a white size x size square. NotRendered
    ("does_not_render") when rsvg-convert fails or runs out of time, ("blank_render") when it
    draws one flat color."""
    try:
        proc = subprocess.run(["rsvg-convert", "--width", str(size), "--height", str(size), "--keep-aspect-ratio",
                               "--background-color", "white", str(path)], capture_output=True, timeout=timeout_s)
        drawing = Image.open(io.BytesIO(proc.stdout)).convert("RGB") if proc.returncode == 0 else None
    except (subprocess.TimeoutExpired, OSError):
        drawing = None
    if drawing is None:
        raise NotRendered("does_not_render")
    canvas = Image.new("RGB", (size, size), "white")
    canvas.paste(drawing, ((size - drawing.width) // 2, (size - drawing.height) // 2))
    if all(low == high for low, high in canvas.getextrema()):
        raise NotRendered("blank_render")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


def _render_or_reason(path: Path) -> bytes | str:
    try:
        return render(path)
    except NotRendered as exc:
        return exc.args[0]


@dataclass
class Clip:
    path: str  # relative to the SVG root
    category: str  # its top folder: "animals", "signs_and_symbols", ...
    title: str  # normalized
    tags: str  # normalized tags caption, or ""
    png: bytes = b""

    @property
    def key(self) -> str:
        return re.sub(r"[^A-Za-z0-9_-]", "_", self.path.removesuffix(".svg"))


def collect(root: Path, skipped: Counter) -> list[Clip]:
    """Every SVG under root with a title that is not a collection's, in path order."""
    clips = []
    for path in sorted(root.rglob("*.svg")):
        if path.is_symlink():
            skipped["link"] += 1
            continue
        try:
            title, tags, creator = read_metadata(path)
        except (ET.ParseError, OSError, UnicodeDecodeError):
            skipped["unreadable_metadata"] += 1
            continue
        title = normalize(title)
        if not title:
            skipped["no_title"] += 1
            continue
        relative = path.relative_to(root).as_posix()
        clips.append(Clip(relative, relative.split("/")[0], title, tags_caption(tags, title, creator)))
    per_title = Counter(c.title for c in clips)
    skipped["collection_title"] += sum(n for n in per_title.values() if n > MAX_TITLE_IMAGES)
    return [c for c in clips if per_title[c.title] <= MAX_TITLE_IMAGES]


def render_all(clips: list[Clip], root: Path, skipped: Counter, workers: int | None = None) -> list[Clip]:
    """Render every clip (rsvg-convert processes in parallel); drop those that do not render
    and pixel-for-pixel duplicates of an earlier clip."""
    with ThreadPoolExecutor(workers or os.cpu_count() or 1) as pool, \
            progress(len(clips), "render Openclipart SVGs", "svg") as bar:
        pngs = list(bar.update(1) or png for png in pool.map(lambda c: _render_or_reason(root / c.path), clips))
    kept, seen = [], set()
    for clip, png in zip(clips, pngs, strict=True):
        if isinstance(png, str):
            skipped[png] += 1
            continue
        digest = hashlib.sha256(png).digest()  # one encoder, same settings: equal pixels give equal bytes
        if digest in seen:
            skipped["duplicate_image"] += 1
            continue
        seen.add(digest)
        clip.png = png
        kept.append(clip)
    return kept


def is_test_title(title: str) -> bool:
    return int.from_bytes(hashlib.sha1(title.encode("utf-8")).digest()[:4], "big") < TEST_FRACTION * 2**32


def split(clips: list[Clip]) -> tuple[list[tuple[Clip, list[str]]], list[tuple[Clip, list[str]]], int]:
    """(train, held out) as (clip, captions), and the number of held-out tags captions
    dropped because another image has the same one (module docstring)."""
    uses = Counter(caption for c in clips for caption in {c.title, c.tags} if caption)
    train, test, dropped = [], [], 0
    for clip in clips:
        if uses[clip.title] == 1 and is_test_title(clip.title):
            keep_tags = bool(clip.tags) and uses[clip.tags] == 1
            dropped += bool(clip.tags) and not keep_tags
            test.append((clip, [clip.title] + ([clip.tags] if keep_tags else [])))
        else:
            train.append((clip, [clip.title] + ([clip.tags] if clip.tags else [])))
    return train, test, dropped


def _write_zero_shot_set(folder: Path, held_out: list[Clip]) -> int:
    """The held-out clips of the categories with at least MIN_ZERO_SHOT_IMAGES of them, by
    category (zeroshot.write_zero_shot_set); the class count."""
    per_class = Counter(c.category for c in held_out)
    classes = sorted(k for k, n in per_class.items() if n >= MIN_ZERO_SHOT_IMAGES and k not in NOT_CLASSES)
    return write_zero_shot_set(folder, [(c.category, c.key, c.png) for c in held_out if c.category in classes],
                               {c: c.replace("_", " ") for c in classes}, ZERO_SHOT_TEMPLATES)


def build_openclipart(out: str | Path, root: str | Path = SVG_ROOT, samples_per_shard: int = 256) -> dict:
    """Write OUT/train and OUT/test image-text shards and OUT/zeroshot_category from the
    SVGs under root; returns the counts (also in OUT/build.json). Skips the work when it is
    all there."""
    out, root = Path(out), Path(root)
    if (out / "build.json").exists():
        return json.loads((out / "build.json").read_text())
    if not root.is_dir():
        raise OpenclipartMissing(f"no Openclipart SVGs at {root}; install them: {INSTALL}")
    if shutil.which("rsvg-convert") is None:
        raise OpenclipartMissing(f"rsvg-convert (the SVG renderer) is not installed; install it: {INSTALL}")
    skipped: Counter = Counter()
    clips = render_all(collect(root, skipped), root, skipped)
    train, test, dropped = split(clips)
    counts = {}
    for name, rows in (("train", train), ("test", test)):
        samples = (sample_members(c.key, c.png, "png", captions, meta={"path": c.path, "category": c.category})
                   for c, captions in rows)
        write_shards(samples, out / name, samples_per_shard, extra={"source": "openclipart-svg"}, total=len(rows))
        counts[name] = len(rows)
    counts["train_captions"] = sum(len(captions) for _, captions in train)
    counts["test_captions"] = sum(len(captions) for _, captions in test)
    counts["test_tags_dropped_as_shared"] = dropped
    counts["zeroshot_category_classes"] = _write_zero_shot_set(out / f"zeroshot_{ZERO_SHOT_TASK}", [c for c, _ in test])
    counts["skipped"] = {reason: skipped[reason] for reason in SKIP_REASONS}
    (out / "build.json").write_text(json.dumps(counts, indent=1))
    return counts



def build(shards: Path, source: Path | None = None) -> dict:
    """The benchmark's data (studies/benchmarks.py)."""
    return build_openclipart(shards, source or SVG_ROOT)
