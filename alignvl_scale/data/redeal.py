"""The rest of an epoch re-dealt, when a checkpoint's positions cannot continue as they are:
a checkpoint written before data streams (state format 1: each rank's DataLoader workers
read their own shard sequence, so their positions mean nothing to another layout), one
written by streams of whole shards (format 2: its positions are in another deal's pieces),
or a resume that sets another data.streams (so that a world that does not divide the old count
can go on). Every unread sample of the epoch is read once over the old and the new ranks,
in other global batches than an uninterrupted run's (some left out so that every rank makes
the same number); the next epoch is read by the run's data streams (data/streams.py)."""

from __future__ import annotations

import dataclasses
import functools
import heapq

from alignvl_scale.config import DataConfig
from alignvl_scale.data.samples import SkipCounts
from alignvl_scale.data.shards import Shard
from alignvl_scale.data.streams import (
    DataError,
    ShardTask,
    StreamState,
    epoch_deal,
    epoch_order,
    epoch_stream_tasks,
    kept_samples,
    merged,
)


@dataclasses.dataclass(frozen=True)
class OldRank:
    """One old rank's saved stream (format 1)."""

    epoch: int
    batches: int
    positions: dict[int, tuple[int, int]]  # worker -> (task place, raw consumed)
    workers: int | None
    tasks: dict[int, list[ShardTask]] | None
    limit: int | None

    @classmethod
    def from_dict(cls, d: dict) -> OldRank:
        tasks = d.get("tasks")
        return cls(d["epoch"], d["batches"], {int(w): (p[0], p[1]) for w, p in d["positions"].items()},
                   d.get("workers"),
                   None if tasks is None else {int(w): [ShardTask.from_list(t) for t in ts] for w, ts in tasks.items()},
                   d.get("limit"))


@dataclasses.dataclass(frozen=True)
class Redeal:
    """The rest of an interrupted epoch on a new number of ranks (`redeal`)."""

    states: list[StreamState]  # one per new rank
    counts: SkipCounts  # the old ranks' skip counts, summed (they carry over to new rank 0)
    samples: int  # samples of the epoch not yet trained on
    dropped: int  # of them, left out so that every rank makes the same number of batches

    def line(self, why: str, world: int, epoch_batches: int | None) -> str:
        epoch = self.states[0].epoch
        if self.states[0].tasks is None:
            return (f"{why}: {self.samples} samples were left in the epoch, too few for a batch on every rank: "
                    f"epoch {epoch} starts")
        return (f"{why}: the rest of epoch {epoch} ({self.samples} samples) re-dealt to {world} ranks, "
                f"{epoch_batches} batches each, {self.dropped} left out; the next epoch is read by data streams")


