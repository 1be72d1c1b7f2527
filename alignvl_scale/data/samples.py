"""What a shard sample is, and how one is decoded safely (docs/data.md).

A shard is untrusted input: members are decoded by explicit extension handlers only
(images through Pillow in the one format their extension names, text as UTF-8, json with
a bounded depth, npy without pickle). Anything else, pickle and `.pyd` included, is never
decoded, and no member is read before its declared size is checked. Every sample that
cannot be used is skipped and counted under one of SKIP_REASONS; nothing is dropped
silently.
"""

from __future__ import annotations

import io
import json
import stat
import tarfile
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image

from alignvl_scale.config import DecodeLimits
from alignvl_scale.data.remote import Unreachable, is_remote, open_remote, read_remote
from alignvl_scale.runtime.files import write_json_atomic
from alignvl_scale.runtime.log import warn

# The only image formats decoded, and the Pillow plugin each extension may use: EPS
# content named `.png` must not reach Pillow's Ghostscript plugin.
IMAGE_FORMATS = {"jpg": "JPEG", "jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
IMAGE_EXTENSIONS = tuple(IMAGE_FORMATS)
FEATURE_IMAGE, FEATURE_TEXT = "img.npy", "txt.npy"
CAPTION_MEMBERS = ("txt", "json", FEATURE_TEXT)  # what a sample's caption is made of (data.caption_noise swaps them)
# Members that deserialize code or arbitrary objects: never opened, counted when seen.
UNSAFE_EXTENSIONS = ("pyd", "pickle", "pkl", "pth", "pt", "mp", "msgpack")

SKIP_REASONS = (
    "truncated_tar",      # the tar stream ended or broke mid-member; the rest of the shard is lost
    "unreachable_shard",  # a remote shard that could not be read (404, 403, retries spent): all its samples
    "undecodable_image",
    "missing_image",
    "missing_caption",
    "empty_caption",
    "bad_utf8",
    "bad_json",
    "oversized_image",
    "oversized_caption",
    "oversized_member",   # a member declared larger than data.max_member_bytes (or sparse): never read
    "missing_samples",    # the manifest promised more samples than the shard holds (a cut tar reads as shorter)
    "outside_path",       # an eval-set entry naming a file outside the set's folder
    "duplicate_key",      # a key seen twice in a row group; the later copy is skipped
    "bad_features",
)


class SkipSample(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        assert reason in SKIP_REASONS, reason
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.key = ""  # the sample's key, where the reader knows it


@dataclass
class SkipCounts:
    """Good and skipped samples, by reason; additive across workers, ranks and shards."""

    good: int = 0
    skipped: Counter = field(default_factory=Counter)
    unsafe_members: int = 0  # members never opened (pickle, pyd, ...); their samples may still be good
    noisy_captions: int = 0  # good samples trained with another sample's caption (data.caption_noise)

    @property
    def total(self) -> int:
        return self.good + sum(self.skipped.values())

    @property
    def skip_fraction(self) -> float:
        return (self.total - self.good) / self.total if self.total else 0.0

    def record(self, example: object, unsafe: int = 0, noisy: bool = False) -> bool:
        """Count one decoded example or SkipSample; True when it is usable."""
        self.unsafe_members += unsafe
        if isinstance(example, SkipSample):
            self.skipped[example.reason] += 1
            return False
        self.good += 1
        self.noisy_captions += noisy
        return True

    def add(self, other: SkipCounts) -> None:
        self.good += other.good
        self.skipped.update(other.skipped)
        self.unsafe_members += other.unsafe_members
        self.noisy_captions += other.noisy_captions

    def as_dict(self) -> dict:
        return {"good": self.good, "skipped": dict(self.skipped), "unsafe_members": self.unsafe_members,
                "noisy_captions": self.noisy_captions}

    @classmethod
    def from_dict(cls, d: dict) -> SkipCounts:
        return cls(d["good"], Counter(d["skipped"]), d.get("unsafe_members", 0), d.get("noisy_captions", 0))


def split_key(name: str) -> tuple[str, str]:
    """'dir/abc.img.npy' -> ('dir/abc', 'img.npy'): the key ends at the first dot of the
    basename, as in WebDataset."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:].lower())


def _utf8(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SkipSample("bad_utf8", str(exc)) from None


def clean_captions(raw: object, limits: DecodeLimits) -> list[str]:
    """Validated, stripped captions from a string or a list of strings."""
    if raw is None:
        raise SkipSample("missing_caption")
    captions = [raw] if isinstance(raw, str) else raw
    if not isinstance(captions, list) or not all(isinstance(c, str) for c in captions):
        raise SkipSample("bad_json", "captions must be a string or a list of strings")
    captions = [c.strip() for c in captions]
    if not captions or not all(captions):
        raise SkipSample("empty_caption")
    longest = max(map(len, captions))
    if longest > limits.max_caption_chars:
        raise SkipSample("oversized_caption", f"{longest} chars")
    return captions


def decode_captions(members: dict[str, bytes], limits: DecodeLimits) -> tuple[list[str], dict]:
    """Captions from `txt` (one) or `json` {"captions": [...]} (several); json metadata too."""
    meta: dict = {}
    if "json" in members:
        try:
            meta = json.loads(_utf8(members["json"]))
        except json.JSONDecodeError as exc:
            raise SkipSample("bad_json", str(exc)) from None
        except RecursionError:  # 200,000 nested "[": the C parser stops at the recursion limit
            raise SkipSample("bad_json", "nested too deeply") from None
        if not isinstance(meta, dict):
            raise SkipSample("bad_json", "top level is not an object")
    if "txt" in members:
        return clean_captions(_utf8(members["txt"]), limits), meta
    return clean_captions(meta.get("captions"), limits), meta


def image_member(members: dict[str, bytes]) -> tuple[str, bytes]:
    """(extension, raw bytes) of a sample's image member (the first of IMAGE_EXTENSIONS present)."""
    ext = next((e for e in IMAGE_EXTENSIONS if e in members), None)
    if ext is None:
        raise SkipSample("missing_image")
    return ext, members[ext]


def open_image(data: bytes, ext: str | None = None) -> Image.Image:
    """Pillow on bytes, allowed only the format `ext` names (any of IMAGE_FORMATS when None)."""
    formats = [IMAGE_FORMATS[ext]] if ext else sorted(set(IMAGE_FORMATS.values()))
    return Image.open(io.BytesIO(data), formats=formats)


def read_image_file(path: Path, root: Path, limits: DecodeLimits, allow_outside: bool = False) -> tuple[str, bytes]:
    """(extension, bytes) of an image file a caption list names, read safely: inside `root`
    once links are resolved (unless allow_outside), a regular file (a FIFO would block, a
    device never end), no larger than max_image_bytes before a byte is read, and decodable
    as the format its extension names."""
    resolved = path.resolve()
    if not allow_outside and not resolved.is_relative_to(root.resolve()):
        raise SkipSample("outside_path", f"{path} is outside {root}")
    try:
        info = resolved.stat()
    except OSError as exc:
        raise SkipSample("missing_image", f"{path}: {exc.strerror}") from None
    if not stat.S_ISREG(info.st_mode):
        raise SkipSample("missing_image", f"{path} is not a regular file")
    if info.st_size > limits.max_image_bytes:
        raise SkipSample("oversized_image", f"{path}: {info.st_size} bytes")
    ext = resolved.suffix.lower().lstrip(".")
    if ext not in IMAGE_FORMATS:
        raise SkipSample("undecodable_image", f"{path}: not one of {', '.join(IMAGE_EXTENSIONS)}")
    data = resolved.read_bytes()
    decode_image({ext: data}, limits)  # raises SkipSample unless it is an image of that format
    return ext, data


def decode_image(members: dict[str, bytes], limits: DecodeLimits) -> Image.Image:
    ext, data = image_member(members)
    if len(data) > limits.max_image_bytes:
        raise SkipSample("oversized_image", f"{len(data)} bytes")
    try:
        with open_image(data, ext) as img:
            if img.width * img.height > limits.max_image_pixels:
                raise SkipSample("oversized_image", f"{img.width}x{img.height}")
            return img.convert("RGB")
    except SkipSample:
        raise
    except Exception as exc:  # Pillow raises many types for broken files
        raise SkipSample("undecodable_image", f"{type(exc).__name__}: {exc}") from None


def encode_npy(array: np.ndarray) -> bytes:
    """A feature member's bytes (what `decode_features` reads back), no pickle."""
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return buf.getvalue()


def decode_features(members: dict[str, bytes]) -> tuple[np.ndarray, np.ndarray]:
    """(image feature (d,), text features (k, d) or (d,)) from npy members, no pickle."""
    out = []
    for name in (FEATURE_IMAGE, FEATURE_TEXT):
        if name not in members:
            raise SkipSample("missing_image" if name == FEATURE_IMAGE else "missing_caption")
        try:
            array = np.load(io.BytesIO(members[name]), allow_pickle=False)
        except Exception as exc:
            raise SkipSample("bad_features", f"{name}: {exc}") from None
        if array.dtype not in (np.float16, np.float32) or array.ndim not in (1, 2):
            raise SkipSample("bad_features", f"{name}: dtype {array.dtype}, shape {array.shape}")
        if not np.isfinite(array).all():
            raise SkipSample("bad_features", f"{name}: non-finite values")
        out.append(array)
    return out[0], out[1]


@dataclass
class RawSample:
    key: str
    members: dict[str, bytes]
    reason: str | None = None  # set when the sample is already known to be unusable
    detail: str = ""
    unsafe: int = 0  # members never opened because of their extension
    noisy: bool = False  # its caption members are another sample's (data.caption_noise)

    def check(self) -> dict[str, bytes]:
        """The members, or the SkipSample this sample is already known to be."""
        if self.reason is not None:
            raise SkipSample(self.reason, self.detail or f"key {self.key!r}")
        return self.members


def open_shard(url: str, offset: int = 0, end: int | None = None):
    """A shard's bytes as a stream from byte `offset` (to `end`, a remote shard's, where
    given): a remote URL through `data/remote.py` (a Range request; reopened at the byte
    reached when a transfer breaks), else a local path or `pipe:` command through webdataset
    (a local file seeks)."""
    if is_remote(url):
        return open_remote(url, start=offset, end=end)
    if offset:
        stream = open(url, "rb")  # noqa: SIM115 - the caller's `with` closes it
        stream.seek(offset)
        return stream
    return wds.gopen(url, "rb")


OFFSETS_SUFFIX = ".idx"  # beside a shard: {"offsets": [the byte where each sample's first member begins]}


def sample_offsets(path: str | Path) -> list[int] | None:
    """The byte where each sample of a local plain tar begins (its first member's header, an
    extended header included), from the headers alone: tarfile's random-access mode seeks past
    every member's data. None for a shard that cannot be read so (compressed, broken)."""
    offsets, key = [], None
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if info.isreg() and split_key(info.name)[0] != key:
                    key = split_key(info.name)[0]
                    offsets.append(info.offset)
    except (tarfile.TarError, OSError, EOFError):
        return None
    return offsets


def write_sample_offsets(path: str | Path) -> None:
    """The offsets sidecar of a local shard (`OFFSETS_SUFFIX`): what lets a remote reader's
    piece of the shard begin with a Range request at its first sample."""
    offsets = sample_offsets(path)
    if offsets is not None:
        write_json_atomic(Path(f"{path}{OFFSETS_SUFFIX}"), {"offsets": offsets})


_offsets_cache: dict[str, list[int] | None] = {}  # the last few shards' (a worker reads a few at a time)
OFFSETS_CACHED = 16
_said_no_offsets: set[str] = set()


def sample_offset(url: str, index: int) -> int | None:
    """The byte where sample `index` of a shard begins: a local plain tar's from its headers, a
    remote shard's from its offsets sidecar. None (the caller reads through the samples before
    it) where neither can be had; a remote shard without a sidecar says so once per folder."""
    if url.startswith("pipe:"):
        return None
    if url not in _offsets_cache:
        while len(_offsets_cache) >= OFFSETS_CACHED:
            _offsets_cache.pop(next(iter(_offsets_cache)))
        if not is_remote(url):
            _offsets_cache[url] = sample_offsets(url) if Path(url).is_file() else None
        else:
            try:
                _offsets_cache[url] = [int(x) for x in json.loads(read_remote(f"{url}{OFFSETS_SUFFIX}"))["offsets"]]
            except (Unreachable, ValueError, KeyError, TypeError):
                _offsets_cache[url] = None
                folder = url.rsplit("/", 1)[0]
                if folder not in _said_no_offsets:
                    _said_no_offsets.add(folder)
                    warn(f"{folder}: no {OFFSETS_SUFFIX} beside its shards (`alignvl-scale shards index` of the "
                         "local folder writes them): a stream that begins inside a shard reads through its first "
                         "samples")
    offsets = _offsets_cache[url]
    return offsets[index] if offsets is not None and index < len(offsets) else None


def fetched_range(url: str, skip: int = 0, stop: int | None = None) -> tuple[int | None, int | None]:
    """The bytes `raw_samples(url, skip=skip, stop=stop)` opens the shard at and fetches to
    (None: the first, the last): what `remote.prefetch` is given for it."""
    offset = sample_offset(url, skip) if skip else None
    return offset, sample_offset(url, stop) if stop is not None and is_remote(url) else None


def raw_samples(url: str, max_member_bytes: int = DecodeLimits.max_member_bytes, skip: int = 0,
                stop: int | None = None) -> Iterator[RawSample]:
    """Group a tar stream's members by key. A broken stream ends the shard with one
    'truncated_tar' item (an empty shard, and a remote one that stays unreachable, with one
    'unreachable_shard' item and a line on the console); a key seen twice yields a
    'duplicate_key' item for the copy.
    A member is read only when its header declares at most `max_member_bytes` and it is
    not sparse (a 10 KB sparse member may declare 3 GB): else its sample is an
    'oversized_member' skip and the stream moves past the member without keeping it.
    skip: the first `skip` samples are passed over, their members never read (a stream's
    piece that begins inside the shard): the shard is opened at the byte where sample `skip`
    begins where that is known (`sample_offset`), else read through their headers. stop: a
    remote shard is fetched no further than sample `stop`'s first byte, where that is known
    (the caller reads no further: a piece that ends inside the shard)."""
    seen: set[str] = set()
    current: RawSample | None = None
    offset, end = fetched_range(url, skip, stop)
    started = skip if offset is not None else 0  # samples begun
    try:
        with open_shard(url, offset or 0, end) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                if not info.isreg():
                    continue
                key, ext = split_key(info.name)
                if current is None or key != current.key:
                    if current is not None and started > skip:
                        yield current
                    current = RawSample(key, {}, "duplicate_key" if key in seen else None)
                    seen.add(key)
                    started += 1
                if started <= skip:
                    continue
                if ext.rsplit(".", 1)[-1] in UNSAFE_EXTENSIONS:
                    current.unsafe += 1  # not even read: a shard is untrusted input
                    continue
                if info.size > max_member_bytes or info.issparse():
                    current.reason = current.reason or "oversized_member"
                    current.detail = f"{url}: {info.name} declares {info.size} bytes"
                    continue
                if ext in current.members:
                    current.reason = "duplicate_key"
                current.members[ext] = tar.extractfile(info).read()
    except Unreachable as exc:
        warn(f"unreachable shard {exc}: its samples are skipped (unreachable_shard)")
        yield RawSample(current.key if current else "", {}, "unreachable_shard", str(exc))
        return
    except (tarfile.TarError, EOFError, zlib.error, OSError) as exc:
        if current is None and "empty file" in str(exc):
            warn(f"{url} is empty (0 bytes): skipped")
        yield RawSample(current.key if current else "", {}, "truncated_tar", f"{url}: {exc}")
        return
    if current is not None and started > skip:
        yield current
