"""The fault matrix: what a careful operator or a hostile input does, and what must happen.
Nothing hangs, nothing is lost silently, no input runs code, and a user's mistake fails
before any process group with one line naming it. Each test is named by the behaviour it
holds the trainer to.

    python -m pytest -q tests/test_faults.py
"""

import fcntl
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, env, launch_cmd, logged, png_bytes, write_image_shards

from alignvl_scale.data.check import check_shards
from alignvl_scale.data.evalsets import load_retrieval_set
from alignvl_scale.data.samples import DecodeLimits, SkipSample, decode_captions, decode_image
from alignvl_scale.data.shards import MANIFEST, DataSourceError, folder_samples
from alignvl_scale.data.synthetic import write_feature_shards
from alignvl_scale.runtime.distributed import free_port


# -- a tiny cached-feature run in one process: the fastest real trainer run ------------------
@pytest.fixture(scope="module")
def features(tmp_path_factory):
    root = tmp_path_factory.mktemp("features")
    write_feature_shards(root / "train", 4 * 32, shards=4)
    return root / "train"


def run_config(tmp_path: Path, features: Path, name: str = "run", **sections) -> tuple[Path, Path]:
    run_dir = tmp_path / name
    cfg = {"model": {"embed_dim": 16, "adapter": "linear", "noise_sigma": 0.01},
           "data": {"kind": "features", "train": [str(features)], "batch_size": 16, "workers": 0},
           "train": {"steps": 6, "lr": 0.01, "log_every": 1}, "checkpoint": {"every": 2, "keep": 2},
           "run_dir": str(run_dir)}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values) if isinstance(values, dict) else cfg.update({section: values})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, run_dir


def train(config: Path, *args: str, timeout: int = 120, no_process_group: bool = False) -> subprocess.CompletedProcess:
    """One-process training. no_process_group: with a rendezvous address nothing answers at,
    so that only a failure found before any process group can come back as one clean line."""
    environ = {**env(), **({"MASTER_ADDR": "no-such-host.invalid", "MASTER_PORT": "9"} if no_process_group else {})}
    return subprocess.run([sys.executable, "-m", "alignvl_scale.cli", "train", "--config", str(config), *args],
                          cwd=ROOT, env=environ, capture_output=True, text=True, timeout=timeout)


def user_error(proc: subprocess.CompletedProcess, *needles: str) -> str:
    """A user's mistake: exit 2, one `error:` line that says what to do, no traceback."""
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = next(line for line in proc.stderr.splitlines() if "[alignvl-scale] error:" in line)
    for needle in needles:
        assert needle in line, line
    return line


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, features):
    """One finished 6-step run (checkpoints at 2, 4, 6; keep 2), trained once per module."""
    tmp = tmp_path_factory.mktemp("base")
    config, run_dir = run_config(tmp, features)
    proc = train(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def copy_of(base_run: Path, tmp_path: Path, features: Path) -> tuple[Path, Path]:
    """A private copy of the base run and its config (same settings, its own run_dir)."""
    config, run_dir = run_config(tmp_path, features)
    shutil.copytree(base_run, run_dir)
    return config, run_dir


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))


