"""`alignvl-scale extract`: tower outputs written once as feature shards (the way FuseMix
and Align-VL train: adapters then train on cached features at huge batches).

Input shard i becomes output shard i (same keys): `img.npy` (d_img,) and `txt.npy`
(captions, d_txt) in float16, plus the captions as json. Ranks take shards round robin;
each output shard is written to a temporary name and renamed when complete, with a
sidecar of its counts, its source and a fingerprint of what made it (tower configs and
weight files, image transform, decode limits), so a rerun skips the shards that are done
and redoes, saying so, those that another source, towers or preprocessing made
(idempotent, resumable shard by shard, never a manifest that describes other features).
Rank 0 writes the manifest (towers, dims, counts) once every rank is done.

    torchrun --nproc_per_node 2 -m alignvl_scale.cli extract --config configs/demo.yaml \
        --data shards/train --out features/train
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import webdataset as wds

from alignvl_scale.config import RunConfig
from alignvl_scale.data.samples import (
    FEATURE_IMAGE,
    FEATURE_TEXT,
    DecodeLimits,
    SkipCounts,
    SkipSample,
    decode_captions,
    decode_image,
    encode_npy,
    raw_samples,
)
from alignvl_scale.data.shards import SHARD_PATTERN, resolve_spec, write_json_atomic, write_manifest
from alignvl_scale.model.head import build_preprocessing, build_towers
from alignvl_scale.model.towers import set_train_mode
from alignvl_scale.runtime.distributed import all_reduce_floats, any_rank, rank_world
from alignvl_scale.runtime.ds_ops import prepare_deepspeed_ops
from alignvl_scale.runtime.log import progress
from alignvl_scale.training.engine import fill_ds_config, zero3_init, zero_stage


class TowerPair:
    """The frozen towers for extraction. With a ZeRO-3 engine config and several ranks they
    are built partitioned (zero.Init) and run in lockstep: before every forward the ranks
    agree whether any still has work, and a rank that has none runs a dummy batch, so the
    parameter gathers inside each forward always meet on every rank."""

    def __init__(self, cfg: RunConfig, world: int, device: torch.device) -> None:
        ds_config = fill_ds_config(cfg, world)
        self.lockstep = zero_stage(ds_config) == 3 and world > 1
        self.device = device
        if self.lockstep:
            import deepspeed

            prepare_deepspeed_ops(on_gpu=device.type == "cuda")
            deepspeed.init_distributed()  # DeepSpeed's view of the process group torchrun made
        self.preprocessing = build_preprocessing(cfg)  # outside zero.Init: plain CPU objects
        with zero3_init(ds_config) if self.lockstep else nullcontext():
            towers = build_towers(cfg)
        for tower in towers:
            set_train_mode(tower, False)
        self.image_tower, self.text_tower = towers
        if self.lockstep:
            self.image_run, self.text_run = (deepspeed.initialize(model=t, config=ds_config)[0] for t in towers)
        else:
            self.image_run, self.text_run = (t.to(device) for t in towers)
        self.dummy: list | None = None

    def _agree(self, have_work: bool) -> bool:
        if not self.lockstep:
            return have_work
        return any_rank(have_work)

    def encode(self, pending: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
        """[(key, PIL image, captions)] -> (image features, text features of all captions)."""
        self._agree(True)
        self.dummy = self.dummy or pending[:1]
        return self._forward(pending)

    @torch.no_grad()
    def _forward(self, pending: list[tuple]) -> tuple[np.ndarray, np.ndarray]:
        pixels = torch.stack([self.preprocessing.image_transform(image) for _, image, _ in pending]).to(self.device)
        image_features = self.image_run(pixel_values=pixels).float().cpu().numpy()
        tokens = self.preprocessing.tokenize([c for _, _, caps in pending for c in caps])
        text_features = self.text_run(**{k: v.to(self.device) for k, v in tokens.items()}).float().cpu().numpy()
        return image_features, text_features

    def finish(self) -> None:
        """Keep the other ranks' forwards company until every rank is done."""
        while self._agree(False):  # one agreement, then one forward, per round on every rank
            self._forward(self.dummy)


def _extract_shard(url: str, target: Path, towers: TowerPair, limits: DecodeLimits, batch_size: int,
                   advance: Callable[[int], object]) -> SkipCounts:
    """advance(n): n more raw samples of the shard read (the progress bar)."""
    counts, pending = SkipCounts(), []
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")

    def flush(writer: wds.TarWriter) -> None:
        image_features, text_features = towers.encode(pending)
        row = 0
        for (key, _, caps), image_feature in zip(pending, image_features, strict=True):
            writer.write({"__key__": key, FEATURE_IMAGE: encode_npy(image_feature.astype(np.float16)),
                          FEATURE_TEXT: encode_npy(text_features[row:row + len(caps)].astype(np.float16)),
                          "json": json.dumps({"captions": caps}).encode("utf-8")})
            row += len(caps)
        pending.clear()

    with wds.TarWriter(str(tmp), encoder=False) as writer:
        for raw in raw_samples(url):
            advance(1)
            try:
                captions, _ = decode_captions(raw.check(), limits)  # the checks training makes
                image = decode_image(raw.members, limits)
            except SkipSample as skip:
                counts.record(skip, raw.unsafe)
                continue
            counts.record(image, raw.unsafe)
            pending.append((raw.key, image, captions))
            if len(pending) == batch_size:
                flush(writer)
        if pending:
            flush(writer)
    os.replace(tmp, target)
    return counts


