"""Writing shards (`alignvl-scale shards`) and finding them again (specs and manifests).

A shard folder holds `shard-000000.tar`, ... and `manifest.json`:

    {"format": "alignvl-shards/1", "kind": "image-text" | "features",
     "shards": [{"name": "shard-000000.tar", "samples": 1000}, ...], "samples": N, ...extra}

Samples are written one at a time (bounded memory); the manifest is written last and
atomically, so a folder with a manifest is complete.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import webdataset as wds
from PIL import Image
from tqdm import tqdm

from alignvl_scale.config import UserError, counted
from alignvl_scale.data.remote import Unreachable, is_remote, read_remote, write_remote
from alignvl_scale.data.remote import exists as remote_exists
from alignvl_scale.data.samples import (
    DecodeLimits,
    SkipSample,
    clean_captions,
    decode_image,
    open_image,
    read_image_file,
    write_sample_offsets,
)
from alignvl_scale.runtime.files import write_json_atomic

MAX_CSV_FIELD = 64 * 2**20  # characters in one caption-file field
MANIFEST = "manifest.json"
MANIFEST_FORMAT = "alignvl-shards/1"
SHARD_PATTERN = "shard-{:06d}.tar"


class DataSourceError(UserError, ValueError):
    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason  # the SKIP_REASONS entry, where one row was the problem


@dataclass(frozen=True)
class Shard:
    url: str
    samples: int | None  # None when no manifest or declared count is known


def sample_members(key: str, image: bytes | None = None, image_ext: str = "png", captions: list[str] = (),
                   meta: dict | None = None, **arrays: bytes) -> dict:
    """One WebDataset sample dict of raw bytes: `txt` for a single caption, `json` with
    "captions" for several (metadata rides in the json)."""
    sample = {"__key__": key}
    if image is not None:
        sample[image_ext] = image
    if len(captions) == 1 and not meta:
        sample["txt"] = captions[0].encode("utf-8")
    elif captions or meta:
        sample["json"] = json.dumps({**(meta or {}), "captions": list(captions)}).encode("utf-8")
    sample.update(arrays)
    return sample


def write_shards(samples: Iterable[dict], out_dir: str | Path, samples_per_shard: int, kind: str = "image-text",
                 extra: dict | None = None, total: int | None = None, progress: bool = True) -> dict:
    """Write sample dicts (see `sample_members`) into fixed-size tar shards, each with its
    offsets sidecar (`samples.write_sample_offsets`), and a manifest."""
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards: list[dict] = []
    writer = None
    for sample in tqdm(samples, total=total, desc=f"shards -> {out}", unit="sample", disable=not progress):
        if writer is None or shards[-1]["samples"] == samples_per_shard:
            if writer is not None:
                writer.close()
                write_sample_offsets(out / shards[-1]["name"])
            shards.append({"name": SHARD_PATTERN.format(len(shards)), "samples": 0})
            writer = wds.TarWriter(str(out / shards[-1]["name"]), encoder=False)
        writer.write(sample)
        shards[-1]["samples"] += 1
    if writer is not None:
        writer.close()
        write_sample_offsets(out / shards[-1]["name"])
    return write_manifest(out, kind, shards, extra)


def write_manifest(folder: str | Path, kind: str, shards: list[dict], extra: dict | None = None) -> dict:
    """The one place a manifest is made: written last and atomically, so a folder with a
    manifest is complete (a local folder, or an object store's: `data/remote.py`).
    `shards`: [{"name": ..., "samples": n, ...}] in order."""
    manifest = {"format": MANIFEST_FORMAT, "kind": kind, "shards": shards,
                "samples": sum(s["samples"] for s in shards), **(extra or {})}
    if is_remote(str(folder)):
        write_remote(_join(str(folder), MANIFEST), json.dumps(manifest, indent=1))
    else:
        write_json_atomic(Path(folder) / MANIFEST, manifest)
    return manifest


def read_manifest(folder: str | Path) -> dict:
    """A shard folder's manifest (a local folder, or a remote one: `data/remote.py`), checked:
    every shard a plain file name in the folder with a sample count of 0 or more (an empty
    shard is in no stream's span: epochs are split by samples)."""
    path = _join(str(folder), MANIFEST)
    try:
        manifest = json.loads(read_remote(path) if is_remote(path) else Path(path).read_text())
    except Unreachable as exc:
        raise DataSourceError(f"{path}: no manifest to read ({exc.why})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise DataSourceError(f"{path}: unreadable manifest: {exc}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataSourceError(f"{path}: not an alignvl-scale manifest (format "
                              f"{manifest.get('format') if isinstance(manifest, dict) else None!r})")
    shards = manifest.get("shards")
    if not isinstance(shards, list) or not shards:
        raise DataSourceError(f"{path}: 'shards' must be a non-empty list")
    for i, entry in enumerate(shards):
        name, samples = (entry.get("name"), entry.get("samples")) if isinstance(entry, dict) else (None, None)
        if not isinstance(name, str) or Path(name).name != name or name in ("", ".", ".."):
            raise DataSourceError(f"{path}: shards[{i}].name must be a file name inside the folder, got {name!r}")
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 0:
            raise DataSourceError(f"{path}: shards[{i}].samples must be a count of 0 or more, got {samples!r}")
    return manifest


def _join(folder: str, name: str) -> str:
    return f"{folder.rstrip('/')}/{name}" if is_remote(folder) else str(Path(folder) / name)


def _parent(url: str) -> str:
    return url.rsplit("/", 1)[0] if is_remote(url) else str(Path(url).parent)


def _is_folder_spec(spec: str) -> bool:
    """A folder (of shards and a manifest), as opposed to shard files: local folders are
    folders; a remote URL is one when it does not name a .tar file or manifest.json."""
    if is_remote(spec):
        return not spec.rstrip("/").endswith((".tar", MANIFEST)) and "{" not in spec
    return Path(spec).is_dir()


def _has_manifest(folder: str) -> bool:
    return remote_exists(_join(folder, MANIFEST)) if is_remote(folder) else (Path(folder) / MANIFEST).exists()


def manifest_of(spec: str) -> dict | None:
    """The manifest of the folder a spec names (a folder, its manifest.json, or files in it)."""
    if spec.startswith("pipe:"):
        return None
    folder = spec.rstrip("/") if _is_folder_spec(spec) else _parent(spec)
    return read_manifest(folder) if _has_manifest(folder) else None


def _remote_shards(spec: str, samples_per_shard: int | None) -> list[Shard]:
    """A remote folder (its manifest lists the shards), or a (brace-expanded) list of remote
    shards, counted by the manifest beside them where there is one. Nothing is listed: object
    stores and HTTP servers alike answer for the names the spec gives; the first shard of a
    list without a manifest is checked, so that a typo fails before launch."""
    if _is_folder_spec(spec) or spec.endswith(MANIFEST):
        folder = spec.rstrip("/").removesuffix(MANIFEST).rstrip("/")
        return [Shard(_join(folder, s["name"]), s["samples"]) for s in read_manifest(folder)["shards"]]
    urls = wds.shardlists.expand_urls(spec)
    folder = _parent(urls[0])
    if _has_manifest(folder):
        counts = {_join(folder, s["name"]): s["samples"] for s in read_manifest(folder)["shards"]}
        return [Shard(u, counts.get(u, samples_per_shard)) for u in urls]
    if not remote_exists(urls[0]):
        raise DataSourceError(f"{spec}: the shard {urls[0]} cannot be read (missing, or no access)")
    return [Shard(u, samples_per_shard) for u in urls]


def resolve_spec(spec: str, samples_per_shard: int | None = None) -> list[Shard]:
    """Shards of one source spec: a folder or manifest.json written by `shards` (or indexed by
    `shards index`), local or remote (`http(s)://`, `s3://`, `gs://`), or a brace-expanded list
    of urls (`/data/s-{000..099}.tar`, `s3://b/s-{0..9}.tar`, `pipe:aws s3 cp s3://b/s-{0..9}.tar -`).
    Counts come from the manifest beside the files, else from samples_per_shard."""
    if is_remote(spec):
        return _remote_shards(spec, samples_per_shard)
    path = Path(spec)
    if not spec.startswith("pipe:") and (path.is_dir() or path.name == MANIFEST):
        folder = path if path.is_dir() else path.parent
        if not (folder / MANIFEST).exists():
            raise DataSourceError(f"{spec}: a shard folder needs {MANIFEST} (written by `alignvl-scale shards`)")
        return [Shard(str(folder / s["name"]), s["samples"]) for s in read_manifest(folder)["shards"]]
    urls = wds.shardlists.expand_urls(spec)
    counts: dict[str, int] = {}
    if not spec.startswith("pipe:"):
        missing = [u for u in urls if not Path(u).exists()]
        if missing:
            raise DataSourceError(f"{spec}: {counted(len(missing), 'shard file')} "
                                  f"{'does' if len(missing) == 1 else 'do'} not exist, first {missing[0]}")
        folder = Path(urls[0]).parent
        if (folder / MANIFEST).exists():
            counts = {str(folder / s["name"]): s["samples"] for s in read_manifest(folder)["shards"]}
    return [Shard(u, counts.get(u, samples_per_shard)) for u in urls]


def _encode_image(image: object, source: str, root: Path | None = None, allow_outside: bool = False
                  ) -> tuple[bytes, str]:
    """Raw bytes and extension of an image given as a path (inside `root` unless
    allow_outside), bytes, a datasets dict or PIL; checked to be an image as training
    decodes it, so that no other file (/etc/passwd named .png) goes into a shard."""
    if isinstance(image, dict):  # datasets' Image feature with decode=False
        image = image.get("bytes") or image.get("path")
    try:
        if isinstance(image, str | Path):
            path = Path(image)
            ext, data = read_image_file(path, root or path.parent, DecodeLimits(), allow_outside or root is None)
            return data, ext
        if isinstance(image, bytes):
            with open_image(image) as img:
                fmt = img.format.lower()
            ext = {"jpeg": "jpg"}.get(fmt, fmt)
            decode_image({ext: image}, DecodeLimits())
            return image, ext
    except (SkipSample, OSError) as exc:
        raise DataSourceError(f"{source}: {exc}", getattr(exc, "reason", "undecodable_image")) from None
    if isinstance(image, Image.Image):
        buf = io.BytesIO()
        image.convert("RGB").save(buf, format="PNG")
        return buf.getvalue(), "png"
    raise DataSourceError(f"{source}: unsupported image value of type {type(image).__name__}")


def _captions(value: object, source: str) -> list[str]:
    try:
        return clean_captions(value, DecodeLimits())
    except SkipSample as exc:
        raise DataSourceError(f"{source}: {exc}", exc.reason) from None


def sample_key(relative: str, seen: set[str]) -> str:
    """A WebDataset key from an image's path: the path without its extension, every run of
    characters other than letters, digits, '_' and '-' as one '_' (a '.' would split the key
    from its member names, a '/' would make a folder), made unique with a counter."""
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", str(Path(relative).with_suffix(""))).strip("_") or "sample"
    key, n = stem, 1
    while key in seen:
        n += 1
        key = f"{stem}_{n}"
    seen.add(key)
    return key


def folder_samples(caption_file: str | Path, image_root: str | Path | None = None, allow_outside: bool = False,
                   image_column: str = "image", caption_column: str | None = None, separator: str | None = None,
                   rejects: list[dict] | None = None) -> Iterator[dict]:
    """(a) Images in a folder with a caption file: CSV, TSV (or any `separator`) with a header
    naming `image_column` and `caption_column` (default "caption"), or JSONL rows with those
    fields (default captions: "captions", a list, or "caption"). Image paths are relative to
    image_root (default: the caption file's folder), and inside it (links resolved) unless
    allow_outside. Each sample's key is its image path, sanitized (`sample_key`), and its JSON
    keeps the original path as "source".

    A missing column is an error before any row. A row that cannot become a sample (no image
    field, no such file, not an image, outside the root, no, empty or overlong caption, or the
    same image bytes with the same captions as an earlier row: a duplicate pair is a false
    negative in a contrastive batch) is appended to `rejects` as {"where": "file:line",
    "image": ..., "reason": ..., "detail": ...}; with rejects=None the first one raises
    DataSourceError instead."""
    caption_file = Path(caption_file)
    root = Path(image_root) if image_root else caption_file.parent
    if not caption_file.exists():
        raise DataSourceError(f"{caption_file}: caption file not found")
    caption_fields = [caption_column] if caption_column else ["captions", "caption"]
    seen: set[str] = set()
    pairs: dict[str, str] = {}  # hash of (image bytes, captions) -> where it was first
    for row, where in iter_caption_rows(caption_file, separator, required=(image_column, caption_fields)):
        image = row.get(image_column)
        caption = next((row[f] for f in caption_fields if row.get(f) not in (None, "")), None)
        try:
            if image in (None, ""):
                raise DataSourceError(f"{where}: no '{image_column}' field (has {sorted(row)})", "missing_image")
            data, ext = _encode_image(root / str(image), where, root, allow_outside)
            captions = _captions(caption, where)
            pair = hashlib.sha1(data + json.dumps(captions).encode()).hexdigest()
            if pair in pairs:
                raise DataSourceError(f"{where}: the same image and captions as {pairs[pair]}", "duplicate_pair")
            pairs[pair] = where
        except DataSourceError as exc:
            if rejects is None:
                raise
            rejects.append({"where": where, "image": image, "reason": exc.reason, "detail": str(exc)})
            continue
        yield sample_members(sample_key(str(image), seen), data, ext, captions, meta={"source": str(image)})


def iter_caption_rows(caption_file: Path, separator: str | None = None,
                      required: tuple[str, list[str]] | None = None) -> Iterator[tuple[dict, str]]:
    """Rows of a caption file, each with its 'file:line' for messages: delimited text (CSV by
    its .csv suffix, TSV by .tsv or .tab, or any file with `separator`) or JSONL. With
    `required` (an image column, and caption columns of which one must exist), a delimited
    file whose header lacks them is an error naming the columns it has."""
    delimiter = separator or {".csv": ",", ".tsv": "\t", ".tab": "\t"}.get(caption_file.suffix.lower())
    with caption_file.open(newline="", encoding="utf-8") as f:
        if delimiter:
            # Fields past csv's 128 KiB limit (an overlong caption) parse, to be rejected by their row's
            # checks; the limit that remains bounds the memory one field can take.
            csv.field_size_limit(max(csv.field_size_limit(), MAX_CSV_FIELD))
            reader = csv.DictReader(f, delimiter=delimiter)
            header = reader.fieldnames or []
            if required and (required[0] not in header or not set(required[1]) & set(header)):
                raise DataSourceError(f"{caption_file}: needs columns {required[0]!r} and "
                                      f"{' or '.join(map(repr, required[1]))}, has {header} (set --image-column, "
                                      "--caption-column, --separator)")
            try:
                for row in reader:
                    yield row, f"{caption_file}:{reader.line_num}"
            except csv.Error as exc:
                raise DataSourceError(f"{caption_file}:{reader.line_num}: {exc}") from None
            return
        for line, text in enumerate(f, start=1):
            if text.strip():
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as exc:
                    raise DataSourceError(f"{caption_file}:{line}: bad JSON: {exc}") from None
                if not isinstance(row, dict):
                    raise DataSourceError(f"{caption_file}:{line}: expected a JSON object, got {type(row).__name__}")
                yield row, f"{caption_file}:{line}"


def hf_samples(dataset: str, image_column: str, caption_column: str, split: str = "train",
               data_dir: str | None = None) -> tuple[Iterator[dict], int | None]:
    """(b) A Hugging Face datasets dataset: a `save_to_disk` folder, or `load_dataset` on
    local files (`imagefolder` with metadata, `json`, ...), read as a stream."""
    import datasets

    saved = Path(dataset)
    if (saved / "dataset_info.json").exists() or (saved / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(dataset)
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
        total = len(ds)
    else:
        ds = datasets.load_dataset(dataset, data_dir=data_dir, split=split, streaming=True)
        total = None
    columns = list(ds.column_names or ds.features or [])
    for column in (image_column, caption_column):
        if columns and column not in columns:
            raise DataSourceError(f"{dataset}: no column {column!r}; columns are {columns}")
    if hasattr(ds, "cast_column") and isinstance(ds.features.get(image_column), datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))  # keep the original bytes

    def samples() -> Iterator[dict]:
        for index, row in enumerate(ds):
            where = f"{dataset}[{index}]"
            image, ext = _encode_image(row[image_column], where)
            yield sample_members(f"{index:09d}", image, ext, _captions(row[caption_column], where))

    return samples(), total
