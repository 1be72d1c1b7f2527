import dataclasses
import io
import json
import pickle
import random
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import png_bytes, write_image_shards
from distributed import run_ranks
from PIL import Image

from alignvl_scale.config import ConfigError, DataConfig
from alignvl_scale.data.check import check_shards
from alignvl_scale.data.evalsets import load_retrieval_set
from alignvl_scale.data.reader import (
    DataError,
    FeatureDecoder,
    ImageTextDecoder,
    SampleSelection,
    TrainStream,
    shard_examples,
)
from alignvl_scale.data.samples import DecodeLimits, decode_features, raw_samples
from alignvl_scale.data.shards import DataSourceError, folder_samples, hf_samples, resolve_spec, write_shards
from alignvl_scale.data.streams import check_streams, default_streams, epoch_order
from alignvl_scale.data.synthetic import write_feature_shards
from alignvl_scale.data.transforms import ImageTransform
from alignvl_scale.evaluation.evaluate import encode_sharded


def make_stream(cfg: DataConfig, rank=0, world=1, seed=0, limits=None) -> TrainStream:
    decode = ImageTextDecoder(limits or DecodeLimits(), ImageTransform(8, [0.5] * 3, [0.5] * 3), seed=seed)
    return TrainStream(cfg, decode, rank, world, seed)


def epoch_captions(stream: TrainStream) -> list[list[str]]:
    return [batch["captions"] for batch in stream]


def test_two_ranks_two_workers_see_every_sample_once(tmp_path):
    captions = write_image_shards(tmp_path / "s", [8] * 8)
    seen, lengths = [], []
    for rank in range(2):
        cfg = DataConfig(train=[str(tmp_path / "s")], batch_size=4, workers=2, shuffle_window=4)
        batches = epoch_captions(make_stream(cfg, rank, 2))
        lengths.append(len(batches))
        seen += [c for b in batches for c in b]
        assert all(len(b) == 4 for b in batches)
    assert lengths == [8, 8]
    assert sorted(seen) == sorted(captions)


def test_epochs_reshuffle_shards_and_samples(tmp_path):
    write_image_shards(tmp_path / "s", [8] * 4)
    stream = make_stream(DataConfig(train=[str(tmp_path / "s")], batch_size=4, workers=1))
    first = epoch_captions(stream)
    stream.next_epoch()
    second = epoch_captions(stream)
    assert sorted(map(tuple, first)) != sorted(map(tuple, second)) or first != second
    assert sorted(c for b in first for c in b) == sorted(c for b in second for c in b)


@pytest.mark.parametrize("n_shards", [3, 5, 7])
def test_equal_batch_counts_over_two_ranks(tmp_path, n_shards):
    sizes = [5 + 3 * i for i in range(n_shards)]  # uneven shards, uneven per rank
    write_image_shards(tmp_path / "s", sizes)
    counts = []
    for rank in range(2):
        cfg = DataConfig(train=[str(tmp_path / "s")], batch_size=3, workers=1)
        stream = make_stream(cfg, rank, 2)
        counts.append(len(epoch_captions(stream)))
        assert counts[-1] == stream.batches_per_epoch
    assert counts[0] == counts[1] > 0


def test_one_shard_feeds_two_ranks_every_sample_once(tmp_path):
    """Streams split an epoch by samples: one shard of 20 feeds 2 ranks x 8 (16 streams of 1
    per micro-batch), 2 micro-batches, the last padded with the epoch's first 12 samples."""
    captions = write_image_shards(tmp_path / "s", [20])
    cfg = DataConfig(train=[str(tmp_path / "s")], workers=0, batch_size=8, shuffle_window=4)
    streams = [make_stream(cfg, rank, 2) for rank in range(2)]
    assert streams[0].deal().describe() == ("epoch: 20 samples over 16 data streams of 1 per micro-batch = "
                                            "2 micro-batches, 12 padded with the epoch's first samples")
    seen = Counter(c for b in _global_batches(streams, None) for c in b)
    assert set(seen) == set(captions) and sum(seen.values()) == 32 and sorted(seen.values()).count(2) == 12


def test_a_world_that_does_not_divide_the_streams_is_refused_naming_those_that_do():
    with pytest.raises(ConfigError, match=r"data.streams=6: 4 ranks cannot share 6 streams evenly; the worlds that "
                                          r"can: 1, 2, 3, 6 "):
        check_streams(6, 4, 24, even_share=False)
    with pytest.raises(ConfigError, match="share of 3 samples must be even with model.mixup fusemix"):
        check_streams(4, 2, 12, even_share=True)
    assert default_streams(4096, 8, even_share=True) == 64
    assert default_streams(12, 2, even_share=False) == 12
    assert default_streams(12, 2, even_share=True) == 6


