"""`alignvl-scale shards index SPEC`: the manifest for shards this project did not write
(img2dataset's, anyone's), in a local folder or an object store's, so that they train in epoch
mode like shards `alignvl-scale shards` wrote.

    SPEC    a folder (every *.tar in it; s3:// and gs:// folders are listed), or a brace list
            of shards in one folder (the only way to name them on a plain HTTP server, which
            cannot be written to either: --out FOLDER writes the manifest there, to be copied
            beside the shards)

Each shard's sample count comes from img2dataset's `<shard>_stats.json` beside it
(`successes`) where there is one, else from reading the shard once (shards in parallel); a
shard that cannot be read whole is named, and counts what it holds. A local folder's shards
also get their offsets sidecars (`<shard>.idx`: the byte each sample begins at), so that a
reader of the folder once uploaded begins a piece inside a shard with a Range request.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import webdataset as wds

from alignvl_scale.data.remote import Unreachable, is_remote, list_objects, read_remote
from alignvl_scale.data.samples import FEATURE_IMAGE, raw_samples, write_sample_offsets
from alignvl_scale.data.shards import MANIFEST, DataSourceError, write_manifest
from alignvl_scale.runtime.log import warn


def shard_urls(spec: str) -> list[str]:
    """The shards a spec names, in name order."""
    if is_remote(spec) and "{" not in spec and not spec.endswith(".tar"):
        try:
            return list_objects(spec.rstrip("/"), ".tar")
        except Unreachable as exc:
            raise DataSourceError(f"shards index {spec}: {exc.why}") from None
    if not is_remote(spec) and Path(spec).is_dir():
        return sorted(str(p) for p in Path(spec).glob("*.tar"))
    return wds.shardlists.expand_urls(spec)


def _folder_and_name(url: str) -> tuple[str, str]:
    folder, _, name = url.rpartition("/")
    return folder, name


def count_samples(url: str) -> tuple[int, str]:
    """(samples, where the count came from: "stats" or "read")."""
    stats = url.removesuffix(".tar") + "_stats.json"
    try:
        text = read_remote(stats) if is_remote(stats) else Path(stats).read_text()
        return int(json.loads(text)["successes"]), "stats"
    except (OSError, KeyError, ValueError):  # no stats file (or not img2dataset's): read the shard
        pass
    count = 0
    for raw in raw_samples(url):
        if raw.reason in ("truncated_tar", "unreachable_shard"):
            warn(f"{url}: {raw.detail}; indexed with the {count} samples before it")
            break
        count += 1
    return count, "read"


def index_shards(spec: str, workers: int = 8, out: str | None = None) -> dict:
    """Count every shard of `spec` and write manifest.json beside them (into the folder `out`
    instead: an HTTP server cannot be written to, the manifest is copied there by hand);
    returns the manifest."""
    urls = shard_urls(spec)
    if not urls:
        raise DataSourceError(f"shards index {spec}: no .tar shards there")
    folders = {_folder_and_name(u)[0] for u in urls}
    if len(folders) > 1:
        raise DataSourceError(f"shards index {spec}: the shards are in {len(folders)} folders; index each folder "
                              "(a manifest lists the shards beside it)")
    with ThreadPoolExecutor(max(1, workers)) as pool:
        counts = list(pool.map(count_samples, urls))
        if not is_remote(urls[0]):  # the byte each sample begins at, for readers that begin inside a shard
            list(pool.map(write_sample_offsets, urls))
    first = next(raw_samples(urls[0]), None)
    kind = "features" if first is not None and FEATURE_IMAGE in first.members else "image-text"
    shards = [{"name": _folder_and_name(u)[1], "samples": n} for u, (n, _) in zip(urls, counts, strict=True) if n]
    empty = [_folder_and_name(u)[1] for u, (n, _) in zip(urls, counts, strict=True) if not n]
    if empty:
        warn(f"{len(empty)} shards hold no sample and are left out of the manifest, first {empty[0]}")
    sources = [how for _, how in counts]
    folder = out or folders.pop()
    try:
        return write_manifest(folder, kind, shards, {"indexed": {"from_stats_json": sources.count("stats"),
                                                                  "read": sources.count("read")}})
    except Unreachable as exc:
        raise DataSourceError(f"shards index {spec}: cannot write {folder}/{MANIFEST}: {exc.why}") from None