def redeal(old: list[dict], sources: list[list[Shard]], seed: int, cfg: DataConfig, world: int, streams: int
           ) -> Redeal:
    """Deal what an epoch interrupted on len(old) ranks has left to `world` ranks, one
    stream each, so that over the old and the new ranks every sample of the epoch is read
    once. old: each old rank's saved `{"stream": ..., "counts": ...}` (format 1, or 2 with
    another data.streams); `streams`: the run's data.streams from now on.

    What each old worker or stream had left (`_unread_tasks`, `_unread_streams`) is dealt
    largest first to the least loaded new rank; every rank then makes the least number of
    batches over ranks. Left out by design, as in any epoch: each rank's last partial batch
    and its batches beyond that least (`dropped`). Resampled streams restart with fresh draws."""
    counts = SkipCounts()
    for d in old:
        counts.add(SkipCounts.from_dict(d["counts"]))
    epochs = {d["stream"]["epoch"] for d in old}
    if len(epochs) > 1:
        raise DataError(f"the saved streams are in different epochs ({sorted(epochs)})")
    epoch = epochs.pop()
    next_epoch = [StreamState(epoch=epoch + 1, streams=streams) for _ in range(world)]
    if cfg.mode == "resampled":
        return Redeal(next_epoch, counts, 0, 0)
    kept = functools.partial(kept_samples, cfg.train_fraction)

    def left(task: ShardTask) -> int:  # samples of the task still to train (kept ones; whole shards: pro rata)
        if task.stop is not None:
            return max(task.stop - task.first - task.start, 0)
        n = task.samples or 0
        return kept(n) * max(n - task.start, 0) // n if n else 0

    load, dealt = [0] * world, [[] for _ in range(world)]
    least = [(0, rank) for rank in range(world)]  # a heap of (load, rank): the least loaded first
    if StreamState.is_legacy(old[0]["stream"]):
        old_batch = cfg.batch_size * world // len(old)  # the same global batch (data.global_batch_size)
        unread = _unread_tasks([OldRank.from_dict(d["stream"]) for d in old], sources, seed, cfg, old_batch)
    else:
        unread = _unread_streams([StreamState.from_dict(d["stream"]) for d in old], sources, seed, cfg,
                                 cfg.batch_size * world, StreamState.deals_whole_shards(old[0]["stream"]))
    for task in sorted(unread, key=lambda t: (-left(t), t.url, t.start)):
        _, rank = heapq.heappop(least)
        dealt[rank].append(task)
        load[rank] += left(task)
        heapq.heappush(least, (load[rank], rank))
    limit, total = min(n // cfg.batch_size for n in load), sum(load)
    if limit == 0:  # too little left for a batch on every rank: the epoch ends here
        return Redeal(next_epoch, counts, total, total)
    new = [StreamState(epoch=epoch, streams=world, limit=limit, tasks={rank: dealt[rank]}) for rank in range(world)]
    return Redeal(new, counts, total, total - limit * cfg.batch_size * world)


def old_epoch_tasks(order: list[Shard], seed: int, epoch: int, rank: int, world: int, worker: int,
                    workers: int) -> list[ShardTask]:
    """A worker's shards in an old checkpoint's epoch: the epoch's order dealt to ranks,
    then to workers."""
    return [ShardTask(s.url, s.samples, (seed, epoch, rank, worker, place))
            for place, s in enumerate(order[rank::world][worker::workers])]


def old_batches_per_epoch(order: list[Shard], world: int, workers: int, batch_size: int, kept) -> int:
    """The batches every old rank made in a whole epoch."""
    samples = [[sum(kept(s.samples) for s in order[rank::world][w::workers]) for w in range(workers)]
               for rank in range(world)]
    return min(sum(n // batch_size for n in mine) for mine in samples)


def _unread_tasks(states: list[OldRank], sources: list[list[Shard]], seed: int, cfg: DataConfig, old_batch: int
                  ) -> list[ShardTask]:
    """What the old ranks' workers had not read of their epoch: each old worker's tasks
    recomputed (or read, for an epoch already re-dealt) and cut at its saved position; the shard
    it was reading goes on from the raw sample after its last batch (with the same window
    shuffle, so exactly the samples it had not batched), the shards after it whole. A rank that
    had finished the epoch contributes nothing: what it did not read is its drop."""
    epoch, world = states[0].epoch, len(states)
    order = epoch_order(sources, seed, epoch)
    kept = functools.partial(kept_samples, cfg.train_fraction)
    rest: list[ShardTask] = []
    for rank, st in enumerate(states):
        old_workers = max(st.workers or cfg.workers, 1)
        whole = st.limit if st.tasks is not None else old_batches_per_epoch(order, world, old_workers, old_batch,
                                                                            kept)
        if st.batches >= whole:
            continue
        for worker in range(old_workers):
            tasks = (st.tasks.get(worker, []) if st.tasks is not None
                     else old_epoch_tasks(order, seed, epoch, rank, world, worker, old_workers))
            place, consumed = st.positions.get(worker, (0, None))
            if place < len(tasks):
                start = tasks[place].start if consumed is None else consumed
                rest += [dataclasses.replace(tasks[place], start=start), *tasks[place + 1:]]
    return rest


def whole_shard_stream_tasks(order: list[Shard], seed: int, epoch: int, stream: int, streams: int
                             ) -> list[ShardTask]:
    """A stream's shards in a checkpoint of streams of whole shards (format 2): the epoch's
    order dealt round robin."""
    return [ShardTask(s.url, s.samples, (seed, epoch, "stream", stream, place))
            for place, s in enumerate(order[stream::streams])]


def whole_shard_batches(order: list[Shard], streams: int, global_micro: int, kept) -> int:
    """The micro-batches an epoch of streams of whole shards made: its shortest stream's."""
    share = global_micro // streams
    return min(sum(kept(s.samples) for s in order[stream::streams]) // share for stream in range(streams))


def _unread_streams(states: list[StreamState], sources: list[list[Shard]], seed: int, cfg: DataConfig,
                    global_micro: int, whole_shards: bool) -> list[ShardTask]:
    """What the old data streams had not read of their epoch: each stream's tasks cut at its
    saved position (the union of every old rank's); nothing once the epoch was done.
    whole_shards: the streams read whole shards (format 2), else spans of samples."""
    first = states[0]
    positions, tasks = merged(states)
    order = epoch_order(sources, seed, first.epoch)
    kept = functools.partial(kept_samples, cfg.train_fraction)
    deal = epoch_deal(sources, first.streams, global_micro, cfg.train_fraction)
    whole = (first.limit if tasks is not None else whole_shard_batches(order, first.streams, global_micro, kept)
             if whole_shards else deal.batches)
    if first.batches >= whole:
        return []
    rest: list[ShardTask] = []
    for stream in range(first.streams):
        mine = (tasks.get(stream, []) if tasks is not None
                else whole_shard_stream_tasks(order, seed, first.epoch, stream, first.streams) if whole_shards
                else epoch_stream_tasks(order, seed, first.epoch, stream, deal, cfg.train_fraction))
        place, consumed = positions.get(stream, (0, None))
        if place < len(mine):
            start = mine[place].start if consumed is None else consumed
            rest += [dataclasses.replace(mine[place], start=start), *mine[place + 1:]]
    return rest