def _global_batches(streams: list[TrainStream], batches: int | None, field: str = "captions") -> list[list]:
    """The first `batches` global micro-batches the ranks' streams make (None: the rest of the
    epoch): each rank's batch in rank order, as the gathered loss sees them."""
    per_rank = []
    for stream in streams:
        mine = []
        for i, batch in enumerate(stream, start=1):
            mine.append(batch[field])
            if i == batches:
                break
        per_rank.append(mine)
    return [[x for rank in per_rank for x in rank[i]] for i in range(len(per_rank[0]))]


def _ranks(cfg: DataConfig, world: int, saved: list[dict] | None = None) -> list[TrainStream]:
    """`world` ranks' streams, continuing `saved` (every old rank's state) when given."""
    streams = [make_stream(dataclasses.replace(cfg, batch_size=12 // world), rank, world) for rank in range(world)]
    for stream in streams if saved is not None else ():
        stream.load_resharded(saved, 0)
    return streams


def test_data_streams_give_the_same_global_batches_on_every_world_that_divides_them(tmp_path):
    """6 streams, global micro-batch 12: 1, 2, 3 and 6 ranks with 1-2 DataLoader workers read
    the very same global batches, and every sample of the epoch once."""
    captions = write_image_shards(tmp_path / "s", [8] * 12)
    cfg = DataConfig(train=[str(tmp_path / "s")], workers=2, shuffle_window=4, streams=6)
    want = _global_batches(_ranks(cfg, 2), None)
    assert len(want) == 8 and sorted(c for b in want for c in b) == sorted(captions)
    for world, workers in ((3, 1), (1, 2), (6, 1), (2, 1)):
        assert _global_batches(_ranks(dataclasses.replace(cfg, workers=workers), world), None) == want, world


def test_an_epoch_interrupted_on_two_ranks_continues_on_three_then_one_with_the_same_batches(tmp_path):
    """2 ranks read 3 micro-batches, 3 ranks the next 2 from their checkpointed streams, 1 rank
    the rest: the global batches are the uninterrupted run's, sample for sample; the next
    epoch too; and each resume says so."""
    write_image_shards(tmp_path / "s", [6 + (i * 5) % 7 for i in range(14)])  # uneven shards
    cfg = DataConfig(train=[str(tmp_path / "s")], workers=2, shuffle_window=4, streams=6)
    uninterrupted = _global_batches(_ranks(cfg, 2), None)
    first = _ranks(cfg, 2)
    got = _global_batches(first, 3)
    second = _ranks(cfg, 3, [s.state_dict() for s in first])
    assert second[0].load_resharded([s.state_dict() for s in first], 0) == \
        "6 data streams continue on 3 ranks (2 each): the same global batches"
    got += _global_batches(second, 2)
    third = _ranks(cfg, 1, [s.state_dict() for s in second])
    got += _global_batches(third, None)
    assert got == uninterrupted
    third[0].next_epoch()
    again = _ranks(cfg, 2)
    for stream in again:
        stream.next_epoch()
    assert _global_batches(third, None) == _global_batches(again, None)


# Issue 41's uneven shard sets: 7 shards (img2dataset's short last shard, a small one), and
# 13 shards of 3-40 samples (367), with another shard of 3 and an empty one.
THIRTEEN = [40, 3, 27, 38, 19, 35, 31, 22, 40, 32, 6, 35, 39]
UNEVEN_SHARDS = {"seven": [64, 63, 64, 49, 64, 10, 64], "fifteen": THIRTEEN + [3, 0]}


@pytest.mark.parametrize("sizes", list(UNEVEN_SHARDS), ids=list(UNEVEN_SHARDS))
def test_every_sample_once_per_epoch_on_any_world_and_streams(tmp_path, sizes):
    """1, 2 and 3 ranks, default and explicit data.streams, 3 epochs: each epoch trains every
    sample once, apart from its documented padding (the epoch's first samples, fewer than a
    global micro-batch), in the deal's number of micro-batches; with whole-shard streams an
    epoch ended with its shortest stream (43% of the seven shards unseen on 3 ranks)."""
    captions = write_image_shards(tmp_path / "s", UNEVEN_SHARDS[sizes])
    base = DataConfig(train=[str(tmp_path / "s")], workers=0, shuffle_window=8)
    for world, streams, workers in ((1, None, 0), (2, None, 2), (3, None, 0), (3, 3, 1), (2, 6, 0), (1, 6, 0)):
        ranks = _ranks(dataclasses.replace(base, streams=streams, workers=workers), world)
        deal = ranks[0].deal()
        assert deal.streams == (streams or 12) and 0 <= deal.padded < 12, (world, streams)
        for epoch in range(3):
            batches = _global_batches(ranks, None)
            seen = Counter(c for b in batches for c in b)
            assert len(batches) == deal.batches == ranks[0].batches_per_epoch, (world, streams, epoch)
            assert set(seen) == set(captions), (world, streams, epoch, len(set(captions) - set(seen)))
            assert sum(seen.values()) - len(captions) == deal.padded, (world, streams, epoch)
            for stream in ranks:
                stream.next_epoch()


def test_a_piece_that_begins_inside_a_local_shard_seeks_to_its_first_sample(tmp_path):
    """A local plain tar is opened at the byte where sample k begins, found from its headers
    alone (the members before it are never read): the same samples as reading through them;
    a compressed shard, which cannot seek, reads through them. The shard's offsets sidecar
    (for remote readers) holds the same bytes."""
    import gzip

    from alignvl_scale.data.samples import OFFSETS_SUFFIX, sample_offset

    write_image_shards(tmp_path / "s", [9])
    shard = str(tmp_path / "s" / "shard-000000.tar")
    every = [(r.key, r.members) for r in raw_samples(shard)]
    for skip in (1, 4, 8, 9):
        assert [(r.key, r.members) for r in raw_samples(shard, skip=skip)] == every[skip:], skip
    offset = sample_offset(shard, 4)
    with open(shard, "rb") as f:
        f.seek(offset)  # a tar read from there begins with sample 4's first member (its PAX header first)
        assert tarfile.open(fileobj=f, mode="r|").next().name.startswith(every[4][0] + ".")
    assert sample_offset(shard, 9) is None and sample_offset(shard, 0) == 0
    zipped = tmp_path / "s" / "shard.tar.gz"
    zipped.write_bytes(gzip.compress(Path(shard).read_bytes()))
    assert sample_offset(str(zipped), 4) is None
    assert [(r.key, r.members) for r in raw_samples(str(zipped), skip=4)] == every[4:]
    sidecar = json.loads(Path(shard + OFFSETS_SUFFIX).read_text())["offsets"]  # written with the shard
    assert len(sidecar) == 9 and sidecar[4] == offset


def test_a_stream_that_skips_reads_its_span_again_so_the_epoch_keeps_its_length(tmp_path):
    """Bad samples in one stream's span: it fills its shares from its span again, so every
    rank makes the deal's micro-batches and every good sample trains; the skips are counted."""
    write_image_shards(tmp_path / "s", [10, 10])
    with open(tmp_path / "s" / "shard-000000.tar", "r+b") as f:  # corrupt the first sample's image
        data = f.read()
        at = data.index(b"\x89PNG")
        f.seek(at)
        f.write(b"garbage!")
    cfg = DataConfig(train=[str(tmp_path / "s")], workers=0, batch_size=4, streams=2, shuffle_window=4)
    ranks = [make_stream(cfg, rank, 2) for rank in range(2)]
    batches = _global_batches(ranks, None)
    assert len(batches) == ranks[0].deal().batches == 3
    assert sum(s.counts.skipped["undecodable_image"] for s in ranks) >= 1
    assert len({c for b in batches for c in b}) == 19


def test_a_checkpoint_from_before_data_streams_is_re_dealt_and_reads_every_unread_sample_once(tmp_path):
    """Format 1 (per rank and DataLoader worker): 2 old ranks x 1 worker had each read one
    batch of 6 from the first shard of their sequence. On 3 ranks the rest of the epoch is
    re-dealt, one stream a rank: no sample twice, none of those read again, the left-out ones
    exactly the re-deal's count; the next epoch is read by the run's data streams."""
    captions = write_image_shards(tmp_path / "s", [9] * 12)
    cfg = DataConfig(train=[str(tmp_path / "s")], workers=1, shuffle_window=4, streams=6)
    probe = make_stream(dataclasses.replace(cfg, batch_size=6))
    order, decode = epoch_order(probe.sources, 0, 0), probe.decode
    read = []
    for rank in range(2):  # what the old reader handed over: its first 6 examples of its first shard
        task = order[rank::2][0]
        examples = shard_examples(task.url, decode, 4, random.Random(f"0:0:{rank}:0:0"), 0, task.samples)
        read += [example[1] for _, (_, example, _) in zip(range(6), examples, strict=False)]
    old = [{"stream": {"epoch": 0, "batches": 1, "items": 1, "workers": 1, "positions": {"0": [0, 6]}},
            "counts": {"good": 6, "skipped": {}}} for _ in range(2)]
    new = _ranks(cfg, 3)
    notes = [stream.load_resharded(old, 7) for stream in new]
    assert notes[0] == ("a checkpoint from before data streams: the rest of epoch 0 (96 samples) re-dealt to 3 "
                        "ranks, 7 batches each, 12 left out; the next epoch is read by data streams"), notes[0]
    assert new[0].counts.good == 12 and new[1].counts.good == 0  # the old counts, once
    rest = [c for b in _global_batches(new, None) for c in b]
    assert len(rest) == len(set(rest)) == 96 - 12 and not set(rest) & set(read)
    assert set(rest) | set(read) <= set(captions)
    for stream in new:
        stream.next_epoch()
    assert new[0].state.streams == 6 and len(_global_batches(new, None)) == 9


def test_a_resume_that_sets_other_streams_re_deals_the_rest_of_the_epoch(tmp_path):
    """6 streams on 2 ranks -> data.streams=4 on 4 ranks: the epoch's rest re-dealt (every
    sample once, the left-out ones counted), then 4 streams."""
    captions = write_image_shards(tmp_path / "s", [8] * 12)
    cfg = DataConfig(train=[str(tmp_path / "s")], workers=1, shuffle_window=4, streams=6)
    first = _ranks(cfg, 2)
    seen = [c for b in _global_batches(first, 3) for c in b]
    saved = [s.state_dict() for s in first]
    new = [make_stream(dataclasses.replace(cfg, batch_size=3, streams=4), rank, 4) for rank in range(4)]
    assert new[0].needs_every_rank(saved[0])
    note = [stream.load_resharded(saved, 3) for stream in new][0]
    assert note == ("data streams 6 -> 4: the rest of epoch 0 (60 samples) re-dealt to 4 ranks, 4 batches each, 12 "
                    "left out; the next epoch is read by data streams"), note
    seen += [c for b in _global_batches(new, None) for c in b]
    assert len(seen) == len(set(seen)) and len(captions) - len(seen) == 12


def test_resampled_mode_feeds_any_layout_equally(tmp_path):
    write_image_shards(tmp_path / "a", [6])
    write_image_shards(tmp_path / "b", [6], start=100)
    cfg = DataConfig(train=[str(tmp_path / "a"), str(tmp_path / "b")], train_weights=[3.0, 1.0], mode="resampled",
                     batch_size=4, workers=2)
    from_a = 0
    for rank in range(2):  # one shard per source, still 2 ranks x 2 workers: resampled never runs dry
        stream = iter(make_stream(cfg, rank, 2))
        captions = [c for _ in range(60) for c in next(stream)["captions"]]
        from_a += sum(int(c.split()[1]) < 100 for c in captions)
    assert 0.65 < from_a / 480 < 0.85  # weight 3:1
    assert make_stream(cfg).batches_per_epoch is None


def _write_tar(path: Path, members: list[tuple[str, bytes]]) -> None:
    import tarfile

    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_each_kind_of_bad_sample_is_skipped_and_counted(tmp_path):
    big = Image.new("RGB", (300, 300))
    buf = io.BytesIO()
    big.save(buf, format="PNG")
    members = [
        ("good0.png", png_bytes(0)), ("good0.txt", b"a cat"),
        ("noimg.txt", b"no image here"),
        ("badimg.png", b"not a png at all"), ("badimg.txt", b"broken"),
        ("nocap.png", png_bytes(1)),
        ("empty.png", png_bytes(2)), ("empty.txt", b"   "),
        ("latin1.png", png_bytes(3)), ("latin1.txt", "caf\xe9".encode("latin-1")),
        ("huge.png", buf.getvalue()), ("huge.txt", b"big"),
        ("long.png", png_bytes(4)), ("long.txt", b"x" * 100),
        ("badjson.png", png_bytes(5)), ("badjson.json", b"{not json"),
        ("good0.png", png_bytes(6)), ("good0.txt", b"same key again"),
        ("good1.png", png_bytes(7)), ("good1.json", json.dumps({"captions": ["a", "b"]}).encode()),
    ]
    _write_tar(tmp_path / "bad.tar", members)
    limits = DecodeLimits(max_image_pixels=200 * 200, max_caption_chars=50)
    counts = check_shards([str(tmp_path / "bad.tar")], limits=limits)[str(tmp_path / "bad.tar")]
    assert counts.good == 2
    assert counts.skipped == Counter(missing_image=1, undecodable_image=1, missing_caption=1, empty_caption=1,
                                     bad_utf8=1, oversized_image=1, oversized_caption=1, bad_json=1,
                                     duplicate_key=1)


def test_truncated_tar_is_counted_and_the_rest_survives(tmp_path):
    write_image_shards(tmp_path / "s", [10, 10])
    shard = tmp_path / "s" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    report = check_shards([str(tmp_path / "s")])
    assert report[str(tmp_path / "s" / "shard-000000.tar")].good == 10
    broken = report[str(shard)]
    assert broken.skipped["truncated_tar"] == 1 and broken.good < 10


def test_too_many_bad_samples_stop_the_run_naming_the_shard(tmp_path):
    members = []
    for i in range(20):
        members += [(f"{i:03d}.png", png_bytes(i) if i % 2 else b"junk"), (f"{i:03d}.txt", b"x")]
    _write_tar(tmp_path / "half-bad.tar", members)
    cfg = DataConfig(train=[str(tmp_path / "half-bad.tar")], samples_per_shard=20, batch_size=2, workers=0,
                     max_skip_fraction=0.2, skip_check_min_samples=10)
    with pytest.raises(DataError, match=r"half-bad\.tar.*undecodable_image"):
        epoch_captions(make_stream(cfg))


def test_pickle_members_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (Path.touch, (marker,))

    payload = pickle.dumps(Exploit())
    _write_tar(tmp_path / "evil.tar", [("a.png", png_bytes(0)), ("a.txt", b"cat"), ("a.pickle", payload),
                                       ("a.pyd", payload), ("a.cls.pth", payload)])
    counts = check_shards([str(tmp_path / "evil.tar")])[str(tmp_path / "evil.tar")]
    cfg = DataConfig(train=[str(tmp_path / "evil.tar")], samples_per_shard=1, batch_size=1, workers=0)
    batches = epoch_captions(make_stream(cfg))
    assert batches == [["cat"]]
    assert counts.good == 1 and counts.unsafe_members == 3
    assert not marker.exists()


def test_pipe_urls(tmp_path):
    captions = write_image_shards(tmp_path / "s", [4, 4])
    spec = f"pipe:cat {tmp_path}/s/shard-{{000000..000001}}.tar"
    assert [s.url for s in resolve_spec(spec, 4)] == [f"pipe:cat {tmp_path}/s/shard-00000{i}.tar" for i in range(2)]
    cfg = DataConfig(train=[spec], samples_per_shard=4, batch_size=2, workers=2)
    seen = [c for b in epoch_captions(make_stream(cfg)) for c in b]
    assert sorted(seen) == sorted(captions)


def _consume(stream, n):
    out = []
    for batch in stream:
        out.append(batch["captions"])
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("mode", ["epoch", "resampled"])
def test_resume_continues_exactly_where_it_stopped(tmp_path, mode):
    write_image_shards(tmp_path / "s", [6, 7, 8, 9])
    cfg = DataConfig(train=[str(tmp_path / "s")], batch_size=2, workers=2, mode=mode, shuffle_window=3)
    full = _consume(make_stream(cfg, seed=5), 12)
    first = make_stream(cfg, seed=5)
    head = _consume(first, 5)
    saved = json.loads(json.dumps(first.state_dict()))  # as a checkpoint stores it
    resumed = make_stream(cfg, seed=5)
    resumed.load_state_dict(saved)
    tail = _consume(resumed, 7)
    assert head + tail == full


def test_shards_from_folder_and_from_hf_datasets(tmp_path):
    images = tmp_path / "imgs"
    images.mkdir()
    rows = []
    for i in range(5):
        (images / f"{i}.png").write_bytes(png_bytes(i))
        rows.append({"image": f"imgs/{i}.png", "captions": [f"pic {i}", f"picture {i}"]})
    (tmp_path / "caps.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    manifest = write_shards(folder_samples(tmp_path / "caps.jsonl"), tmp_path / "out", 2, progress=False)
    assert [s["samples"] for s in manifest["shards"]] == [2, 2, 1]
    evalset = load_retrieval_set(str(tmp_path / "out"))
    assert evalset.caption_to_image == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]

    import datasets

    ds = datasets.Dataset.from_dict({"img": [Image.open(io.BytesIO(png_bytes(i))) for i in range(3)],
                                     "caption": ["a", "b", "c"]}).cast_column("img", datasets.Image())
    ds.save_to_disk(str(tmp_path / "hf"))
    samples, total = hf_samples(str(tmp_path / "hf"), "img", "caption")
    manifest = write_shards(samples, tmp_path / "hf_out", 2, total=total, progress=False)
    assert manifest["samples"] == 3
    assert load_retrieval_set(str(tmp_path / "hf_out")).texts == ["a", "b", "c"]
    with pytest.raises(DataSourceError, match="no column 'text'"):
        hf_samples(str(tmp_path / "hf"), "img", "text")


def test_imagefolder_with_metadata(tmp_path):
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(png_bytes(i))
    (tmp_path / "metadata.jsonl").write_text("\n".join(json.dumps({"file_name": f"{i}.png", "text": f"t{i}"})
                                                       for i in range(3)))
    samples, _ = hf_samples("imagefolder", "image", "text", data_dir=str(tmp_path))
    manifest = write_shards(samples, tmp_path / "out", 10, progress=False)
    assert manifest["samples"] == 3
    assert sorted(load_retrieval_set(str(tmp_path / "out")).texts) == ["t0", "t1", "t2"]


def test_folder_source_errors(tmp_path):
    (tmp_path / "caps.csv").write_text("image,caption\nmissing.png,a cat\n")
    with pytest.raises(DataSourceError, match="missing.png"):
        list(folder_samples(tmp_path / "caps.csv"))
    (tmp_path / "caps.jsonl").write_text(json.dumps({"img": "x.png", "caption": "a"}))
    with pytest.raises(DataSourceError, match="no 'image' field"):
        list(folder_samples(tmp_path / "caps.jsonl"))


def test_eval_jsonl_keeps_caption_groups_and_counts_bad_rows(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(0))
    (tmp_path / "b.png").write_bytes(png_bytes(1))
    lines = [{"image": "a.png", "captions": ["one", "uno"]}, {"image": "b.png", "captions": ["two"]},
             {"image": "gone.png", "captions": ["lost"]}, {"image": "a.png", "captions": []}]
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(x) for x in lines))
    evalset = load_retrieval_set(str(tmp_path / "eval.jsonl"))
    assert evalset.texts == ["one", "uno", "two"] and evalset.caption_to_image == [0, 0, 1]
    assert evalset.counts.skipped == Counter(missing_image=1, empty_caption=1)


def _encode_in_order(rank, world):
    calls = []

    def encode(indices):
        calls.append(len(indices))
        return torch.tensor(indices, dtype=torch.float32)[:, None] * torch.ones(1, 3)

    return {"rows": encode_sharded(11, encode, batch_size=2), "calls": torch.tensor(calls)}


def test_encode_sharded_gathers_back_in_order(tmp_path):
    results = run_ranks(_encode_in_order, 2, tmp_path)
    for r in results:
        torch.testing.assert_close(r["rows"][:, 0], torch.arange(11, dtype=torch.float32))
    assert torch.equal(results[0]["calls"], results[1]["calls"])  # same batches on every rank


def test_data_check_cli(tmp_path):
    write_image_shards(tmp_path / "s", [4])
    _write_tar(tmp_path / "s2.tar", [("x.png", b"junk"), ("x.txt", b"c")])
    out = subprocess.run([sys.executable, "-m", "alignvl_scale.cli", "data", "check", str(tmp_path / "s"),
                          str(tmp_path / "s2.tar"), "--json", str(tmp_path / "r.json")], capture_output=True,
                         text=True)
    assert out.returncode == 1, out.stdout + out.stderr
    assert "undecodable_image" in out.stdout and "FAIL" in out.stderr
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["total"]["good"] == 4 and report["total"]["skipped"] == {"undecodable_image": 1}


def test_feature_shards_round_trip(tmp_path):
    from alignvl_scale.data.reader import FeatureDecoder
    from alignvl_scale.data.shards import sample_members

    def npy(a):
        buf = io.BytesIO()
        np.save(buf, a)
        return buf.getvalue()

    samples = (sample_members(f"{i:04d}", **{"img.npy": npy(np.full(4, i, np.float16)),
                                             "txt.npy": npy(np.full((2, 4), i, np.float32))}) for i in range(8))
    write_shards(samples, tmp_path / "f", 4, kind="features", progress=False)
    cfg = DataConfig(train=[str(tmp_path / "f")], kind="features", batch_size=4, workers=0)
    batches = list(TrainStream(cfg, FeatureDecoder(), 0, 1, 0))
    assert [b["image_features"].shape for b in batches] == [(4, 4), (4, 4)]
    torch.testing.assert_close(batches[0]["image_features"][:, 0], batches[0]["text_features"][:, 0])
    evalset = load_retrieval_set(str(tmp_path / "f"))
    assert evalset.kind == "features" and len(evalset.texts) == 16


def _cli(*args, cwd=None):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "alignvl_scale.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd)


def test_shards_folder_skips_bad_rows_into_a_rejects_file_and_keeps_file_names(tmp_path):
    import tarfile
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "cat.01.png").write_bytes(png_bytes(1))
    (tmp_path / "imgs" / "dog photo.png").write_bytes(png_bytes(2))
    (tmp_path / "imgs" / "notes.png").write_text("not an image")
    rows = [("imgs/cat.01.png", "a cat"), ("imgs/dog photo.png", "a dog"), ("imgs/notes.png", "text"),
            ("imgs/missing.png", "gone"), ("imgs/cat.01.png", "  "), ("../outside.png", "escape"),
            ("imgs/dog photo.png", "a dog"),  # the same pair again: a false negative in a batch
            ("imgs/cat.01.png", "x" * 200_000)]  # past csv's 131,072-character field limit
    (tmp_path / "set").mkdir()  # the caption file lives apart from the images: --image-root
    (tmp_path / "set" / "caps.tsv").write_text("file\ttext\n" + "".join(f"{f}\t{c}\n" for f, c in rows))
    out = tmp_path / "out"
    proc = _cli("shards", "folder", "--captions", tmp_path / "set" / "caps.tsv", "--image-root", tmp_path,
                "--image-column", "file", "--caption-column", "text", "--out", out, "--samples-per-shard", 1)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 2 samples in 2 shards" in proc.stdout and "skipped 6 rows" in proc.stdout
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    assert [(r["where"].rsplit(":", 1)[1], r["reason"]) for r in rejects] == [
        ("4", "undecodable_image"), ("5", "missing_image"), ("6", "empty_caption"), ("7", "outside_path"),
        ("8", "duplicate_pair"), ("9", "oversized_caption")]
    assert rejects[4]["detail"].endswith("caps.tsv:3")  # names the row it repeats
    names = {m for shard in sorted(out.glob("*.tar")) for m in tarfile.open(shard).getnames()}
    assert names == {"imgs_cat_01.png", "imgs_cat_01.json", "imgs_dog_photo.png", "imgs_dog_photo.json"}
    evalset = load_retrieval_set(str(out))
    assert evalset.texts == ["a cat", "a dog"]
    with tarfile.open(out / "shard-000000.tar") as tar:
        assert json.loads(tar.extractfile("imgs_cat_01.json").read())["source"] == "imgs/cat.01.png"
    # --strict stops at the first bad row instead
    strict = _cli("shards", "folder", "--captions", tmp_path / "set" / "caps.tsv", "--image-root", tmp_path,
                  "--image-column", "file", "--caption-column", "text", "--out", tmp_path / "strict", "--strict")
    assert strict.returncode != 0 and "caps.tsv:4" in strict.stderr


