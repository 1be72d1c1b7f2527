"""Shards where clusters keep them: over HTTP from a loopback server whose failures the test
decides, and in S3 (moto's server on loopback), read sample for sample as local ones; broken
transfers resumed at the byte reached; unreachable and empty shards counted and named;
img2dataset-style shards indexed; a 2-rank run over a flaky server that stops and resumes
mid-epoch logs the losses of a local run that never stopped."""

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, Started, cluster_config, env, logged, make_tiny_towers, rank_pids, run, torchrun
from PIL import Image
from remote_servers import environment, moto_s3, serving, upload

import alignvl_scale.data.samples as samples_module
from alignvl_scale.config import DataConfig, DecodeLimits
from alignvl_scale.data.check import check_shards
from alignvl_scale.data.index import index_shards
from alignvl_scale.data.reader import ImageTextDecoder, TrainStream
from alignvl_scale.data.samples import SkipCounts, raw_samples
from alignvl_scale.data.shards import DataSourceError, resolve_spec
from alignvl_scale.data.synthetic import write_feature_shards, write_image_shards
from alignvl_scale.data.transforms import ImageTransform

FAST = {"ALIGNVL_REMOTE_BACKOFF_S": "0.05", "ALIGNVL_REMOTE_READ_TIMEOUT_S": "1"}


@pytest.fixture(autouse=True)
def fast_retries():
    with environment(FAST):
        yield


def total_of(report: dict) -> SkipCounts:
    total = SkipCounts()
    for counts in report.values():
        total.add(counts)
    return total