# -- checkpoints and the run folder -----------------------------------------------------
@pytest.mark.slow
def test_retention_never_deletes_the_checkpoint_just_saved(tmp_path, features):
    """keep=1 in a folder that also holds a later step from an earlier run: keeping "the
    newest by name" deleted the new checkpoint and left `latest` pointing at nothing."""
    config, run_dir = run_config(tmp_path, features, checkpoint={"every": 2, "keep": 1})
    assert train(config).returncode == 0
    assert checkpoints(run_dir) == ["step_00000006"]
    shutil.copytree(run_dir / "checkpoints/step_00000006", run_dir / "checkpoints/step_00000060")  # an earlier run's
    config2, _ = run_config(tmp_path, features, name="run", train={"steps": 8}, checkpoint={"every": 2, "keep": 1})
    proc = train(config2, "--resume", str(run_dir / "checkpoints/step_00000006"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "checkpoints/latest").read_text() == "step_00000008"
    assert checkpoints(run_dir) == ["step_00000008", "step_00000060"]  # the later step is not ours to delete
    assert train(config2, "--resume", "latest").returncode == 0  # latest names a complete checkpoint


def test_resaving_a_step_replaces_it_whole(tmp_path, features, base_run):
    config, run_dir = copy_of(base_run, tmp_path, features)
    proc = train(config, "--resume", str(run_dir / "checkpoints/step_00000004"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (run_dir / "checkpoints/latest").read_text() == "step_00000006"
    assert checkpoints(run_dir) == ["step_00000004", "step_00000006"]
    assert not list((run_dir / "checkpoints").glob(".step_*"))  # no partial or old copy left behind


def test_a_second_run_in_a_used_run_dir_is_refused(tmp_path, features, base_run):
    config, run_dir = copy_of(base_run, tmp_path, features)
    before = (run_dir / "metrics.jsonl").read_text()
    user_error(train(config), "already holds a run", "--resume latest", "--overwrite")
    assert (run_dir / "metrics.jsonl").read_text() == before
    assert train(config, "--overwrite").returncode == 0
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # one run, not two appended


def test_two_runs_on_one_run_dir_at_once(tmp_path, features):
    config, run_dir = run_config(tmp_path, features)
    run_dir.mkdir()
    with (run_dir / ".lock").open("a+") as held:  # another run holds it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        held.write("pid 1 on elsewhere\n")
        held.flush()
        user_error(train(config), "is in use by another run")
    assert not (run_dir / "metrics.jsonl").exists()


def test_a_locked_run_dir_is_refused_before_the_towers_load(tmp_path):
    """An image-text run whose image tower's weights cannot load, on a run folder another run
    holds: the refusal names the lock (taken before any tower loads), not the weights."""
    from alignvl_scale.data.synthetic import make_tiny_towers

    towers = make_tiny_towers(tmp_path / "towers")
    broken = Path(towers["vit"]) / "model.safetensors"
    broken.write_bytes(broken.read_bytes()[:100])  # its config is fine: the preflight's checks pass
    write_image_shards(tmp_path / "train", [16, 16])
    run_dir = tmp_path / "run"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"image_tower": {"name": towers["vit"], "pooling": "mean"},
                  "text_tower": {"name": towers["bert"], "max_length": 16}, "embed_dim": 16},
        "data": {"train": [str(tmp_path / "train")], "image_size": 16, "batch_size": 8, "workers": 0},
        "train": {"steps": 2}, "run_dir": str(run_dir)}))
    run_dir.mkdir()
    with (run_dir / ".lock").open("a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        user_error(train(config), "is in use by another run")
    assert "safetensors" in train(config).stderr  # without the lock, the broken weights are what stops it


def test_a_garbage_latest_or_a_truncated_state_file_is_named(tmp_path, features, base_run):
    config, run_dir = copy_of(base_run, tmp_path, features)
    latest = run_dir / "checkpoints/latest"
    latest.write_bytes(b"\xff\xfe\x00garbage")
    user_error(train(config, "--resume", "latest", no_process_group=True), str(latest), "step_00000006")
    latest.write_text("step_00000006")
    state = run_dir / "checkpoints/step_00000006/state/mp_rank_00_model_states.pt"
    state.write_bytes(state.read_bytes()[:200])
    line = user_error(train(config, "--resume", "latest", no_process_group=True), str(state))
    assert "step_00000004" in line  # the previous complete checkpoint is offered


def test_a_checkpoint_saved_just_before_the_non_finite_stop_is_not_latest(tmp_path, features):
    config, run_dir = run_config(tmp_path, features, train={"steps": 6, "lr": 1e30, "grad_clip": 0.0,
                                                             "max_bad_steps": 2}, checkpoint={"every": 1})
    proc = train(config)
    assert proc.returncode != 0 and "non-finite steps in a row" in proc.stderr
    assert "may hold diverged weights" in proc.stderr
    latest = run_dir / "checkpoints/latest"
    bad_step = max(logged(run_dir, "train/loss"))
    assert not latest.exists() or latest.read_text() != f"step_{bad_step:08d}"
    assert (run_dir / f"checkpoints/suspect_step_{bad_step:08d}").is_dir()
    # metrics.jsonl is strict JSON (a bare NaN is not); with grad_clip 0 no norm is computed, none logged
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line, parse_constant=lambda c: pytest.fail(f"{c} in metrics.jsonl"))
        assert "train/grad_norm" not in record