def test_shards_folder_names_missing_columns_and_warns_about_one_shard(tmp_path):
    (tmp_path / "a.png").write_bytes(png_bytes(1))
    (tmp_path / "b.png").write_bytes(png_bytes(2))
    (tmp_path / "caps.csv").write_text("path,caption\na.png,one\nb.png,two\n")
    proc = _cli("shards", "folder", "--captions", tmp_path / "caps.csv", "--out", tmp_path / "out")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "needs columns 'image' and 'captions' or 'caption', has ['path', 'caption']" in proc.stderr
    proc = _cli("shards", "folder", "--captions", tmp_path / "caps.csv", "--image-column", "path",
                "--out", tmp_path / "out")
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: all 2 samples are in one shard" in proc.stderr
    (tmp_path / "caps.txt").write_text("path|caption\na.png|one\n")
    proc = _cli("shards", "folder", "--captions", tmp_path / "caps.txt", "--separator", "|", "--image-column",
                "path", "--out", tmp_path / "piped")
    assert proc.returncode == 0 and "wrote 1 samples" in proc.stdout, proc.stderr


def test_data_check_list_names_each_bad_sample(tmp_path):
    from alignvl_scale.data.shards import sample_members
    samples = [sample_members("good_one", png_bytes(1), "png", ["fine"]),
               sample_members("broken_one", b"\x89PNG not really", "png", ["bad image"]),
               sample_members("no_caption", png_bytes(2), "png", [])]
    write_shards(iter(samples), tmp_path / "shards", 10, progress=False)
    proc = _cli("data", "check", tmp_path / "shards", "--list")
    lines = [line.split("\t") for line in proc.stdout.splitlines() if "\t" in line]
    shard = str(tmp_path / "shards" / "shard-000000.tar")
    assert [(url, key, detail.split(":")[0]) for url, key, detail in lines] == [
        (shard, "broken_one", "undecodable_image"), (shard, "no_caption", "missing_caption")]


