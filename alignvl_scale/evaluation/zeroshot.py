"""Zero-shot classification, the evaluation CLIP users run first: an image folder with one
subfolder per class, each class embedded as the mean of its prompt templates' text
embeddings (renormalized, as CLIP does), images assigned to the most similar class.

    FOLDER/<class>/<image>.png ...
    FOLDER/classes.txt     optional: one class per line, "<subfolder>" or "<subfolder>\t<name in prompts>"
    FOLDER/templates.txt   optional: one prompt per line with {} for the class name

Without classes.txt every subfolder is a class, named by its folder name ('_' as spaces);
without templates.txt the prompt is "a photo of a {}.". Images are read as eval sets are:
regular files inside the folder, decoded only as the format their extension names.
"""

from __future__ import annotations

import string
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from alignvl_scale.data.samples import IMAGE_EXTENSIONS, DecodeLimits, SkipCounts, SkipSample, read_image_file
from alignvl_scale.data.shards import DataSourceError

CLASSES_FILE, TEMPLATES_FILE = "classes.txt", "templates.txt"
DEFAULT_TEMPLATES = ("a photo of a {}.",)
TOP_KS = (1, 5)


@dataclass
class ZeroShotSet:
    classes: list[str]  # the names used in prompts, in label order
    templates: list[str]
    images: list[bytes] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)
    counts: SkipCounts = field(default_factory=SkipCounts)


def write_zero_shot_set(folder: Path, images: list[tuple[str, str, bytes]], names: dict[str, str],
                        templates: tuple[str, ...]) -> int:
    """Write the layout `load_zero_shot_set` reads: folder/<class>/<key>.png for each
    (class subfolder, key, PNG bytes), classes.txt naming every class of `names` (subfolder
    -> name in prompts) in subfolder order, templates.txt; returns the class count."""
    folder.mkdir(parents=True, exist_ok=True)
    for subfolder, key, png in images:
        (folder / subfolder).mkdir(exist_ok=True)
        (folder / subfolder / f"{key}.png").write_bytes(png)
    (folder / CLASSES_FILE).write_text("".join(f"{c}\t{n}\n" for c, n in sorted(names.items())), encoding="utf-8")
    (folder / TEMPLATES_FILE).write_text("".join(t + "\n" for t in templates), encoding="utf-8")
    return len(names)


def _lines(path: Path) -> list[str]:
    return [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def zero_shot_layout(folder: str | Path, classes_file: str | Path | None = None,
                     templates_file: str | Path | None = None) -> tuple[list[str], list[str], list[str]]:
    """(class subfolders, class names, templates) of the set in `folder`, checked, without
    reading an image (what a launch checks before any process group)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataSourceError(f"{folder}: zero-shot set must be a folder with one subfolder per class")
    classes_path = Path(classes_file) if classes_file else folder / CLASSES_FILE
    if classes_path.is_file():
        entries = [line.split("\t", 1) for line in _lines(classes_path)]
        subfolders = [e[0] for e in entries]
        names = [e[1] if len(e) > 1 else e[0].replace("_", " ") for e in entries]
    elif classes_file:
        raise DataSourceError(f"{classes_file}: classes file not found")
    else:
        subfolders = sorted(p.name for p in folder.iterdir() if p.is_dir())
        names = [s.replace("_", " ") for s in subfolders]
    templates_path = Path(templates_file) if templates_file else folder / TEMPLATES_FILE
    if templates_file and not templates_path.is_file():
        raise DataSourceError(f"{templates_file}: templates file not found")
    templates = _lines(templates_path) if templates_path.is_file() else list(DEFAULT_TEMPLATES)
    bad = [t for t in templates if not _one_placeholder(t)]
    if bad:
        raise DataSourceError(f"{templates_path}: every template needs one {{}} for the class name and no other "
                              f"field (write {{{{ and }}}} for braces), not {bad[0]!r}")
    missing = [s for s in subfolders if not (folder / s).is_dir()]
    if len(subfolders) < 2 or missing:
        raise DataSourceError(f"{folder}: needs at least 2 class subfolders" + (f"; missing {missing[:3]}" if missing
                                                                                 else ""))
    for what, values in (("subfolders", subfolders), ("class names", names)):
        twice = [v for v, n in Counter(values).items() if n > 1]
        if twice:
            raise DataSourceError(f"{classes_path}: {len(twice)} {what} listed more than once: {twice[:3]} (they "
                                  "would compete with themselves)")
    empty = [s for s in subfolders if not any(p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
                                              for p in (folder / s).iterdir())]
    if empty:
        raise DataSourceError(f"{folder}: {len(empty)} classes have no image file: {empty[:3]}")
    return subfolders, names, templates


def _one_placeholder(template: str) -> bool:
    """Exactly one `{}` field and nothing else str.format would read (a `{x}` raised
    KeyError at the first evaluation, after training)."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
        template.format("class")
    except (ValueError, IndexError, KeyError):
        return False
    return fields == [""]


def load_zero_shot_set(folder: str | Path, classes_file: str | Path | None = None,
                       templates_file: str | Path | None = None, limits: DecodeLimits | None = None) -> ZeroShotSet:
    """The set in `folder`; classes_file / templates_file override the folder's own files."""
    folder, limits = Path(folder), limits or DecodeLimits()
    subfolders, names, templates = zero_shot_layout(folder, classes_file, templates_file)
    out = ZeroShotSet(classes=names, templates=templates)
    for label, sub in enumerate(subfolders):
        for path in sorted((folder / sub).iterdir()):
            if path.suffix.lower().lstrip(".") not in IMAGE_EXTENSIONS:
                continue
            try:
                _, data = read_image_file(path, folder, limits)
            except SkipSample as skip:
                out.counts.record(skip)
                continue
            out.images.append(data)
            out.labels.append(label)
            out.counts.good += 1
    unread = [names[label] for label in range(len(names)) if label not in set(out.labels)]
    if unread:
        raise DataSourceError(f"{folder}: no readable image in {len(unread)} classes ({unread[:3]}; "
                              f"skipped {dict(out.counts.skipped)}): a class without images cannot be scored")
    return out


def class_embeddings(text_embeddings: torch.Tensor, n_classes: int) -> torch.Tensor:
    """(classes x templates, d) prompt embeddings, class-major -> (classes, d): the mean of
    each class's normalized prompt embeddings, normalized again."""
    prompts = F.normalize(text_embeddings.float(), dim=-1).view(n_classes, -1, text_embeddings.shape[-1])
    return F.normalize(prompts.mean(dim=1), dim=-1)


def zero_shot_accuracy(image_emb: torch.Tensor, class_emb: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """top1 and top5 accuracy in %: the label among the k classes most similar to the image
    (ties: a class scoring the same as the label's counts against it)."""
    scores = F.normalize(image_emb.float(), dim=-1) @ class_emb.T
    correct = scores.gather(1, labels[:, None])
    rank = (scores > correct).sum(dim=1) + (scores == correct).sum(dim=1) - 1  # 0 = first
    return {f"top{k}": (rank < k).double().mean().item() * 100 for k in TOP_KS if k <= class_emb.shape[0]}