# -- hangs ---------------------------------------------------------------------------------
def test_all_bad_shards_end_the_run_within_seconds(tmp_path):
    shards = tmp_path / "bad"
    write_image_shards(shards, [16] * 2)
    for tar_path in shards.glob("*.tar"):  # every image zero bytes
        with tarfile.open(tar_path) as tar:
            members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
        with tarfile.open(tar_path, "w") as tar:
            for member, data in members:
                data = b"" if member.name.endswith(".png") else data
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
    config, _ = run_config(tmp_path, shards, data={"kind": "image-text", "train": [str(shards)], "batch_size": 4,
                                                   "workers": 1, "image_size": 16})
    towers = yaml.safe_load(config.read_text())
    from alignvl_scale.data.synthetic import make_tiny_towers

    paths = make_tiny_towers(tmp_path / "towers")
    towers["model"].update(image_tower={"name": paths["vit"], "pooling": "mean"},
                           text_tower={"name": paths["bert"], "max_length": 8})
    config.write_text(yaml.safe_dump(towers))
    user_error(train(config, timeout=90), "gave rank 0 no batch", "undecodable_image")


@pytest.mark.parametrize("count", [-5, 1.5])
def test_a_manifest_count_that_is_no_count_is_refused(tmp_path, features, count):
    shards = tmp_path / "shards"
    shutil.copytree(features, shards)
    manifest = json.loads((shards / MANIFEST).read_text())
    manifest["shards"][1]["samples"] = count
    (shards / MANIFEST).write_text(json.dumps(manifest))
    config, run_dir = run_config(tmp_path, shards)
    user_error(train(config), "shards[1].samples must be a count of 0 or more")
    assert not run_dir.exists()


def test_a_batch_larger_than_a_rank_gets_is_refused_with_the_numbers(tmp_path, features):
    config, run_dir = run_config(tmp_path, features, data={"batch_size": 200})
    user_error(train(config), "global micro-batch of 200 samples", "128 samples per epoch")
    assert not run_dir.exists()


def test_eval_entries_naming_a_fifo_or_a_device_do_not_hang(tmp_path):
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "ok.png").write_bytes(png_bytes(1))
    os.mkfifo(folder / "fifo.png")
    (folder / "zero.png").symlink_to("/dev/zero")
    rows = [{"image": "ok.png", "caption": "fine"}, {"image": "fifo.png", "caption": "a fifo"},
            {"image": "zero.png", "caption": "endless"}]
    (folder / "set.jsonl").write_text("\n".join(map(json.dumps, rows)))
    signal.alarm(20)  # a hang fails the test instead of the suite
    try:
        evalset = load_retrieval_set(str(folder / "set.jsonl"), allow_outside=True)
    finally:
        signal.alarm(0)
    assert len(evalset.images) == 1 and evalset.counts.skipped["missing_image"] == 2


# -- bounded memory, no crash from one sample ----------------------------------------------
def test_a_sparse_member_declaring_3_gb_is_skipped_unread(tmp_path):
    folder = tmp_path / "sparse"
    folder.mkdir()
    work = tmp_path / "work"
    work.mkdir()
    (work / "000000.txt").write_text("a caption")
    with (work / "000000.png").open("wb") as f:
        f.truncate(3 * 2**30)  # a 3 GB hole
    (work / "000001.txt").write_text("good")
    (work / "000001.png").write_bytes(png_bytes(2))
    subprocess.run(["tar", "--sparse", "-cf", str(folder / "shard-000000.tar"), "-C", str(work), "000000.png",
                    "000000.txt", "000001.png", "000001.txt"], check=True)
    assert (folder / "shard-000000.tar").stat().st_size < 100_000
    (folder / MANIFEST).write_text(json.dumps({"format": "alignvl-shards/1", "kind": "image-text", "samples": 2,
                                               "shards": [{"name": "shard-000000.tar", "samples": 2}]}))
    # The check's own peak, reported by the process that ran it: RUSAGE_CHILDREN is the
    # largest of every child this pytest process ever waited for, earlier tests' included.
    report_peak = ("import resource, sys; from alignvl_scale.cli import main; rc = main(sys.argv[1:]); "
                   "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr); "
                   "sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", report_peak, "data", "check", str(folder), "--json",
                           str(tmp_path / "check.json")], cwd=ROOT, env=env(), capture_output=True, text=True)
    assert proc.returncode == 0 or "FAIL: skip fraction" in proc.stderr, proc.stderr[-2000:]
    peak_kib = int(proc.stderr.split("PEAK_KIB ")[1].split()[0])
    assert peak_kib < 1.5 * 2**20, f"data check peaked at {peak_kib / 2**20:.1f} GiB"
    total = json.loads((tmp_path / "check.json").read_text())["total"]
    assert total["good"] == 1 and total["skipped"] == {"oversized_member": 1}