def test_random_resized_crop_is_seeded_and_within_its_scale():
    import random

    from alignvl_scale.data.transforms import random_resized_crop
    img = Image.new("RGB", (200, 100))
    crops = [random_resized_crop(img, random.Random(s), (0.5, 0.8)) for s in range(50)]
    assert all(0.5 * 0.99 <= c.width * c.height / 20000 <= 0.8 * 1.01 for c in crops)
    assert len({c.size for c in crops}) > 10  # it varies with the seed...
    assert random_resized_crop(img, random.Random(3), (0.5, 0.8)).size == crops[3].size  # ...and only with it
    # No region of that area and shape fits a thin strip: the largest centered crop within the ratio.
    assert random_resized_crop(Image.new("RGB", (400, 10)), random.Random(0), (0.9, 1.0)).size == (13, 10)


def test_train_time_crop_changes_pixels_by_epoch_and_not_between_runs(tmp_path):
    write_image_shards(tmp_path / "s", [4])
    from alignvl_scale.data.reader import raw_samples
    (raw,) = list(raw_samples(str(tmp_path / "s" / "shard-000000.tar")))[:1]
    decoder = ImageTextDecoder(DecodeLimits(), ImageTransform(8, [0.5] * 3, [0.5] * 3), crop_scale=(0.3, 0.5))
    first = decoder(raw)[0]
    assert torch.equal(first, decoder(raw)[0])  # the same sample, epoch and seed: the same crop
    decoder.epoch = 1
    assert not torch.equal(first, decoder(raw)[0])


