"""Data streams fixed at launch: the global batch of a step as a function of (seed, epoch,
step) alone, whatever the number of ranks that reads it (docs/design.md, "Data streams").

A run reads its shards through `data.streams` = S streams. Stream s reads its own sequence
of shard pieces with its own window shuffle (epoch mode: the s-th of S equal spans of the
epoch's samples, `EpochDeal`; resampled mode: its own endless weighted draw of shards), and
gives every micro-batch the same share of b = global micro-batch / S samples, in stream
order:

    global micro-batch = [stream 0's b samples, stream 1's b, ..., stream S-1's b]

Rank r of W serves the k = S / W streams r k .. (r + 1) k - 1, so the ranks' batches,
gathered in rank order, are the global micro-batch in that same order on any W that divides
S. A rank's DataLoader workers split its streams (worker j: its j-th, (j + w)-th, ...); each
worker hands one item per micro-batch holding its streams' shares, and the rank puts the
shares back in stream order (`RankBatches`). A stream's position (shard place, raw samples
read) is its own, so a checkpoint's positions continue on any such world.

Every row of a micro-batch has a key that no world changes, `RowKeys`: (epoch, the
micro-batch's index in it, the row's stream and place in the stream's share). The head's
randomness is drawn from generators seeded by it (model/head.py).
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch

from alignvl_scale.config import ConfigError, UserError, counted
from alignvl_scale.data.shards import DataSourceError, Shard

MAX_DEFAULT_STREAMS = 64  # each stream holds a shard open and a shuffle window: per rank k of them


class DataError(UserError):
    """The data cannot be trained on (too many bad samples, too few shards)."""


def kept_samples(train_fraction: float, n: int) -> int:
    """How many of a shard's n samples train (data.train_fraction): what epoch lengths are computed from."""
    return n if train_fraction >= 1 else round(train_fraction * n)


def seeded_rng(*parts: object) -> random.Random:
    return random.Random(":".join(map(str, parts)))


@dataclass(frozen=True)
class ShardTask:
    """One piece of a shard as one stream reads it in one epoch: its samples first..stop-1
    (counted among the shard's kept samples, in tar order; stop None: to the shard's end),
    the parts its window shuffle is seeded from, and the samples of the piece already read
    (a piece re-dealt mid-epoch: the new reader replays the same shuffle and skips them)."""

    url: str
    samples: int | None  # the manifest's count
    rng: tuple
    start: int = 0
    first: int = 0
    stop: int | None = None

    def as_list(self) -> list:
        return [self.url, self.samples, list(self.rng), self.start, self.first, self.stop]

    @classmethod
    def from_list(cls, x: list) -> ShardTask:
        return cls(x[0], x[1], tuple(x[2]), *x[3:])  # a whole-shard task of format 2: [url, samples, rng, start]


@dataclass(frozen=True)
class RowKeys:
    """Which rows of the global micro-batch a rank's batch holds: `count` streams' equal
    shares from stream `first_stream` on, in stream order, in micro-batch `index` of `epoch`.
    What the head seeds its noise, dropout and mixup with, so a sample gets the same draws on
    any rank."""

    epoch: int
    index: int
    first_stream: int
    count: int

    def streams(self) -> range:
        return range(self.first_stream, self.first_stream + self.count)


def global_micro_batch(batch_size: int, world: int) -> int:
    return batch_size * world