def test_members_over_the_limit_are_not_read(tmp_path):
    write_image_shards(tmp_path / "s", [4])
    report = check_shards([str(tmp_path / "s")], limits=DecodeLimits(max_member_bytes=10))
    (counts,) = report.values()
    assert counts.good == 0 and counts.skipped["oversized_member"] == 4


def test_a_deeply_nested_json_member_is_a_counted_skip():
    with pytest.raises(SkipSample) as skip:
        decode_captions({"json": b"[" * 200_000}, DecodeLimits())
    assert skip.value.reason == "bad_json"


def test_only_the_format_the_extension_names_is_decoded():
    from PIL import EpsImagePlugin

    png = png_bytes(3)
    assert decode_image({"png": png}, DecodeLimits()).size == (8, 8)
    with pytest.raises(SkipSample, match="undecodable_image"):
        decode_image({"jpg": png}, DecodeLimits())  # PNG content named .jpg
    called = []
    original = EpsImagePlugin.EpsImageFile._open
    EpsImagePlugin.EpsImageFile._open = lambda self: called.append(1) or original(self)
    try:
        eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"
        with pytest.raises(SkipSample, match="undecodable_image"):
            decode_image({"png": eps}, DecodeLimits())
    finally:
        EpsImagePlugin.EpsImageFile._open = original
    assert called == []  # the Ghostscript plugin was never reached


# -- silent loss or silent over-training ------------------------------------------------------
def _cut_at_member(tar_path: Path, keep_members: int) -> None:
    with tarfile.open(tar_path) as tar:
        offset = tar.getmembers()[keep_members].offset  # a 512-byte block boundary: reads as a valid, shorter tar
    tar_path.write_bytes(tar_path.read_bytes()[:offset])


def test_a_shard_shorter_than_its_manifest_is_reported(tmp_path):
    write_image_shards(tmp_path / "s", [8])
    _cut_at_member(tmp_path / "s/shard-000000.tar", 10)  # 5 of 8 samples (2 members each)
    (counts,) = check_shards([str(tmp_path / "s")]).values()
    assert counts.good == 5 and counts.skipped == {"missing_samples": 3}
    cli = [sys.executable, "-m", "alignvl_scale.cli", "data", "check", str(tmp_path / "s"), "--max-skip-fraction", "1"]
    assert "WARNING" in subprocess.run(cli, cwd=ROOT, env=env(), capture_output=True, text=True).stderr
    assert subprocess.run([*cli, "--strict"], cwd=ROOT, env=env(), capture_output=True).returncode == 1


def test_a_manifest_claiming_far_more_than_the_shards_hold_stops_training(tmp_path, features):
    shards = tmp_path / "shards"
    shutil.copytree(features, shards)
    manifest = json.loads((shards / MANIFEST).read_text())
    for entry in manifest["shards"]:
        entry["samples"] = 1000  # 32 present in each
    (shards / MANIFEST).write_text(json.dumps(manifest))
    config, run_dir = run_config(tmp_path, shards, train={"steps": None, "epochs": 1})
    user_error(train(config), "missing_samples")
    assert max(logged(run_dir, "train/loss") or {0: 0}) < 62  # not 125 epochs' worth


