"""The training reader: WebDataset tar shards -> per-rank batches, built for many ranks.

Each rank's DataLoader workers read a deterministic *shard sequence* each:
- epoch mode: all shards (every source) shuffled by (seed, epoch), dealt to ranks, then to
  workers (`split_by_node`, then `split_by_worker`, explicitly);
- resampled mode: an endless draw of shards, a source picked by weight then a shard
  uniformly, from an RNG seeded by (seed, rank, worker).
Inside a shard, raw samples are shuffled in a window by an RNG seeded by (seed, epoch,
rank, worker, place in the sequence), then decoded (`samples.py`, which also parses the tar), transformed, tokenized
and batched in the worker. A batch carries its worker's position (place in the sequence,
raw samples consumed in that shard) and its skip counts, so the main process knows exactly
what was consumed: a resumed stream skips precisely that, without decoding it.

Every rank yields the same number of batches per epoch: `batches_per_epoch` is computed
from the per-shard counts of the manifests, and each rank stops there. Skipped samples can
still leave a rank short; the trainer agrees on "any rank out of data" each step, so no
rank ever waits in a collective that the others left.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import heapq
import itertools
import os
import random
import select
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from alignvl_scale.config import DataConfig, DecodeLimits, UserError, counted
from alignvl_scale.data.remote import prefetch, reader_modules
from alignvl_scale.data.samples import (
    CAPTION_MEMBERS,
    RawSample,
    SkipCounts,
    SkipSample,
    decode_captions,
    decode_features,
    decode_image,
    raw_samples,
)
from alignvl_scale.data.shards import DataSourceError, Shard, resolve_spec
from alignvl_scale.data.transforms import random_resized_crop
from alignvl_scale.data.worker_signals import IGNORED_SIGNALS


class DataError(UserError):
    """The data cannot be trained on (too many bad samples, too few shards)."""


# A worker that skipped this many samples without filling a batch reports the counts (a
# count-only item), so the skip-fraction stop fires even when bad data never yields a batch.
REPORT_SKIPS_EVERY = 256


def seeded_rng(*parts: object) -> random.Random:
    return random.Random(":".join(map(str, parts)))


def window_shuffle(items: Iterator[RawSample], window: int, rng: random.Random) -> Iterator[RawSample]:
    """Deterministic (given rng) shuffle of a stream within a bounded window."""
    buffer: list[RawSample] = []
    for item in items:
        if len(buffer) < window:
            buffer.append(item)
            continue
        i = rng.randrange(window)
        buffer[i], item = item, buffer[i]
        yield item
    rng.shuffle(buffer)
    yield from buffer


def with_next(items: Iterator) -> Iterator[tuple]:
    """(item, the item after it or None) for each item; `items` may be endless."""
    items = iter(items)
    current = next(items, None)
    while current is not None:
        upcoming = next(items, None)
        yield current, upcoming
        current = upcoming


def _unit_hash(*parts: object) -> float:
    """A number in [0, 1) that depends on `parts` only: the same on every machine and run."""
    return int.from_bytes(hashlib.sha1(":".join(map(str, parts)).encode()).digest()[:8], "big") / 2**64


@dataclass(frozen=True)
class SampleSelection:
    """Which samples of a shard train (data.train_fraction) and which of those train with
    another sample's caption (data.caption_noise): functions of the sample keys and
    data.caption_noise_seed alone, so the same in every run, rank layout and run seed.

    - train_fraction f: the round(f x n) keys of the shard's n (its manifest count) with the
      lowest hash; a smaller fraction keeps a subset of a larger one's.
    - caption_noise p: round(p x m) of the m usable kept samples, picked by a second hash,
      swap captions in a cycle (each gets the next one's), so each of their captions is
      still used once, never with its own image.
    Either needs one read of the shard ahead of its samples (`plan`); with neither, none.
    """

    train_fraction: float = 1.0
    caption_noise: float = 0.0
    seed: int = 0

    @classmethod
    def from_config(cls, cfg: DataConfig) -> SampleSelection:
        return cls(cfg.train_fraction, cfg.caption_noise, cfg.caption_noise_seed)

    def kept_samples(self, n: int) -> int:
        """How many of a shard's n samples train: what epoch lengths are computed from."""
        return n if self.train_fraction >= 1 else round(self.train_fraction * n)

    def plan(self, url: str, expected: int | None, max_member_bytes: int
             ) -> tuple[set[str] | None, dict[str, dict[str, bytes]]]:
        """(the keys that train, None for all; key -> the caption members it trains with)."""
        if self.train_fraction >= 1 and self.caption_noise == 0:
            return None, {}
        # Keys and caption members only: a shard's images are not held in memory.
        keys, captions = [], {}
        for raw in raw_samples(url, max_member_bytes):
            keys.append(raw.key)
            members = {m: raw.members[m] for m in CAPTION_MEMBERS if m in raw.members}
            if raw.reason is None and members:
                captions[raw.key] = members
        keep = None
        if self.train_fraction < 1:
            n = self.kept_samples(expected if expected is not None else len(keys))
            keep = set(sorted(keys, key=lambda k: _unit_hash("fraction", k))[:n])
        usable = [k for k in captions if keep is None or k in keep]
        count = round(self.caption_noise * len(usable))
        if count < 2:  # one sample cannot swap with another
            return keep, {}
        noisy = sorted(usable, key=lambda k: _unit_hash(self.seed, "caption_noise", k))[:count]
        return keep, {k: captions[noisy[(i + 1) % count]] for i, k in enumerate(noisy)}


def _selected(samples: Iterator[RawSample], keep: set[str] | None, swaps: dict[str, dict[str, bytes]]
              ) -> Iterator[RawSample | None]:
    """The shard's samples with swapped captions, None in place of those left out (they
    still count as read, for resume positions and the manifest check)."""
    for raw in samples:
        if keep is not None and raw.key not in keep:
            yield None
            continue
        if raw.key in swaps and raw.reason is None:
            rest = {m: data for m, data in raw.members.items() if m not in CAPTION_MEMBERS}
            raw = RawSample(raw.key, {**rest, **swaps[raw.key]}, unsafe=raw.unsafe, noisy=True)
        yield raw


def shard_examples(url: str, decode: Callable[[RawSample], object], window: int, rng: random.Random,
                   start: int = 0, expected: int | None = None, selection: SampleSelection | None = None
                   ) -> Iterator[tuple[int, object | SkipSample, RawSample]]:
    """(raw items consumed so far, example or SkipSample, its raw sample) for one shard,
    skipping the first `start` raw items undecoded. With `expected` (the manifest's count),
    a shard that ends early yields one 'missing_samples' skip per missing sample: a tar cut
    at a block boundary reads as a shorter, valid tar, and would otherwise lose them silently
    (a remote shard that became unreachable: 'unreachable_shard' skips instead).
    `selection` leaves samples out and swaps captions (data.train_fraction, data.caption_noise)."""
    keep, swaps = (selection or SampleSelection()).plan(url, expected, decode.limits.max_member_bytes)
    samples = _selected(raw_samples(url, decode.limits.max_member_bytes), keep, swaps)
    consumed, lost = 0, ("missing_samples", f"{url}: manifest says {expected}, shard holds")
    for consumed, raw in enumerate(window_shuffle(samples, window, rng), start=1):
        if raw is not None and raw.reason == "unreachable_shard":
            lost = ("unreachable_shard", raw.detail)
        if consumed <= start or raw is None:
            continue
        try:
            raw.check()
            yield consumed, decode(raw), raw
        except SkipSample as skip:
            skip.key = raw.key
            yield consumed, skip, raw
    for missing in range(max(consumed, start) + 1, (expected or 0) + 1):
        detail = f"{lost[1]} {consumed}" if lost[0] == "missing_samples" else lost[1]
        yield missing, SkipSample(lost[0], detail), RawSample("", {})


class ImageTextDecoder:
    """Raw sample -> (pixels, one caption); batches -> {'pixel_values', tokenizer outputs}.

    A sample with several captions contributes one, picked by (seed, epoch, key)."""

    def __init__(self, limits: DecodeLimits, image_transform: Callable | None = None,
                 tokenize: Callable[[list[str]], dict] | None = None, seed: int = 0,
                 crop_scale: tuple[float, float] | None = None) -> None:
        """crop_scale: train-time random resized crop (data.augment_crop_scale), or None."""
        self.limits, self.image_transform, self.tokenize, self.seed = limits, image_transform, tokenize, seed
        self.crop_scale = crop_scale
        self.epoch = 0

    def __call__(self, raw: RawSample) -> tuple:
        captions, _ = decode_captions(raw.members, self.limits)
        image = decode_image(raw.members, self.limits)
        rng = seeded_rng(self.seed, self.epoch, raw.key)  # the same choices after a resume
        caption = rng.choice(captions)
        if self.crop_scale is not None:
            image = random_resized_crop(image, rng, self.crop_scale)
        return (self.image_transform(image) if self.image_transform else image), caption

    def collate(self, examples: list[tuple]) -> dict:
        images, captions = zip(*examples, strict=True)
        batch = {"pixel_values": torch.stack(images), "captions": list(captions)}
        if self.tokenize is not None:
            batch.update(self.tokenize(list(captions)))
        return batch


class FeatureDecoder:
    """Feature shard sample -> (image feature, text feature); one caption row by (seed, epoch, key)."""

    def __init__(self, seed: int = 0, limits: DecodeLimits | None = None) -> None:
        self.seed, self.epoch, self.limits = seed, 0, limits or DecodeLimits()

    def __call__(self, raw: RawSample) -> tuple:
        image, text = decode_features(raw.members)
        if text.ndim == 2:
            text = text[seeded_rng(self.seed, self.epoch, raw.key).randrange(text.shape[0])]
        return torch.from_numpy(image.astype(np.float32)), torch.from_numpy(text.astype(np.float32))

    def collate(self, examples: list[tuple]) -> dict:
        images, texts = zip(*examples, strict=True)
        return {"image_features": torch.stack(images), "text_features": torch.stack(texts)}


@dataclass(frozen=True)
class ShardTask:
    """One shard as one worker reads it in one epoch: the parts its window shuffle is seeded
    from, and the raw samples of it already read (a shard re-dealt mid-epoch by `redeal`:
    the new reader replays the same shuffle and skips them)."""

    url: str
    samples: int | None  # the manifest's count
    rng: tuple
    start: int = 0

    def as_list(self) -> list:
        return [self.url, self.samples, list(self.rng), self.start]

    @classmethod
    def from_list(cls, x: list) -> ShardTask:
        return cls(x[0], x[1], tuple(x[2]), x[3])


@dataclass
class StreamState:
    """Where one rank's stream stands; saved in every checkpoint (JSON-able)."""

    epoch: int = 0
    batches: int = 0  # handed to the trainer in this epoch
    positions: dict[int, tuple[int, int]] = field(default_factory=dict)  # worker -> (task place, raw consumed)
    items: int = 0  # DataLoader items received in this epoch: batches and count-only reports
    workers: int | None = None  # DataLoader workers the positions belong to
    # An epoch re-dealt after a resize: each worker's tasks and the batches every rank makes of them.
    tasks: dict[int, list[ShardTask]] | None = None
    limit: int | None = None

    def as_dict(self) -> dict:
        out = {"epoch": self.epoch, "batches": self.batches, "items": self.items, "workers": self.workers,
               "positions": {str(w): list(p) for w, p in self.positions.items()}}
        if self.tasks is not None:
            out.update(limit=self.limit, tasks={str(w): [t.as_list() for t in ts] for w, ts in self.tasks.items()})
        return out

    @classmethod
    def from_dict(cls, d: dict) -> StreamState:
        tasks = d.get("tasks")
        return cls(d["epoch"], d["batches"], {int(w): (p[0], p[1]) for w, p in d["positions"].items()},
                   d.get("items", d["batches"]), d.get("workers"),
                   None if tasks is None else {int(w): [ShardTask.from_list(t) for t in ts] for w, ts in tasks.items()},
                   d.get("limit"))


class ShardStream(IterableDataset):
    """One rank's batches for one epoch, produced by its DataLoader workers."""

    def __init__(self, sources: list[list[Shard]], weights: list[float] | None, cfg: DataConfig, decode,
                 rank: int, world: int, seed: int, state: StreamState) -> None:
        self.sources, self.weights, self.cfg, self.decode = sources, weights, cfg, decode
        self.rank, self.world, self.seed, self.state = rank, world, seed, state
        self.selection = SampleSelection.from_config(cfg)

    def worker_tasks(self, worker: int, workers: int) -> Iterator[ShardTask]:
        if self.state.tasks is not None:  # the rest of an epoch, re-dealt after a resize
            yield from self.state.tasks.get(worker, [])
        elif self.cfg.mode == "epoch":
            order = epoch_order(self.sources, self.seed, self.state.epoch)
            yield from epoch_tasks(order, self.seed, self.state.epoch, self.rank, self.world, worker, workers)
        else:  # resampled: an endless weighted draw (a resize starts the next "epoch": fresh draws)
            rng = seeded_rng(self.seed, "resampled", self.state.epoch, self.rank, worker)
            for place in itertools.count():
                source = rng.choices(range(len(self.sources)), weights=self.weights)[0]
                shard = rng.choice(self.sources[source])
                yield ShardTask(shard.url, shard.samples, (self.seed, self.state.epoch, self.rank, worker, place))

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        workers = info.num_workers if info else 1
        # Resuming mid-epoch: rotate so that physical worker 0 serves the logical worker whose
        # turn it is in the DataLoader's round robin; the item order then matches a run
        # that never stopped.
        worker = ((info.id if info else 0) + self.state.items) % workers
        self.decode.epoch = self.state.epoch
        place0, start0 = self.state.positions.get(worker, (0, 0))
        batch, counts = [], SkipCounts()
        # Where a resume restarts this worker: just after its last batch. Count-only reports
        # carry it too, so that the samples pending in an unfinished batch are not skipped.
        committed = (place0, start0)
        for place, (task, upcoming) in enumerate(with_next(self.worker_tasks(worker, workers))):
            if place < place0:
                continue
            if upcoming is not None:  # a remote shard is fetched while this one decodes
                prefetch(upcoming.url)
            start = start0 if place == place0 else task.start
            for consumed, example, raw in shard_examples(task.url, self.decode, self.cfg.shuffle_window,
                                                         seeded_rng(*task.rng), start, task.samples, self.selection):
                if not counts.record(example, raw.unsafe, raw.noisy):
                    if counts.total >= REPORT_SKIPS_EVERY:  # skips with no batch in sight: report them
                        yield self._item(None, worker, committed, task.url, counts)
                        counts = SkipCounts()
                    continue
                batch.append(example)
                if len(batch) == self.cfg.batch_size:
                    committed = (place, consumed)
                    yield self._item(self.decode.collate(batch), worker, committed, task.url, counts)
                    batch, counts = [], SkipCounts()
            if counts.total > counts.good:  # a shard's skips reach the trainer even if no batch follows
                yield self._item(None, worker, committed, task.url, counts)
                counts = SkipCounts()
        # A worker's last partial batch is dropped (fewer than batch_size samples per
        # worker per epoch): ranks must stay equal.

    @staticmethod
    def _item(batch: dict | None, worker: int, position: tuple[int, int], url: str, counts: SkipCounts) -> dict:
        """What a worker hands the trainer: a batch (or None: a count-only report), where a
        resume restarts the worker, and the samples it counted since its last item."""
        return {"batch": batch, "worker": worker, "position": position, "shard": url, "counts": counts.as_dict()}


def load_sources(cfg: DataConfig) -> list[list[Shard]]:
    if not cfg.train:
        raise DataSourceError("data.train: no training shards given")
    return [resolve_spec(spec, cfg.samples_per_shard) for spec in cfg.train]


def epoch_order(sources: list[list[Shard]], seed: int, epoch: int) -> list[Shard]:
    """Every shard of every source, in the order of epoch `epoch` (shuffled by seed and epoch)."""
    shards = [s for source in sources for s in source]
    seeded_rng(seed, "epoch", epoch).shuffle(shards)
    return shards


def epoch_tasks(order: list[Shard], seed: int, epoch: int, rank: int, world: int, worker: int,
                workers: int) -> list[ShardTask]:
    """A worker's shards in epoch mode: the epoch's order dealt to ranks, then to workers
    (split_by_node, then split_by_worker, explicitly)."""
    return [ShardTask(s.url, s.samples, (seed, epoch, rank, worker, place))
            for place, s in enumerate(order[rank::world][worker::workers])]


def batches_per_epoch(sources: list[list[Shard]], world: int, workers: int, batch_size: int, seed: int = 0,
                      epoch: int = 0, train_fraction: float = 1.0) -> int:
    """The number of batches every rank yields in epoch mode: the least over ranks of the
    full batches its workers can make from the manifests' sample counts (of them, the
    data.train_fraction that trains)."""
    shards = [s for source in sources for s in source]
    unknown = [s.url for s in shards if s.samples is None]
    if unknown:
        raise DataSourceError(f"epoch mode needs per-shard sample counts: {unknown[0]} has no manifest; "
                              "set data.samples_per_shard or use data.mode=resampled")
    workers = max(workers, 1)
    if len(shards) < world * workers:
        raise DataSourceError(f"{counted(len(shards), 'shard')} cannot feed {counted(world, 'rank')} x "
                              f"{counted(workers, 'worker')} in epoch mode; write more, smaller shards, lower "
                              "data.workers, or use data.mode=resampled")
    order = epoch_order(sources, seed, epoch)
    kept = SampleSelection(train_fraction).kept_samples
    samples = [[sum(kept(s.samples) for s in order[rank::world][w::workers]) for w in range(workers)]
               for rank in range(world)]
    per_rank = [sum(n // batch_size for n in mine) for mine in samples]
    if min(per_rank) == 0:
        rank = per_rank.index(0)
        raise DataSourceError(f"data.batch_size={batch_size} per rank: rank {rank} of {world} gets "
                              f"{sum(samples[rank])} samples per epoch ({samples[rank]} over its {workers} DataLoader "
                              "workers), and no worker can fill one batch; lower data.batch_size or data.workers, or "
                              "add data")
    return min(per_rank)


@dataclass(frozen=True)
class Redeal:
    """The rest of an interrupted epoch on a new number of ranks (`redeal`)."""

    streams: list[dict]  # one `TrainStream.state_dict()` per new rank
    samples: int  # samples of the epoch not yet trained on
    dropped: int  # of them, left out so that every rank makes the same number of batches


def redeal(old: list[dict], sources: list[list[Shard]], seed: int, cfg: DataConfig, world: int) -> Redeal:
    """Deal what an epoch interrupted on len(old) ranks has left to `world` ranks x
    cfg.workers workers, so that over the old and the new ranks every sample of the epoch
    is read once.

    old: each old rank's saved stream (`TrainStream.state_dict()`). What each old worker had
    left (`_unread_tasks`) is dealt largest first to the least loaded new (rank, worker);
    every rank then makes the least number of batches over ranks. Left out by design, as in
    any epoch: each worker's last partial batch and a rank's batches beyond that least
    (`dropped`). Skip counts carry over to new rank 0. Resampled streams restart with fresh
    draws.
    """
    states = [StreamState.from_dict(d["stream"]) for d in old]
    counts = SkipCounts()
    for d in old:
        counts.add(SkipCounts.from_dict(d["counts"]))
    epoch = states[0].epoch
    if any(st.epoch != epoch for st in states):
        raise DataError(f"the saved streams are in different epochs ({sorted({st.epoch for st in states})})")
    workers = max(cfg.workers, 1)

    def streams(new_states: list[StreamState]) -> list[dict]:
        return [{"stream": st.as_dict(), "counts": (counts if r == 0 else SkipCounts()).as_dict()}
                for r, st in enumerate(new_states)]

    next_epoch = streams([StreamState(epoch=epoch + 1, workers=cfg.workers) for _ in range(world)])
    if cfg.mode == "resampled":
        return Redeal(next_epoch, 0, 0)
    kept = SampleSelection(cfg.train_fraction).kept_samples

    def left(task: ShardTask) -> int:  # samples of the task still to train (kept ones, pro rata)
        n = task.samples or 0
        return kept(n) * max(n - task.start, 0) // n if n else 0

    load, dealt = [0] * (world * workers), [[] for _ in range(world * workers)]
    least = [(0, slot) for slot in range(len(load))]  # a heap of (load, slot): the least loaded first
    for task in sorted(_unread_tasks(states, sources, seed, cfg), key=lambda t: (-left(t), t.url, t.start)):
        _, slot = heapq.heappop(least)
        dealt[slot].append(task)
        load[slot] += left(task)
        heapq.heappush(least, (load[slot], slot))
    # Slot i is worker i // world of rank i % world: the largest shards go to different ranks first.
    limit = min(sum(load[w * world + r] // cfg.batch_size for w in range(workers)) for r in range(world))
    total = sum(load)
    if limit == 0:  # too little left for a batch on every rank: the epoch ends here
        return Redeal(next_epoch, total, total)
    new_states = [StreamState(epoch=epoch, workers=cfg.workers, limit=limit,
                              tasks={w: dealt[w * world + r] for w in range(workers)}) for r in range(world)]
    return Redeal(streams(new_states), total, total - limit * cfg.batch_size * world)


def _unread_tasks(states: list[StreamState], sources: list[list[Shard]], seed: int, cfg: DataConfig
                  ) -> list[ShardTask]:
    """What the old ranks' workers had not read of their epoch: each old worker's tasks
    recomputed (or read, for an epoch already re-dealt) and cut at its saved position; the shard
    it was reading goes on from the raw sample after its last batch (with the same window
    shuffle, so exactly the samples it had not batched), the shards after it whole. A rank that
    had finished the epoch contributes nothing: what it did not read is its drop."""
    epoch, world = states[0].epoch, len(states)
    order = epoch_order(sources, seed, epoch)
    full_epoch = {}  # old workers -> batches each old rank made in a whole epoch
    rest: list[ShardTask] = []
    for rank, st in enumerate(states):
        old_workers = max(st.workers or cfg.workers, 1)
        if st.tasks is None and old_workers not in full_epoch:
            full_epoch[old_workers] = batches_per_epoch(sources, world, old_workers, cfg.batch_size, seed, epoch,
                                                        cfg.train_fraction)
        if st.batches >= (st.limit if st.tasks is not None else full_epoch[old_workers]):
            continue
        for worker in range(old_workers):
            tasks = (st.tasks.get(worker, []) if st.tasks is not None
                     else epoch_tasks(order, seed, epoch, rank, world, worker, old_workers))
            place, consumed = st.positions.get(worker, (0, None))
            if place < len(tasks):
                start = tasks[place].start if consumed is None else consumed
                rest += [dataclasses.replace(tasks[place], start=start), *tasks[place + 1:]]
    return rest


def _worker_init(ignore_signals: tuple[str, ...], rank_pid: int, _worker_id: int) -> None:
    """A DataLoader worker ignores the rank's stop signals (data/worker_signals.py does the same
    for the fork server, and for workers from its start), and ends when the rank does: torch's
    own watchdog watches the worker's parent, which is the fork server, and the fork server
    lives on while any worker holds its pipe, so a rank killed with SIGKILL left both behind."""
    for name in ignore_signals:
        signal.signal(getattr(signal, name), signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=(rank_pid,), name="exit-with-rank", daemon=True).start()


def _exit_with(pid: int) -> None:
    """Return never: exit this process once process `pid` has ended."""
    try:
        select.select([os.pidfd_open(pid)], [], [])  # readable when the process ends (Linux >= 5.3)
    except (AttributeError, OSError):  # no pidfd here: look every second
        while True:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(1)
    os._exit(0)


def modules_of(obj: object, depth: int = 2) -> list[str]:
    """The modules of `obj`'s class and of its attributes' classes, `depth` levels down: what a
    worker imports to unpickle it (the decoder's tokenizer brings transformers, about a second)."""
    found = [type(obj).__module__]
    if depth and hasattr(obj, "__dict__"):
        for value in vars(obj).values():
            found += modules_of(value, depth - 1)
    return list(dict.fromkeys(m for m in found if m not in ("builtins", "__main__")))


def worker_context(ignore_signals: tuple[str, ...], preload: list[str]):
    """The fork server that DataLoader workers start from: a fresh, single-threaded process
    with the reader's modules and `preload` imported once (so that a worker, started again each
    epoch, starts in milliseconds), which ignores `ignore_signals` from its start, and so do
    the workers it forks (data/worker_signals.py)."""
    import multiprocessing

    os.environ[IGNORED_SIGNALS] = f"{os.getpid()}:{','.join(ignore_signals)}"
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["alignvl_scale.data.worker_signals", "alignvl_scale.data.reader", *preload])
    return context


class TrainStream:
    """One rank's view for the trainer: equal-length epochs, exact resume position, skip
    counts, and the stop rule for bad data."""

    def __init__(self, cfg: DataConfig, decode, rank: int, world: int, seed: int,
                 ignore_signals: tuple[str, ...] = ()) -> None:
        """ignore_signals: signals the DataLoader workers ignore (train.stop_signals: a
        launcher that signals the whole process group must not kill them mid-batch)."""
        self.cfg, self.decode, self.rank, self.world, self.seed = cfg, decode, rank, world, seed
        self.ignore_signals = ignore_signals
        self.sources = load_sources(cfg)
        self.state = StreamState(workers=cfg.workers)
        self.counts = SkipCounts()
        self.batches_per_epoch = None if cfg.mode == "resampled" else batches_per_epoch(
            self.sources, world, cfg.workers, cfg.batch_size, seed, train_fraction=cfg.train_fraction)

    def state_dict(self) -> dict:
        return {"stream": self.state.as_dict(), "counts": self.counts.as_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.state = StreamState.from_dict(d["stream"])
        self.counts = SkipCounts.from_dict(d["counts"])

    def load_resharded(self, old: list[dict], _step: int) -> str:
        """The saved streams of another number of ranks: the rest of their epoch re-dealt to
        this world (`redeal`). Returns the line for the resume note."""
        dealt = redeal(old, self.sources, self.seed, self.cfg, self.world)
        self.load_state_dict(dealt.streams[self.rank])
        epoch = self.state.epoch
        if self.state.tasks is None:
            return (f"{dealt.samples} samples were left in the epoch, too few for a batch on every rank: epoch {epoch} "
                    "starts")
        return (f"the rest of the epoch ({dealt.samples} samples) re-dealt to {counted(self.world, 'rank')}: "
                f"{self.epoch_batches()} batches each in epoch {epoch}, {dealt.dropped} left out")

    def mark(self) -> tuple[StreamState, SkipCounts]:
        """Where the stream stands now, to `rewind` to; cheap enough for every step (the
        re-dealt tasks, which no read changes, are shared, not copied)."""
        return (dataclasses.replace(self.state, positions=dict(self.state.positions)),
                dataclasses.replace(self.counts, skipped=Counter(self.counts.skipped)))

    def rewind(self, mark: tuple[StreamState, SkipCounts]) -> None:
        self.state, self.counts = mark

    def _check_skips(self, shard: str) -> None:
        if (self.counts.total >= self.cfg.skip_check_min_samples
                and self.counts.skip_fraction > self.cfg.max_skip_fraction):
            raise DataError(f"rank {self.rank}: {self.counts.skip_fraction:.1%} of {self.counts.total} samples "
                            f"skipped (limit data.max_skip_fraction={self.cfg.max_skip_fraction}), last in {shard}; "
                            f"reasons {dict(self.counts.skipped)}")

    def epoch_batches(self) -> int | None:
        """Batches every rank makes in this epoch (None: resampled, no end)."""
        return self.state.limit if self.state.tasks is not None else self.batches_per_epoch

    def epoch_done(self) -> bool:
        limit = self.epoch_batches()
        return limit is not None and self.state.batches >= limit


    def __iter__(self) -> Iterator[dict]:
        """Batches of the current epoch from the saved position on (resampled mode: for
        ever). The trainer calls `next_epoch` once all ranks agree the epoch is over."""
        if self.epoch_done():
            return
        dataset = ShardStream(self.sources, self.cfg.train_weights, self.cfg, self.decode, self.rank, self.world,
                              self.seed, self.state)
        # Its own generator: drawing worker seeds from the global RNG would shift dropout after a resume.
        generator = torch.Generator().manual_seed(hash((self.seed, self.rank, self.state.epoch)) % 2**62)
        # Pinned batches: the trainer's non_blocking copies then overlap the step on a GPU. Workers come
        # from a fork server: a fork of the trainer itself (threads of TensorBoard, tqdm, the process
        # group, the previous epoch's queues) deadlocked in the child now and then (seen: 1 in ~200).
        loader = DataLoader(dataset, batch_size=None, num_workers=self.cfg.workers, generator=generator,
                            persistent_workers=False, prefetch_factor=2 if self.cfg.workers else None,
                            pin_memory=torch.cuda.is_available(),
                            multiprocessing_context=self._worker_context() if self.cfg.workers else None,
                            worker_init_fn=functools.partial(_worker_init, self.ignore_signals, os.getpid()))
        for item in loader:
            self.state.positions[item["worker"]] = tuple(item["position"])
            self.state.items += 1
            self.counts.add(SkipCounts.from_dict(item["counts"]))
            self._check_skips(item["shard"])
            if item["batch"] is None:
                continue
            self.state.batches += 1
            yield item["batch"]
            if self.epoch_done():
                return

    def _worker_context(self):
        urls = [shard.url for source in self.sources for shard in source]
        return worker_context(self.ignore_signals, modules_of(self.decode) + reader_modules(urls))

    def next_epoch(self) -> None:
        self.state = StreamState(epoch=self.state.epoch + 1, workers=self.cfg.workers)