def samples_of(spec: str) -> list[tuple]:
    return [(r.key, sorted(r.members.items()), r.reason) for s in resolve_spec(spec) for r in raw_samples(s.url)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("remote")
    write_image_shards(root / "shards", [8, 8, 8])
    return root


def test_http_and_s3_shards_read_as_local_ones(shards):
    """A remote folder (its manifest), a brace list (counted by the manifest beside it): the
    same samples, byte for byte, with the manifest's counts."""
    local = samples_of(str(shards / "shards"))
    with serving(shards) as server:
        assert samples_of(f"{server.url}/shards") == local
        listed = resolve_spec(f"{server.url}/shards/shard-{{000000..000002}}.tar")
        assert [s.samples for s in listed] == [8, 8, 8]
    with moto_s3() as environ, environment(environ):
        upload(shards / "shards", "bucket", "data/shards", environ)
        assert samples_of("s3://bucket/data/shards") == local
        assert [s.samples for s in resolve_spec("s3://bucket/data/shards/shard-{000000..000002}.tar")] == [8, 8, 8]


def test_transfers_that_break_are_resumed_at_the_byte_reached(shards):
    """Cut half way, 503 twice, a stall past the read timeout: the same samples as an unbroken
    read (the tar parser never sees a break), the cut one continued with a Range request."""
    local = samples_of(str(shards / "shards"))
    with serving(shards, stall_s=60) as server:  # a stall longer than the test: only the read timeout (1 s) ends it
        names = [f"/shards/shard-00000{i}.tar" for i in range(3)]
        server.faults.update({names[0]: ["cut"], names[1]: ["503", "503"], names[2]: ["stall"]})
        assert samples_of(f"{server.url}/shards") == local
        ranged = [r for path, r in server.requests if path == names[0]]
        assert ranged[0] is None and ranged[1].startswith("bytes=") and int(ranged[1][6:-1]) > 0
        assert sum(path == names[1] for path, _ in server.requests) == 3


def test_an_unreachable_shard_is_a_counted_skip_naming_the_url(shards, capfd):
    """404 (at once), and 503 past the retries: every sample of the shard is an
    `unreachable_shard` skip, and the console names the URL and the status. An empty shard is
    named too (it was dropped with nothing on the console)."""
    with serving(shards) as server:
        server.faults["/shards/shard-000000.tar"] = ["404"]
        server.faults["/shards/shard-000001.tar"] = ["503"] * 20
        (shards / "shards" / "empty.tar").write_bytes(b"")
        try:
            report = check_shards([f"{server.url}/shards", f"{server.url}/shards/empty.tar"], "image-text",
                                  DecodeLimits(), samples_per_shard=1)
        finally:
            (shards / "shards" / "empty.tar").unlink()
    total = total_of(report)
    assert total.skipped["unreachable_shard"] == 16 and total.good == 8, dict(total.skipped)
    err = capfd.readouterr().err
    assert f"{server.url}/shards/shard-000000.tar: HTTP 404" in err and "HTTP 503" in err and "gave up after" in err
    assert "empty.tar is empty (0 bytes)" in err


def test_the_next_shard_is_fetched_while_one_decodes(shards):
    """Before the first batch of a shard leaves the worker, the shard after it has been asked
    for (and the rest of the epoch's batches are the same as a local read's)."""
    def batches(spec: str) -> tuple[list, TrainStream]:
        cfg = DataConfig(train=[spec], batch_size=4, workers=0, shuffle_window=1, streams=1)
        stream = TrainStream(cfg, ImageTextDecoder(DecodeLimits(), ImageTransform(8, [0.5] * 3, [0.5] * 3)), 0, 1, 0)
        return iter(stream), stream

    with serving(shards) as server:
        remote, _ = batches(f"{server.url}/shards")
        first = next(remote)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and len({p for p, _ in server.requests if p.endswith(".tar")}) < 2:
            time.sleep(0.01)
        shards_asked = [p for p, _ in server.requests if p.endswith(".tar")]
        assert len(set(shards_asked)) == 2, shards_asked
        got = [first["captions"]] + [item["captions"] for item in remote]
    local, _ = batches(str(shards / "shards"))
    assert got == [item["captions"] for item in local] and len(got) == 6


def test_a_piece_that_begins_inside_a_remote_shard_starts_with_a_range_request(tmp_path, capfd):
    """24 samples in shards of 7, 9 and 8 read by 4 streams of 6 (pieces begin inside shards):
    over HTTP the batches are a local read's, each piece that begins inside a shard asks for
    the bytes from its first sample to its last (the shard's offsets sidecar), and without sidecars
    the pieces read through their shards' first samples, which the launch says once."""
    write_image_shards(tmp_path / "data" / "s", [7, 9, 8])

    def batches(spec: str) -> list:
        cfg = DataConfig(train=[spec], batch_size=4, workers=0, shuffle_window=2, streams=4)
        stream = TrainStream(cfg, ImageTextDecoder(DecodeLimits(), ImageTransform(8, [0.5] * 3, [0.5] * 3)), 0, 1, 0)
        return [item["captions"] for item in stream]

    local = batches(str(tmp_path / "data" / "s"))
    with serving(tmp_path / "data") as server:
        assert batches(f"{server.url}/s") == local
        ranged = [r for p, r in server.requests if p.endswith(".tar") and r]
        assert any(not r.startswith("bytes=0-") for r in ranged), ranged  # begins inside the shard
        assert any(not r.endswith("-") for r in ranged), ranged  # ends inside it: no byte after the piece
        assert any(p.endswith(".tar.idx") for p, _ in server.requests), server.requests
        for sidecar in (tmp_path / "data" / "s").glob("*.idx"):
            sidecar.unlink()
        samples_module._offsets_cache.clear()  # a new worker's
        capfd.readouterr()
        assert batches(f"{server.url}/s") == local
        assert capfd.readouterr().err.count("no .idx beside its shards") == 1


def test_remote_specs_are_checked_before_launch(shards):
    with serving(shards) as server:
        with pytest.raises(DataSourceError, match=r"/nope/manifest.json: no manifest to read \(HTTP 404"):
            resolve_spec(f"{server.url}/nope")
        with pytest.raises(DataSourceError, match="cannot be read"):
            resolve_spec(f"{server.url}/nope/shard-{{0..3}}.tar")


def write_img2dataset_shards(folder: Path, sizes: list[int], stats: bool = True) -> int:
    """Shards as img2dataset writes them: 00000.tar ... with key.jpg, key.txt and key.json
    (its metadata), and 00000_stats.json whose `successes` counts them."""
    folder.mkdir(parents=True)
    index = 0
    for s, size in enumerate(sizes):
        with tarfile.open(folder / f"{s:05d}.tar", "w") as tar:
            for _ in range(size):
                key = f"{s:05d}{index:04d}"
                buffer = io.BytesIO()
                Image.new("RGB", (12, 9), (index % 255, 40, 90)).save(buffer, format="JPEG")
                meta = {"url": f"http://127.0.0.1/{index}.jpg", "caption": f"picture {index}", "key": key,
                        "status": "success", "width": 12, "height": 9}
                for ext, data in (("jpg", buffer.getvalue()), ("txt", f"picture {index}".encode()),
                                  ("json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
                index += 1
        if stats:
            (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": size + 1, "successes": size,
                                                                    "failed_to_download": 1}))
    return index


def test_img2dataset_shards_indexed_locally_and_in_s3_then_read_with_their_counts(tmp_path):
    """`shards index`: counts from *_stats.json where there are some, else by reading the shard;
    the manifest lands beside the shards (in the bucket too), and the shards then read as ours."""
    total = write_img2dataset_shards(tmp_path / "i2d", [5, 7, 6])
    (tmp_path / "i2d" / "00002_stats.json").unlink()  # this one is counted by reading it
    manifest = index_shards(str(tmp_path / "i2d"))
    assert [s["samples"] for s in manifest["shards"]] == [5, 7, 6] and manifest["samples"] == total
    assert manifest["indexed"] == {"from_stats_json": 2, "read": 1}
    counts = total_of(check_shards([str(tmp_path / "i2d")], "image-text", DecodeLimits()))
    assert counts.good == total and not counts.skipped
    (tmp_path / "i2d" / "manifest.json").unlink()
    with moto_s3() as environ, environment(environ):
        upload(tmp_path / "i2d", "bucket", "i2d", environ)
        assert index_shards("s3://bucket/i2d")["samples"] == total
        assert [s.samples for s in resolve_spec("s3://bucket/i2d")] == [5, 7, 6]


@pytest.mark.slow
def test_a_two_rank_run_over_a_flaky_server_stops_and_resumes_as_a_local_run(tmp_path):
    """Feature shards over HTTP with a transfer cut, 503s and a stall on the way; SIGTERM to
    rank 1 mid-epoch, then --resume latest: every logged loss equals the local run's that
    nobody stopped (the same samples, in the same batches)."""
    write_feature_shards(tmp_path / "data" / "train", 12 * 8, shards=4)
    local_config, local_dir = cluster_config(tmp_path, tmp_path / "data" / "train", "local", data={"streams": 2},
                                             train={"steps": 12}, checkpoint={"every": 0})
    run(torchrun(local_config, 2, 2), local_dir)
    want = logged(local_dir, "train/loss")
    with serving(tmp_path / "data", stall_s=3) as server:
        config, run_dir = cluster_config(tmp_path, f"{server.url}/train", "remote", data={"streams": 2},
                                         train={"steps": 12}, checkpoint={"every": 0})
        for i in range(4):
            server.faults[f"/train/shard-00000{i}.tar"] = [["cut"], ["503", "503"], ["stall"], ["cut", "503"]][i]
        with environment(FAST):
            launch = Started(torchrun(config, 2, 2), tmp_path / "logs")
            deadline = time.time() + 180
            while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists()
                                                  and max(logged(run_dir, "train/loss"), default=0) >= 4):
                time.sleep(0.05)
            os.kill(rank_pids(launch.pid)[1], signal.SIGTERM)
            code, out, err = launch.wait(timeout=120)
            assert code == 0 and "stopped by" in out, err[-3000:]
            run(torchrun(config, 2, 2, "--resume", "latest"), run_dir)
    got = logged(run_dir, "train/loss")
    assert sorted(got) == sorted(want)
    for step in want:
        assert got[step] == pytest.approx(want[step], rel=1e-6), step