# -- untrusted checkpoints and paths --------------------------------------------------------
class Payload:
    """Unpickling this runs code: it creates the file it names."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_checkpoint_with_code_in_it_runs_nothing(tmp_path, features, base_run):
    config, run_dir = copy_of(base_run, tmp_path, features)
    checkpoint = run_dir / "checkpoints/step_00000006"
    marker = tmp_path / "pwned"
    for name in ("state/mp_rank_00_model_states.pt", "state/zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        state = torch.load(checkpoint / name, weights_only=False)  # we wrote it: trusted here
        state["payload"] = Payload(str(marker))
        torch.save(state, checkpoint / name)
    cli = [sys.executable, "-m", "alignvl_scale.cli"]
    for cmd in ([*cli, "export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "export")],
                [*cli, "eval", "--checkpoint", str(checkpoint), "--data", str(features)]):
        proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
        assert proc.returncode != 0 and "--trust-checkpoint" in proc.stderr, proc.stderr[-2000:]
    proc = train(config, "--resume", str(checkpoint))
    user_error(proc, "--trust-checkpoint", "and train")
    assert not marker.exists(), "the checkpoint ran code"
    proc = subprocess.run([*cli, "export", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "export"),
                           "--trust-checkpoint"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert marker.exists()  # the user vouched for it
    marker.unlink()
    proc = train(config, "--resume", str(checkpoint), "--trust-checkpoint")  # train takes the flag it names
    assert proc.returncode == 0 and marker.exists(), proc.stderr[-2000:]


def test_eval_entries_outside_the_set_folder_are_skipped(tmp_path):
    outside = tmp_path / "outside.png"
    outside.write_bytes(png_bytes(4))
    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "ok.png").write_bytes(png_bytes(5))
    (folder / "link.png").symlink_to(outside)
    rows = [{"image": "ok.png", "caption": "in"}, {"image": "../outside.png", "caption": "up"},
            {"image": str(outside), "caption": "absolute"}, {"image": "link.png", "caption": "a link out"}]
    (folder / "set.jsonl").write_text("\n".join(map(json.dumps, rows)))
    evalset = load_retrieval_set(str(folder / "set.jsonl"))
    assert len(evalset.images) == 1 and evalset.counts.skipped["outside_path"] == 3
    assert len(load_retrieval_set(str(folder / "set.jsonl"), allow_outside=True).images) == 4


def test_shards_folder_copies_only_images_inside_the_root(tmp_path):
    (tmp_path / "ok.png").write_bytes(png_bytes(6))
    (tmp_path / "notes.png").write_text("root:x:0:0:root:/root:/bin/bash\n")
    for row, message in (({"image": "/etc/passwd", "caption": "x"}, "outside"),
                         ({"image": "notes.png", "caption": "x"}, "undecodable_image")):
        captions = tmp_path / "captions.jsonl"
        captions.write_text(json.dumps({"image": "ok.png", "caption": "fine"}) + "\n" + json.dumps(row))
        with pytest.raises(DataSourceError, match=message):
            list(folder_samples(captions))


# -- checked before launch ------------------------------------------------------------------
@pytest.mark.parametrize("override,message", [
    ("eval.data=[/nonexistent/eval.jsonl]", "eval.data: /nonexistent/eval.jsonl is not a file"),
    ("data.train=[/nonexistent/shards]", "/nonexistent/shards"),
])
def test_paths_are_checked_before_any_process_group(tmp_path, features, override, message):
    _refused_before_any_process_group(tmp_path, features, override, message)


def test_an_eval_set_the_run_cannot_encode_is_refused_before_launch(tmp_path, features):
    """A cached-feature run trains no towers: an image eval set (a .jsonl file or image
    shards) used to pass every check, train every step and crash in the final evaluation."""
    write_image_shards(tmp_path / "images", [4])
    (tmp_path / "eval.jsonl").write_text(json.dumps({"image": "a.png", "caption": "a"}) + "\n")
    for spec in (tmp_path / "eval.jsonl", tmp_path / "images"):
        _refused_before_any_process_group(tmp_path, features, f"eval.data=[{spec}]",
                                          f"eval.data: {spec} holds image-text samples, but data.kind is features")


def _refused_before_any_process_group(tmp_path, features, override, message):
    config, run_dir = run_config(tmp_path, features)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                           str(free_port()), str(ROOT / "launchers/train.py"), "--config", str(config), override],
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "[alignvl-scale] error:" in line]
    assert 1 <= len(lines) <= 2 and all(message in line for line in lines), proc.stderr[-3000:]
    assert str(ROOT / "alignvl_scale") not in proc.stderr  # torchrun's own traceback only, none from a rank
    assert not run_dir.exists()


def test_a_tower_path_typo_is_named_not_blamed_on_the_network(tmp_path):
    write_image_shards(tmp_path / "s", [8] * 2)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"image_tower": {"name": str(tmp_path / "vit-typo")}, "text_tower": {"name": str(tmp_path)}},
        "data": {"train": [str(tmp_path / "s")], "batch_size": 4, "workers": 0},
        "train": {"steps": 1}, "run_dir": str(tmp_path / "run")}))
    user_error(train(config, no_process_group=True), "model.image_tower.name", "vit-typo does not exist")
    # Relative, "towers/vitt" where towers/ exists: it passed as a Hub id, then retried the Hub for minutes.
    (tmp_path / "towers" / "vit").mkdir(parents=True)
    (tmp_path / "towers" / "vit" / "config.json").write_text("{}")
    relative = yaml.safe_load(config.read_text())
    relative["model"]["image_tower"]["name"] = "towers/vitt"
    config.write_text(yaml.safe_dump(relative))
    proc = subprocess.run([sys.executable, "-m", "alignvl_scale.cli", "train", "--config", str(config)], cwd=tmp_path,
                          env={**env(), "MASTER_ADDR": "no-such-host.invalid", "MASTER_PORT": "9"},
                          capture_output=True, text=True, timeout=120)
    user_error(proc, "model.image_tower.name: towers/vitt does not exist (./towers/ holds ['vit'])")


def test_an_unwritable_run_dir_is_one_line(tmp_path, features):
    """run_dir=/proc/x gave two chained tracebacks (mkdir, then the lock file)."""
    config, _ = run_config(tmp_path, features)
    user_error(train(config, "run_dir=/proc/x", no_process_group=True), "run_dir /proc/x cannot be written")


def test_a_hub_name_is_checked_in_seconds_and_offline_is_explained(tmp_path):
    """A Hub id that is not in the cache, with the Hub unreachable (HF_ENDPOINT at a closed
    loopback port), or with HF_HUB_OFFLINE set: one line before launch that says how to run
    offline, not transformers' minutes of retries and its traceback."""
    write_image_shards(tmp_path / "s", [8] * 2)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"image_tower": {"name": "google/vit-tiny-nonexistent"}, "text_tower": {"kind": "minilm"}},
        "data": {"train": [str(tmp_path / "s")], "batch_size": 4, "workers": 0},
        "train": {"steps": 1}, "run_dir": str(tmp_path / "run")}))
    closed = f"http://127.0.0.1:{free_port()}"
    for extra, needle in (({"HF_ENDPOINT": closed}, f"the Hub ({closed}) did not answer"),
                          ({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE is set")):
        proc = subprocess.run([sys.executable, "-m", "alignvl_scale.cli", "train", "--config", str(config)],
                              cwd=ROOT, env={**env(), **extra, "MASTER_ADDR": "no-such-host.invalid",
                                             "MASTER_PORT": "9"}, capture_output=True, text=True, timeout=120)
        user_error(proc, "model.image_tower.name: google/vit-tiny-nonexistent is neither a local folder nor in the "
                   "Hugging Face cache", needle, "Offline and air-gapped clusters")


def test_an_export_that_dies_half_way_leaves_the_earlier_export_whole(tmp_path, base_run, monkeypatch):
    """`export` wrote over an earlier export in place: killed half way, the good one was gone.
    Now it writes beside it and renames: a write that fails (as a kill or a full disk would
    leave it) changes nothing at OUT and leaves no partial folder."""
    import alignvl_scale.export.exporter as export_module

    out = tmp_path / "exported"
    export_module.export(base_run / "checkpoints/step_00000006", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def dies_half_way(state, path):
        Path(path).write_bytes(b"half a file")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module, "save_file", dies_half_way)
    with pytest.raises(OSError, match="No space left"):
        export_module.export(base_run / "checkpoints/step_00000004", out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["exported"]


@pytest.mark.parametrize("launcher,code", [("torchrun", 1), ("accelerate", 1), ("deepspeed", 2)])
def test_a_user_error_under_each_launcher_ends_with_its_line_and_the_documented_exit_code(tmp_path, features,
                                                                                       launcher, code):
    """A mistyped key under each launcher: the launcher's exit code as docs/training.md gives
    it, and the last thing on the screen names the error: torchrun's and `accelerate launch`'s
    failure summary shows our line as the rank's root cause (torchelastic's error file), not
    "To enable traceback see ..."; `deepspeed` prints its exit code after our line."""
    config, _ = run_config(tmp_path, features, model={"noise_sigmaa": 0.1})
    proc = subprocess.run(launch_cmd(launcher, 1, config, ranks=1), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=300)  # one stream: the screen's order
    assert proc.returncode == code, proc.stdout[-3000:]
    lines = [line for line in proc.stdout.splitlines() if line.strip(" =")]
    ours = "error: model.noise_sigmaa: unknown key (did you mean 'noise_sigma'?)"
    assert any(line.startswith(f"[alignvl-scale] {ours}") for line in lines)
    if launcher == "deepspeed":
        assert lines[-1].endswith("exits with return code = 2"), lines[-3:]
    else:
        assert lines[-1].strip().startswith(f"traceback : {ours}"), lines[-3:]