def default_streams(global_micro: int, world: int, even_share: bool) -> int:
    """data.streams when the config leaves it null: the largest count, up to
    max(MAX_DEFAULT_STREAMS, world), that this world divides and that divides the global
    micro-batch (into even shares where mixup pairs rows within a share). Streams split an
    epoch by samples, not shards (`EpochDeal`), so a small data set takes as many as a large
    one: a power of two global batch gets a power of two up to 64, and every world from 1 to
    64 that its batch allows resumes it."""
    cap = max(MAX_DEFAULT_STREAMS, world)
    fits = [s for s in range(world, cap + 1, world)
            if global_micro % s == 0 and not (even_share and (global_micro // s) % 2)]
    return max(fits, default=world)


def dividing_worlds(streams: int) -> list[int]:
    return [w for w in range(1, streams + 1) if streams % w == 0]


def check_streams(streams: int, world: int, global_micro: int, even_share: bool, key: str = "data.streams") -> None:
    """One line naming what does not fit: the world (with the worlds that do), the global
    micro-batch, or an odd share under fusemix."""
    if streams < 1:
        raise ConfigError(f"{key}={streams}: must be >= 1")
    if streams % world:
        raise ConfigError(f"{key}={streams}: {counted(world, 'rank')} cannot share {counted(streams, 'stream')} "
                          f"evenly; the worlds that can: {', '.join(map(str, dividing_worlds(streams)))} (a run keeps "
                          "its streams across resumes: resume on one of these)")
    if global_micro % streams:
        raise ConfigError(f"{key}={streams}: the global micro-batch of {global_micro} samples (data.batch_size x "
                          f"ranks) is not a whole number of samples per stream")
    if even_share and (global_micro // streams) % 2:
        raise ConfigError(f"{key}={streams}: each stream's share of {global_micro // streams} samples must be even "
                          "with model.mixup fusemix (it mixes the share's two halves)")


def epoch_order(sources: list[list[Shard]], seed: int, epoch: int) -> list[Shard]:
    """Every shard of every source, in the order of epoch `epoch` (shuffled by seed and epoch)."""
    shards = [s for source in sources for s in source]
    seeded_rng(seed, "epoch", epoch).shuffle(shards)
    return shards


@dataclass(frozen=True)
class EpochDeal:
    """How an epoch's samples are split among the streams (epoch mode). The epoch's order is
    a sequence of samples: its shuffled shards (`epoch_order`) one after another, each as
    many kept samples as its manifest counts. Every epoch makes `batches` = ceil(samples /
    global micro-batch) micro-batches, so each stream reads a span of batches x share
    samples: stream s the s-th span of the sequence, wrapped around at its end. The wrap
    pads the last global micro-batch with the epoch's first `padded` samples, which that
    epoch then trains twice (fewer than one global micro-batch); every other sample trains
    exactly once per epoch, on any number of streams and ranks. A stream that skips bad
    samples reads its span again from its start to fill its last shares (`StreamShares`),
    so an epoch's length never depends on its data's faults."""

    samples: int
    streams: int
    share: int

    @property
    def batches(self) -> int:
        return math.ceil(self.samples / (self.streams * self.share))

    @property
    def span(self) -> int:
        return self.batches * self.share

    @property
    def padded(self) -> int:
        return self.streams * self.span - self.samples

    def describe(self) -> str:
        return (f"epoch: {counted(self.samples, 'sample')} over {counted(self.streams, 'data stream')} of "
                f"{self.share} per micro-batch = {counted(self.batches, 'micro-batch', 'micro-batches')}, "
                f"{self.padded} padded with the epoch's first samples")


def kept_counts(shards: list[Shard], train_fraction: float) -> list[int]:
    """Each shard's kept samples (its manifest count); refused where one has no manifest."""
    unknown = [s.url for s in shards if s.samples is None]
    if unknown:
        raise DataSourceError(f"epoch mode needs per-shard sample counts: {unknown[0]} has no manifest; "
                              "set data.samples_per_shard or use data.mode=resampled")
    return [kept_samples(train_fraction, s.samples) for s in shards]


def epoch_deal(sources: list[list[Shard]], streams: int, global_micro: int, train_fraction: float = 1.0) -> EpochDeal:
    """The epoch's split for these sources, streams and global micro-batch (`EpochDeal`): the
    same for every epoch, since a shuffle changes the order of the shards, not their counts."""
    total = sum(kept_counts([s for source in sources for s in source], train_fraction))
    if total < global_micro:  # the padding would put a sample beside itself as its own negative
        raise DataSourceError(f"the global micro-batch of {global_micro} samples (data.batch_size x ranks) is larger "
                              f"than the data: {total} samples per epoch; lower data.batch_size, or add data")
    return EpochDeal(total, streams, global_micro // streams)


def epoch_stream_tasks(order: list[Shard], seed: int, epoch: int, stream: int, deal: EpochDeal,
                       train_fraction: float = 1.0) -> list[ShardTask]:
    """Stream `stream`'s pieces of shards in epoch mode: its span of the epoch's sequence of
    samples (`EpochDeal`), in order; the first and last piece may begin or end inside a shard."""
    counts = kept_counts(order, train_fraction)
    begins = list(itertools.accumulate(counts, initial=0))[:-1]
    tasks, at, end = [], stream * deal.span, (stream + 1) * deal.span
    while at < end:
        offset = at % deal.samples
        k = bisect.bisect_right(begins, offset) - 1  # the shard holding it (an empty one never does)
        first = offset - begins[k]
        stop = min(counts[k], first + end - at)
        tasks.append(ShardTask(order[k].url, order[k].samples, (seed, epoch, "stream", stream, len(tasks)), 0, first,
                               stop))
        at += stop - first
    return tasks


def resampled_stream_tasks(sources: list[list[Shard]], weights: list[float] | None, seed: int, epoch: int,
                           stream: int) -> Iterator[ShardTask]:
    """Stream `stream`'s endless draw in resampled mode: a source by weight, then a shard uniformly."""
    rng = seeded_rng(seed, "resampled", epoch, "stream", stream)
    for place in itertools.count():
        source = rng.choices(range(len(sources)), weights=weights)[0]
        shard = rng.choice(sources[source])
        yield ShardTask(shard.url, shard.samples, (seed, epoch, "stream", stream, place))


class RankBatches:
    """A rank's micro-batches from its DataLoader's items: each worker hands one item per
    micro-batch with its streams' shares (or count-only items: skips with no batch yet);
    this takes the next item of every worker, in each worker's order, and lays the shares
    out in stream order. Items are applied (positions, counts) only when used, so a
    checkpoint never holds a position past what was trained."""

    def __init__(self, items: Iterator[dict], workers: int, apply) -> None:
        """apply(item): the item's positions and counts into the rank's state."""
        self.items, self.queues, self.apply = items, [deque() for _ in range(workers)], apply

    def _next_of(self, worker: int) -> dict | None:
        """Worker `worker`'s next batch item (its count-only items on the way applied), or
        None once the DataLoader has nothing more."""
        while True:
            while not self.queues[worker]:
                item = next(self.items, None)
                if item is None:
                    return None
                self.queues[item["worker"]].append(item)
            item = self.queues[worker].popleft()
            self.apply(item)
            if item["batch"] is not None:
                return item

    def next_batch(self) -> dict | None:
        parts = []
        for worker in range(len(self.queues)):
            item = self._next_of(worker)
            if item is None:
                return None
            parts.append(item["batch"])
        return in_stream_order(parts)


def in_stream_order(parts: list[dict]) -> dict:
    """One batch from the workers' items: worker j holds shares j, j + w, ... of the rank's
    streams (its `shares` rows each); the result holds them as share 0, 1, 2, ..."""
    if len(parts) == 1:
        return parts[0]
    share = parts[0]["share"]
    order = []  # (worker, first row of the share in its item), share by share
    for place in range(sum(len(p["keys"]) for p in parts) // share):
        worker, nth = place % len(parts), place // len(parts)
        order.append((worker, nth * share))
    out = {}
    for name, value in parts[0].items():
        if torch.is_tensor(value):
            out[name] = torch.cat([parts[w][name][row:row + share] for w, row in order])
        elif isinstance(value, list):
            out[name] = [x for w, row in order for x in parts[w][name][row:row + share]]
        else:
            out[name] = value
    return out


@dataclass
class StreamState:
    """Where a rank's streams stand; saved in every checkpoint (JSON-able). Positions are by
    stream, not by rank: the union of every rank's is the run's, on any world."""

    epoch: int = 0
    batches: int = 0  # micro-batches handed to the trainer in this epoch
    streams: int = 1  # the streams this epoch is read by (data.streams; an old checkpoint's re-deal: its world)
    positions: dict[int, tuple[int, int]] = field(default_factory=dict)  # stream -> (task place, raw consumed)
    # An epoch of an old checkpoint re-dealt (data/redeal.py): each stream's tasks and the micro-batches it makes.
    tasks: dict[int, list[ShardTask]] | None = None
    limit: int | None = None

    FORMAT = 3  # 1 (no "format"): per rank and DataLoader worker, before data streams; 2: streams of whole shards

    def as_dict(self) -> dict:
        out = {"format": self.FORMAT, "epoch": self.epoch, "batches": self.batches, "streams": self.streams,
               "positions": {str(s): list(p) for s, p in self.positions.items()}}
        if self.tasks is not None:
            out.update(limit=self.limit, tasks={str(s): [t.as_list() for t in ts] for s, ts in self.tasks.items()})
        return out

    @classmethod
    def from_dict(cls, d: dict) -> StreamState:
        tasks = d.get("tasks")
        return cls(d["epoch"], d["batches"], d["streams"], {int(s): (p[0], p[1]) for s, p in d["positions"].items()},
                   None if tasks is None else {int(s): [ShardTask.from_list(t) for t in ts] for s, ts in tasks.items()},
                   d.get("limit"))

    @staticmethod
    def is_legacy(d: dict) -> bool:
        return "format" not in d

    @staticmethod
    def deals_whole_shards(d: dict) -> bool:
        """Saved by streams of whole shards (format 2): its positions are in another deal's pieces."""
        return d.get("format") == 2


def merged(states: list[StreamState]) -> tuple[dict[int, tuple[int, int]], dict[int, list[ShardTask]] | None]:
    """Every stream's position (and re-dealt tasks) from the ranks that saved them: each from
    the rank that served it (`states[r]` is old rank r's; its own streams are r k .. r k + k - 1)."""
    per_rank = states[0].streams // len(states)

    def own(rank: int, items: dict) -> dict:
        return {s: x for s, x in items.items() if s // per_rank == rank}

    positions = {s: p for rank, st in enumerate(states) for s, p in own(rank, st.positions).items()}
    tasks = None if states[0].tasks is None else {
        s: t for rank, st in enumerate(states) for s, t in own(rank, st.tasks).items()}
    return positions, tasks