def test_a_launch_reads_a_remote_manifest_once_per_rank(tmp_path):
    """Preflight resolves the sources (the manifest's listing) and the reader takes them: a
    1-rank run over HTTP asks for the data's manifest once for its sources, and twice for the
    feature dims (whether it is there, then its content); the reader asked a fourth time
    before issue 41's item 6."""
    write_feature_shards(tmp_path / "data" / "train", 12 * 4, shards=4)
    with serving(tmp_path / "data") as server:
        config, run_dir = cluster_config(tmp_path, f"{server.url}/train", data={"streams": 2},
                                         train={"steps": 2}, checkpoint={"every": 0})
        run(torchrun(config, 1, 2), run_dir)
        assert [p for p, _ in server.requests].count("/train/manifest.json") == 3


def img2dataset_executable() -> str:
    """img2dataset lives in a venv of its own (it needs webdataset<0.3, this project >=1.0):
    .ci/run makes it and names it in ALIGNVL_IMG2DATASET; elsewhere the test is skipped
    unless .venv-img2dataset exists (see docs/testing.md)."""
    named = os.environ.get("ALIGNVL_IMG2DATASET")
    exe = Path(named or ROOT / ".venv-img2dataset" / "bin" / "img2dataset")
    if not exe.exists():
        if named:
            pytest.fail(f"ALIGNVL_IMG2DATASET={named} does not exist")
        pytest.skip("img2dataset is not installed: python3 -m venv .venv-img2dataset && "
                    ".venv-img2dataset/bin/pip install img2dataset==1.47.0")
    return str(exe)