def _pairs(folder: Path, selection: SampleSelection, window: int = 4, rng_seed: int = 0) -> list[tuple[int, str]]:
    """(index of the image, caption) of every sample one epoch trains on, shard by shard."""
    decode = ImageTextDecoder(DecodeLimits())
    out = []
    for shard in resolve_spec(str(folder)):
        for _, (image, caption), _ in shard_examples(shard.url, decode, window, random.Random(rng_seed),
                                                     expected=shard.samples, selection=selection):
            out.append((IMAGES[np.asarray(image).tobytes()], caption))
    return out


IMAGES = {np.asarray(Image.open(io.BytesIO(png_bytes(i))).convert("RGB")).tobytes(): i for i in range(200)}


def test_caption_noise_corrupts_a_fixed_fraction_the_same_way_in_every_run(tmp_path):
    """round(p x n) samples of each shard train with another sample's caption, captions
    permuted among them (each still used once, never with its own image); the same pairs
    whatever the shuffle (run seed) and in a second run; another caption_noise_seed picks
    other samples."""
    sizes = [40, 37, 50]
    write_image_shards(tmp_path / "s", sizes)
    clean = _pairs(tmp_path / "s", SampleSelection())
    assert all(caption == f"caption {i}" for i, caption in clean)
    noisy = _pairs(tmp_path / "s", SampleSelection(caption_noise=0.3))
    wrong = sorted((i, c) for i, c in noisy if c != f"caption {i}")
    assert len(wrong) == sum(round(0.3 * n) for n in sizes)
    assert sorted(c for _, c in noisy) == sorted(c for _, c in clean)  # a permutation of the captions
    donors = {int(c.split()[1]) for _, c in wrong}
    assert donors == {i for i, _ in wrong}  # the corrupted samples swap among themselves
    again = _pairs(tmp_path / "s", SampleSelection(caption_noise=0.3), window=16, rng_seed=9)
    assert sorted((i, c) for i, c in again if c != f"caption {i}") == wrong
    other = _pairs(tmp_path / "s", SampleSelection(caption_noise=0.3, seed=1))
    assert sorted((i, c) for i, c in other if c != f"caption {i}") != wrong


