"""The training reader: WebDataset tar shards -> per-rank micro-batches, built for many ranks.

A run reads its shards through data streams fixed at launch (data/streams.py): each stream
a deterministic sequence of shard pieces (epoch mode: its span of the epoch's samples) and
its share of every micro-batch, a rank k = streams / world of them, split among its
DataLoader workers. Inside a piece, samples are shuffled in a window by an RNG seeded by
(seed, epoch, stream, place in the sequence), then decoded (`samples.py`, which also parses
the tar), transformed, tokenized and batched in the worker. An item carries its streams'
positions (place in the sequence, samples of that piece consumed) and its skip counts, so
the main process knows exactly what was consumed: a resumed stream skips precisely that,
without decoding it, on whichever rank now serves it.

Every rank yields the same number of micro-batches per epoch (`EpochDeal`, from the
manifests' per-shard counts): a stream whose skipped samples leave it short reads its span
again. Should one still run dry (a span with no usable sample), the trainer agrees on "any
rank out of data" each step, so no rank ever waits in a collective that the others left.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import os
import random
import select
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

from alignvl_scale.config import DataConfig, DecodeLimits, counted
from alignvl_scale.data.redeal import redeal
from alignvl_scale.data.remote import is_remote, prefetch, reader_modules
from alignvl_scale.data.samples import (
    CAPTION_MEMBERS,
    SKIP_REASONS,
    RawSample,
    SkipCounts,
    SkipSample,
    decode_captions,
    decode_features,
    decode_image,
    fetched_range,
    raw_samples,
)
from alignvl_scale.data.shards import DataSourceError, Shard, resolve_spec
from alignvl_scale.data.streams import (
    DataError,
    EpochDeal,
    RankBatches,
    RowKeys,
    ShardTask,
    StreamState,
    check_streams,
    default_streams,
    epoch_deal,
    epoch_order,
    epoch_stream_tasks,
    global_micro_batch,
    kept_samples,
    merged,
    resampled_stream_tasks,
    seeded_rng,
)
from alignvl_scale.data.transforms import random_resized_crop
from alignvl_scale.data.worker_signals import IGNORED_SIGNALS
from alignvl_scale.runtime.distributed import all_reduce_floats

# A worker that skipped this many samples without filling a batch reports the counts (a
# count-only item), so the skip-fraction stop fires even when bad data never yields a batch.
REPORT_SKIPS_EVERY = 256


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
        return kept_samples(self.train_fraction, n)

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


def _selected(samples: Iterator[RawSample], keep: set[str] | None, swaps: dict[str, dict[str, bytes]],
              first: int, stop: int | None) -> Iterator[RawSample]:
    """The kept samples first..stop-1 of a shard (counted in tar order), with swapped
    captions; `samples` begins at kept sample `first` where every sample is kept. The
    shard is read no further than the piece."""
    kept = 0 if keep is not None else first
    for raw in samples:
        if stop is not None and kept >= stop:
            return
        if keep is not None and raw.key not in keep:
            continue
        kept += 1
        if kept <= first:
            continue
        if raw.key in swaps and raw.reason is None:
            rest = {m: data for m, data in raw.members.items() if m not in CAPTION_MEMBERS}
            raw = RawSample(raw.key, {**rest, **swaps[raw.key]}, unsafe=raw.unsafe, noisy=True)
        yield raw


def shard_examples(url: str, decode: Callable[[RawSample], object], window: int, rng: random.Random,
                   start: int = 0, expected: int | None = None, selection: SampleSelection | None = None,
                   first: int = 0, stop: int | None = None) -> Iterator[tuple[int, object | SkipSample, RawSample]]:
    """(samples of the piece consumed so far, example or SkipSample, its raw sample) for the
    kept samples first..stop-1 of one shard (a `ShardTask`'s piece; stop None: all),
    skipping the first `start` of the piece undecoded. The samples before the piece are
    passed over without reading their members. With `expected` (the manifest's count), a
    shard that ends early yields one 'missing_samples' skip per missing sample of the piece:
    a tar cut at a block boundary reads as a shorter, valid tar, and would otherwise lose them
    silently (a remote shard that became unreachable: 'unreachable_shard' skips instead).
    `selection` leaves samples out and swaps captions (data.train_fraction, data.caption_noise)."""
    selection = selection or SampleSelection()
    keep, swaps = selection.plan(url, expected, decode.limits.max_member_bytes)
    head = first if keep is None else 0  # samples whose members are not read
    last = stop if keep is None else None  # where the shard's fetch may end
    samples = _selected(raw_samples(url, decode.limits.max_member_bytes, skip=head, stop=last), keep, swaps, first,
                        stop)
    size = None if expected is None else (stop if stop is not None else selection.kept_samples(expected)) - first
    consumed, lost = 0, ("missing_samples", f"{url}: manifest says {expected}, shard holds")
    for consumed, raw in enumerate(window_shuffle(samples, window, rng), start=1):
        if raw.reason == "unreachable_shard":
            lost = ("unreachable_shard", raw.detail)
        if consumed <= start:
            continue
        try:
            raw.check()
            yield consumed, decode(raw), raw
        except SkipSample as skip:
            skip.key = raw.key
            yield consumed, skip, raw
    for missing in range(max(consumed, start) + 1, (size or 0) + 1):
        detail = f"{lost[1]} fewer" if lost[0] == "missing_samples" else lost[1]
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


class StreamShares(IterableDataset):
    """One rank's streams for one epoch, read by its DataLoader workers (data/streams.py):
    worker j of w reads the rank's streams j, j + w, ... and hands one item per micro-batch
    with each of them's share of `share` samples, in that order."""

    def __init__(self, sources: list[list[Shard]], cfg: DataConfig, decode, seed: int, state: StreamState,
                 local: range, share: int, deal: EpochDeal | None) -> None:
        """deal: the epoch's split (epoch mode, not re-dealt), else None."""
        self.sources, self.cfg, self.decode, self.seed, self.state = sources, cfg, decode, seed, state
        self.local, self.share, self.deal = local, share, deal
        self.selection = SampleSelection.from_config(cfg)
        self._order: list[Shard] | None = None

    def tasks(self, stream: int) -> tuple[Iterator[ShardTask], int | None]:
        """The stream's pieces, and how many make one pass over its span where they repeat."""
        if self.state.tasks is not None:  # the rest of an epoch re-dealt (data/redeal.py)
            return iter(self.state.tasks.get(stream, [])), None
        if self.deal is None:
            return resampled_stream_tasks(self.sources, self.cfg.train_weights, self.seed, self.state.epoch,
                                          stream), None
        if self._order is None:  # one shuffle of every shard per worker and epoch
            self._order = epoch_order(self.sources, self.seed, self.state.epoch)
        span = epoch_stream_tasks(self._order, self.seed, self.state.epoch, stream, self.deal, self.cfg.train_fraction)
        # Once through, the span again (its window shuffles drawn anew) for the shares its skips left short.
        again = (dataclasses.replace(task, rng=task.rng[:-1] + (place,))
                 for place, task in enumerate(itertools.cycle(span)))
        return again, len(span)

    def examples(self, stream: int) -> Iterator[tuple[tuple[int, int], str, object, RawSample]]:
        """((task place, samples of the piece consumed), shard, example or SkipSample, raw)
        from the stream's saved position on; a repeating span ends after a whole pass that
        gave nothing usable."""
        place0, start0 = self.state.positions.get(stream, (0, 0))
        tasks, per_pass = self.tasks(stream)
        usable_at = place0
        for place, (task, upcoming) in enumerate(with_next(tasks)):
            if place < place0:
                continue
            if per_pass is not None and place - usable_at > per_pass:
                return
            if upcoming is not None and is_remote(upcoming.url):  # fetched while this one decodes
                whole = self.selection.train_fraction < 1  # its keys are read first: the whole shard
                start, end = (None, None) if whole else fetched_range(upcoming.url, upcoming.first, upcoming.stop)
                prefetch(upcoming.url, start or 0, end, keep=2 * len(self.local))
            start = start0 if place == place0 else task.start
            for consumed, example, raw in shard_examples(task.url, self.decode, self.cfg.shuffle_window,
                                                         seeded_rng(*task.rng), start, task.samples, self.selection,
                                                         task.first, task.stop):
                if not isinstance(example, SkipSample):
                    usable_at = place
                yield (place, consumed), task.url, example, raw

    def __iter__(self) -> Iterator[dict]:
        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        self.decode.epoch = self.state.epoch
        mine = list(self.local)[worker::workers]
        readers = {s: self.examples(s) for s in mine}
        # Where a resume restarts each stream: just after its share of the last item handed
        # over. Count-only items carry it too, so the samples of an unfinished share are kept.
        committed = {s: self.state.positions.get(s, (0, 0)) for s in mine}
        counts, shard = SkipCounts(), ""
        while True:
            examples, keys, reached = [], [], dict(committed)
            for s in mine:
                taken = 0
                while taken < self.share:
                    got = next(readers[s], None)
                    if got is None:  # the stream ran out: its partial share (and this micro-batch) is dropped
                        if counts.total > counts.good:
                            yield self._item(None, worker, committed, shard, counts)
                        return
                    reached[s], shard, example, raw = got
                    if not counts.record(example, raw.unsafe, raw.noisy):
                        if counts.total - counts.good >= REPORT_SKIPS_EVERY:  # skips, no batch in sight: report
                            yield self._item(None, worker, committed, shard, counts)
                            counts = SkipCounts()
                        continue
                    examples.append(example)
                    keys.append(raw.key)
                    taken += 1
            committed = reached
            batch = {**self.decode.collate(examples), "keys": keys, "share": self.share}
            yield self._item(batch, worker, committed, shard, counts)
            counts = SkipCounts()

    @staticmethod
    def _item(batch: dict | None, worker: int, positions: dict, url: str, counts: SkipCounts) -> dict:
        """What a worker hands the trainer: a batch (or None: a count-only report), where a
        resume restarts its streams, and the samples it counted since its last item."""
        return {"batch": batch, "worker": worker, "positions": positions, "shard": url, "counts": counts.as_dict()}


def load_sources(cfg: DataConfig) -> list[list[Shard]]:
    if not cfg.train:
        raise DataSourceError("data.train: no training shards given")
    return [resolve_spec(spec, cfg.samples_per_shard) for spec in cfg.train]


def streams_for(cfg: DataConfig, world: int, even_share: bool = False) -> int:
    """data.streams, or its default for this world and batch (`default_streams`)."""
    if cfg.streams is not None:
        return cfg.streams
    return default_streams(global_micro_batch(cfg.batch_size, world), world, even_share)


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
    """One rank's view for the trainer: its data streams' micro-batches in stream order, equal
    epochs on every rank, exact positions by stream (a checkpoint continues on any world that
    divides data.streams), skip counts, and the stop rule for bad data."""

    def __init__(self, cfg: DataConfig, decode, rank: int, world: int, seed: int,
                 ignore_signals: tuple[str, ...] = (), sources: list[list[Shard]] | None = None) -> None:
        """ignore_signals: signals the DataLoader workers ignore (train.stop_signals: a
        launcher that signals the whole process group must not kill them mid-batch).
        cfg.streams: null takes the default (`streams_for`; preflight resolves it for a run).
        sources: cfg.train resolved (preflight's), else resolved here."""
        self.cfg, self.decode, self.rank, self.world, self.seed = cfg, decode, rank, world, seed
        self.ignore_signals = ignore_signals
        self.sources = sources if sources is not None else load_sources(cfg)
        self.streams = streams_for(cfg, world)
        check_streams(self.streams, world, global_micro_batch(cfg.batch_size, world), even_share=False)
        self.state = StreamState(streams=self.streams)
        self.counts = SkipCounts()
        self._deals: dict[int, EpochDeal] = {}
        self.batches_per_epoch = self.epoch_batches()

    # -- the checkpointed state ------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"stream": self.state.as_dict(), "counts": self.counts.as_dict()}

    def load_state_dict(self, d: dict) -> None:
        self.state = StreamState.from_dict(d["stream"])
        self.counts = SkipCounts.from_dict(d["counts"])

    def needs_every_rank(self, d: dict) -> bool:
        """A saved stream that cannot continue as it is, even on its own world: from before
        data streams, or read through another data.streams than this run's: re-dealt."""
        state = d["stream"]
        return "tasks" not in state and (StreamState.is_legacy(state) or StreamState.deals_whole_shards(state)
                                         or state["streams"] != self.streams)

    def load_resharded(self, old: list[dict], _step: int) -> str:
        """Every old rank's saved streams: their positions continue on this world (any that
        divides data.streams: the same global batches); a checkpoint from before data streams,
        or one that cannot continue on this world's streams, has the rest of its epoch re-dealt
        (data/redeal.py). Returns the line for the resume note."""
        if any(StreamState.is_legacy(d["stream"]) for d in old):
            return self._redeal(old, "a checkpoint from before data streams")
        if any(StreamState.deals_whole_shards(d["stream"]) and "tasks" not in d["stream"] for d in old):
            return self._redeal(old, "a checkpoint from streams of whole shards")
        states = [StreamState.from_dict(d["stream"]) for d in old]
        first = states[0]
        if any((st.epoch, st.batches, st.streams) != (first.epoch, first.batches, first.streams) for st in states):
            raise DataError("the saved streams disagree on where the epoch stands "
                            f"({sorted({(st.epoch, st.batches) for st in states})}); the checkpoint is damaged")
        if first.streams % self.world or (first.tasks is None and first.streams != self.streams):
            return self._redeal(old, f"data streams {first.streams} -> {self.streams}")
        self.counts = SkipCounts()
        if self.rank == 0:
            for d in old:
                self.counts.add(SkipCounts.from_dict(d["counts"]))
        positions, tasks = merged(states)
        mine = range(self.rank * first.streams // self.world, (self.rank + 1) * first.streams // self.world)
        self.state = dataclasses.replace(first, positions={s: p for s, p in positions.items() if s in mine},
                                         tasks=None if tasks is None else {s: tasks[s] for s in mine if s in tasks})
        return (f"{counted(first.streams, 'data stream')} continue on {counted(self.world, 'rank')} "
                f"({first.streams // self.world} each): the same global batches")

    def _redeal(self, old: list[dict], why: str) -> str:
        dealt = redeal(old, self.sources, self.seed, self.cfg, self.world, self.streams)
        self.state, self.counts = dealt.states[self.rank], dealt.counts if self.rank == 0 else SkipCounts()
        return dealt.line(why, self.world, self.epoch_batches())

    def run_counts(self) -> SkipCounts:
        """The run's good and skipped samples over every rank (a collective: every rank calls
        it); a resumed run's earlier counts are in them once (old ranks' on new rank 0)."""
        counts = self.counts
        totals = all_reduce_floats([counts.good, counts.unsafe_members, counts.noisy_captions]
                                   + [counts.skipped.get(r, 0) for r in SKIP_REASONS])
        skipped = Counter({r: int(n) for r, n in zip(SKIP_REASONS, totals[3:], strict=True) if n})
        return SkipCounts(int(totals[0]), skipped, int(totals[1]), int(totals[2]))

    def mark(self) -> tuple[StreamState, SkipCounts]:
        """Where the stream stands now, to `rewind` to; cheap enough for every step (the
        re-dealt tasks, which no read changes, are shared, not copied)."""
        return (dataclasses.replace(self.state, positions=dict(self.state.positions)),
                dataclasses.replace(self.counts, skipped=Counter(self.counts.skipped)))

    def rewind(self, mark: tuple[StreamState, SkipCounts]) -> None:
        self.state, self.counts = mark

    # -- the epoch -------------------------------------------------------------------------
    def share(self) -> int:
        """Samples each stream gives a micro-batch in this epoch."""
        return global_micro_batch(self.cfg.batch_size, self.world) // self.state.streams

    def deal(self) -> EpochDeal | None:
        """How this epoch's samples are split among the streams (None: resampled, or re-dealt).
        The same for every epoch: made once per stream count (it sums every shard's count, and
        `epoch_done` asks after every micro-batch)."""
        if self.state.tasks is not None or self.cfg.mode == "resampled":
            return None
        if self.state.streams not in self._deals:
            self._deals[self.state.streams] = epoch_deal(
                self.sources, self.state.streams, global_micro_batch(self.cfg.batch_size, self.world),
                self.cfg.train_fraction)
        return self._deals[self.state.streams]

    def epoch_batches(self) -> int | None:
        """Micro-batches every rank makes in this epoch (None: resampled, no end)."""
        if self.state.tasks is not None:
            return self.state.limit
        deal = self.deal()
        return None if deal is None else deal.batches

    def epoch_done(self) -> bool:
        limit = self.epoch_batches()
        return limit is not None and self.state.batches >= limit

    def _check_skips(self, shard: str) -> None:
        if (self.counts.total >= self.cfg.skip_check_min_samples
                and self.counts.skip_fraction > self.cfg.max_skip_fraction):
            raise DataError(f"rank {self.rank}: {self.counts.skip_fraction:.1%} of {self.counts.total} samples "
                            f"skipped (limit data.max_skip_fraction={self.cfg.max_skip_fraction}), last in {shard}; "
                            f"reasons {dict(self.counts.skipped)}")

    def _apply(self, item: dict) -> None:
        """A worker's item, once used: its streams' positions and its counts."""
        self.state.positions.update({int(s): tuple(p) for s, p in item["positions"].items()})
        self.counts.add(SkipCounts.from_dict(item["counts"]))
        self._check_skips(item["shard"])

    def __iter__(self) -> Iterator[dict]:
        """Micro-batches of the current epoch from the saved positions on (resampled mode:
        for ever), each with its `rows` (RowKeys) and sample `keys`. The trainer calls
        `next_epoch` once all ranks agree the epoch is over."""
        if self.epoch_done():
            return
        per_rank = self.state.streams // self.world
        local = range(self.rank * per_rank, (self.rank + 1) * per_rank)
        workers = min(self.cfg.workers, per_rank)
        dataset = StreamShares(self.sources, self.cfg, self.decode, self.seed, self.state, local, self.share(),
                               self.deal())
        # Its own generator: drawing worker seeds from the global RNG would shift dropout after a resume.
        generator = torch.Generator().manual_seed(hash((self.seed, self.rank, self.state.epoch)) % 2**62)
        # Pinned batches: the trainer's non_blocking copies then overlap the step on a GPU. Workers come
        # from a fork server: a fork of the trainer itself (threads of TensorBoard, tqdm, the process
        # group, the previous epoch's queues) deadlocked in the child now and then (seen: 1 in ~200).
        loader = DataLoader(dataset, batch_size=None, num_workers=workers, generator=generator,
                            persistent_workers=False, prefetch_factor=2 if workers else None,
                            pin_memory=torch.cuda.is_available(),
                            multiprocessing_context=self._worker_context() if workers else None,
                            worker_init_fn=functools.partial(_worker_init, self.ignore_signals, os.getpid()))
        batches = RankBatches(iter(loader), max(workers, 1), self._apply)
        while (batch := batches.next_batch()) is not None:
            batch["rows"] = RowKeys(self.state.epoch, self.state.batches, local.start, len(local))
            self.state.batches += 1
            yield batch
            if self.epoch_done():
                return

    def _worker_context(self):
        urls = [shard.url for source in self.sources for shard in source]
        return worker_context(self.ignore_signals, modules_of(self.decode) + reader_modules(urls))

    def next_epoch(self) -> None:
        self.state = StreamState(epoch=self.state.epoch + 1, streams=self.streams)