def test_img2dataset_output_in_a_bucket_trains_after_one_shards_index(tmp_path):
    """img2dataset (run for real) downloads 41 images from a loopback server (one URL more is
    missing) into uneven shards; they go to a bucket as they are; one `shards index` there
    counts them as its *_stats.json do, `data check` reads them, and a run trains every sample
    from the bucket, each once (the epoch's batches are all full, nothing is skipped), and
    evaluates on the bucket's shards."""
    exe = img2dataset_executable()
    (tmp_path / "web" / "img").mkdir(parents=True)
    rows = ["url,caption"]
    for i in range(41):
        Image.new("RGB", (20 + i % 7, 18), (6 * i, 40, 90)).save(tmp_path / "web" / "img" / f"{i}.jpg")
        rows.append(f"{{url}}/img/{i}.jpg,picture number {i}")
    rows.append("{url}/img/missing.jpg,a picture that is not there")
    out, no_proxy = tmp_path / "i2d", {"NO_PROXY": "127.0.0.1,localhost", "no_proxy": "127.0.0.1,localhost"}
    with serving(tmp_path / "web") as server:
        (tmp_path / "urls.csv").write_text("\n".join(rows).replace("{url}", server.url) + "\n")
        subprocess.run([exe, "--url_list", str(tmp_path / "urls.csv"), "--input_format", "csv", "--url_col", "url",
                        "--caption_col", "caption", "--output_format", "webdataset", "--output_folder", str(out),
                        "--processes_count", "1", "--thread_count", "4", "--number_sample_per_shard", "16",
                        "--disable_all_reencoding", "True"],
                       check=True, timeout=180, capture_output=True, env={**env(), **no_proxy})
    successes = [json.loads(p.read_text())["successes"] for p in sorted(out.glob("*_stats.json"))]
    assert successes == [16, 16, 9]
    towers = make_tiny_towers(tmp_path / "towers")
    with moto_s3() as environ, environment(environ):
        upload(out, "bucket", "i2d", environ)
        cli = [sys.executable, "-m", "alignvl_scale.cli"]
        index = subprocess.run([*cli, "shards", "index", "s3://bucket/i2d"], cwd=ROOT, env={**env(), **environ},
                               capture_output=True, text=True, timeout=120)
        assert "indexed 3 shards, 41 samples (3 counted from *_stats.json, 0 by reading them)" in index.stdout, \
            index.stderr[-3000:]
        assert [s.samples for s in resolve_spec("s3://bucket/i2d")] == successes
        check = subprocess.run([*cli, "data", "check", "s3://bucket/i2d"], cwd=ROOT, env={**env(), **environ},
                               capture_output=True, text=True, timeout=120)
        assert check.returncode == 0 and re.search(r"total +41 +0 +0", check.stdout), check.stderr[-3000:]
        run_dir = tmp_path / "run"
        config = tmp_path / "run.yaml"
        config.write_text(yaml.safe_dump({
            "model": {"image_tower": {"name": towers["vit"], "pooling": "mean"},
                      "text_tower": {"name": towers["bert"], "max_length": 16}, "embed_dim": 16, "noise_sigma": 0.1},
            "data": {"train": ["s3://bucket/i2d"], "batch_size": 4, "workers": 1, "image_size": 16},
            "train": {"epochs": 1, "lr": 0.003, "warmup_steps": 2, "log_every": 1},
            "eval": {"data": ["s3://bucket/i2d"], "batch_size": 8},
            "run_dir": str(run_dir)}))
        subprocess.run([sys.executable, str(ROOT / "launchers/train.py"), "--config", str(config)], cwd=ROOT,
                       env={**env(), **environ}, check=True, capture_output=True, timeout=300)
    summary = json.loads((run_dir / "summary.json").read_text())
    # One epoch of 41 samples in batches of 4: 11 steps, the last padded with the epoch's first 3.
    assert summary["step"] == 11 and summary["last"]["data/good_samples"] == 44, summary
    assert not any(v for k, v in summary["last"].items() if k.startswith("data/skipped_")), summary["last"]
    assert summary["eval_images"] == 41 and "eval/i2t_R@1" in summary["eval"], summary