def test_caption_noise_on_cached_features_swaps_the_text_feature(tmp_path):
    write_feature_shards(tmp_path / "f", 64, shards=2)
    decode = FeatureDecoder()
    for shard in resolve_spec(str(tmp_path / "f")):
        clean = {raw.key: (x, decode_features(raw.members)[1])
                 for _, (x, _), raw in shard_examples(shard.url, decode, 1, random.Random(0))}
        texts = {row.astype(np.float32).tobytes(): key for key, (_, rows) in clean.items() for row in rows}
        swapped = 0
        for _, (x, y), raw in shard_examples(shard.url, decode, 1, random.Random(0),
                                             selection=SampleSelection(caption_noise=0.25)):
            assert torch.equal(x, clean[raw.key][0])  # the image feature stays
            donor = texts[y.numpy().tobytes()]
            assert (donor != raw.key) == raw.noisy
            swapped += raw.noisy
        assert swapped == round(0.25 * 32)


def test_train_fraction_keeps_a_fixed_nested_subset_and_sizes_the_epoch(tmp_path):
    sizes = [40, 37, 50]
    write_image_shards(tmp_path / "s", sizes)
    half = {i for i, _ in _pairs(tmp_path / "s", SampleSelection(train_fraction=0.5))}
    quarter = {i for i, _ in _pairs(tmp_path / "s", SampleSelection(train_fraction=0.25), window=16, rng_seed=3)}
    assert len(half) == sum(round(0.5 * n) for n in sizes) and len(quarter) == sum(round(0.25 * n) for n in sizes)
    assert quarter < half
    cfg = DataConfig(train=[str(tmp_path / "s")], batch_size=4, workers=1, train_fraction=0.5)
    stream = make_stream(cfg)
    batches = epoch_captions(stream)
    assert len(batches) == stream.batches_per_epoch == -(-sum(round(0.5 * n) for n in sizes) // 4)
    assert {int(c.split()[1]) for b in batches for c in b} == half  # every kept sample, the epoch's first once more
    noisy = make_stream(DataConfig(train=[str(tmp_path / "s")], batch_size=4, workers=1, train_fraction=0.5,
                                   caption_noise=0.2))
    trained = sum(map(len, epoch_captions(noisy)))
    assert noisy.counts.good == trained
    assert trained - 4 < noisy.counts.noisy_captions / 0.2 < sum(round(0.5 * n) for n in sizes) + 4


def test_caption_noise_and_fraction_are_the_same_on_two_ranks_as_on_one(tmp_path):
    """The selection is a function of the shards alone: two ranks together train on exactly
    the (image, caption) pairs one process does, corrupted ones included."""
    write_image_shards(tmp_path / "s", [20] * 4)
    transform = ImageTransform(8, [0.5] * 3, [0.5] * 3)
    index_of = {transform(Image.open(io.BytesIO(png_bytes(i))).convert("RGB")).numpy().tobytes(): i
                for i in range(80)}

    def pairs(rank: int, world: int) -> tuple[set, int]:
        cfg = DataConfig(train=[str(tmp_path / "s")], batch_size=1, workers=1, train_fraction=0.5,
                         caption_noise=0.2)
        stream = make_stream(cfg, rank, world, seed=3)
        out = {(index_of[b["pixel_values"][0].numpy().tobytes()], b["captions"][0]) for b in stream}
        return out, stream.counts.noisy_captions

    one, noisy_one = pairs(0, 1)
    (a, noisy_a), (b, noisy_b) = pairs(0, 2), pairs(1, 2)
    assert len(one) == 40 and noisy_one == 4 * round(0.2 * 10)
    assert a | b == one and not a & b and noisy_a + noisy_b == noisy_one
    assert sum(caption != f"caption {i}" for i, caption in one) == noisy_one