def _first_image(shards: list, limits: DecodeLimits):
    for shard in shards:
        for raw in raw_samples(shard.url):
            try:
                yield decode_image(raw.members, limits)
            except SkipSample:
                continue


def fingerprint(cfg: RunConfig) -> str:
    """What makes a feature shard what it is, hashed: the towers' configs and weight files
    (name, size, time) and the image transform and decode limits."""
    def weight_files(name: str) -> list:
        folder = Path(name).expanduser()
        if not folder.is_dir():
            return []
        return sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()
                      if p.suffix in (".safetensors", ".bin", ".pt", ".pth"))

    towers = {m: dataclasses.asdict(getattr(cfg.model, f"{m}_tower")) for m in ("image", "text")}
    made_of = {"towers": towers, "weights": {m: weight_files(t["name"]) for m, t in towers.items()},
               "image_transform": [cfg.data.image_size, cfg.data.image_mean, cfg.data.image_std],
               "limits": dataclasses.asdict(cfg.data.limits())}
    return hashlib.sha1(json.dumps(made_of, sort_keys=True).encode()).hexdigest()[:16]


def extract(cfg: RunConfig, specs: list[str], out: str | Path, batch_size: int = 64) -> dict | None:
    """Every rank calls this; returns the manifest on rank 0 (None elsewhere)."""
    rank, world = rank_world()
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shards = [shard for spec in specs for shard in resolve_spec(spec)]
    towers = TowerPair(cfg, world, device)
    limits = cfg.data.limits()
    mine = [(i, s) for i, s in enumerate(shards) if i % world == rank]
    made_of, redone, todo = fingerprint(cfg), 0, []
    for i, shard in mine:
        sidecar = out / f".{SHARD_PATTERN.format(i)}.json"
        if (out / SHARD_PATTERN.format(i)).exists() and sidecar.exists():
            info = json.loads(sidecar.read_text())
            if info.get("fingerprint") == made_of and info.get("source") == shard.url:
                continue  # done by an earlier run of this extraction
            redone += 1
        todo.append((i, shard))
    # By sample (rank 0's shards; their manifests' counts): an extraction resumed after its
    # done shards starts the bar there, so its rate and estimate are of this run's work.
    counts_known = all(s.samples is not None for _, s in mine)
    total = sum(s.samples for _, s in mine) if counts_known else None
    done = total - sum(s.samples for _, s in todo) if counts_known else 0
    with progress(total, f"extract -> {out}", "sample", initial=done) as bar:
        for i, shard in todo:
            counts = _extract_shard(shard.url, out / SHARD_PATTERN.format(i), towers, limits, batch_size, bar.update)
            write_json_atomic(out / f".{SHARD_PATTERN.format(i)}.json",
                              {"source": shard.url, "fingerprint": made_of, **counts.as_dict()})
    if towers.lockstep:
        if towers.dummy is None:  # nothing to encode here: borrow a sample for the dummy forwards
            towers.dummy = [("", next(_first_image(shards, limits)), ["a"])]
        towers.finish()
    # After the lockstep forwards; also the barrier before rank 0 reads every rank's sidecars.
    redone = int(all_reduce_floats([redone])[0])
    if rank == 0 and redone:
        print(f"[extract] redid {redone} shards in {out} that other sources, towers or preprocessing had made")
    if rank != 0:
        return None
    entries, total = [], SkipCounts()
    for i in range(len(shards)):
        info = json.loads((out / f".{SHARD_PATTERN.format(i)}.json").read_text())
        total.add(SkipCounts.from_dict(info))
        entries.append({"name": SHARD_PATTERN.format(i), "samples": info["good"], "source": info["source"]})
    return write_manifest(out, "features", entries, {
        "image_dim": towers.image_tower.output_dim, "text_dim": towers.text_tower.output_dim, "dtype": "float16",
        "towers": {"image": dataclasses.asdict(cfg.model.image_tower),
                   "text": dataclasses.asdict(cfg.model.text_tower)},
        "image_transform": {k: getattr(cfg.data, k) for k in ("image_size", "image_mean", "image_std")},
        "skipped": dict(total.skipped), "sources": specs})
