"""Runs that outlive their machines: a checkpoint resumed on another number of ranks and
another ZeRO stage (weights and Adam moments exactly the checkpoint's, the epoch's data
re-dealt), preemption by a signal that reaches one rank, a full disk during a save, a
peer that dies or hangs, and the launchers on two "nodes" on loopback. Cached-feature
runs (adapters + loss: seconds per run) with noise and dropout on and a decaying LR.

Slow-marked here: the rest of the two-node launcher cells (`pytest -m slow`).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import (
    BIN,
    GLOBAL_BATCH,
    ROOT,
    Started,
    assert_continues,
    assert_lr_follows_the_schedule,
    cluster_config,
    each_step_once,
    env,
    kill_tree,
    launch_cmd,
    logged,
    rank_pids,
    resumable_copy,
    run,
    running,
    sample_keys,
    torchrun,
)
from distributed import run_ranks

from alignvl_scale.checkpoint.manager import weights_only_loads
from alignvl_scale.checkpoint.universal import convert
from alignvl_scale.config import counted
from alignvl_scale.data.synthetic import write_feature_shards
from alignvl_scale.runtime.compat import set_default_group_timeout
from alignvl_scale.runtime.distributed import free_port
from alignvl_scale.training.launch import LaunchEnv, LaunchError, check_declared_world, export_torch_env, launch_env


def optimizer_view(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every trained parameter's fp32 weight, Adam moments and step, by name, whatever
    ZeRO stage and world wrote the checkpoint (through the universal conversion)."""
    out = Path(tempfile.mkdtemp()) / "state"
    with weights_only_loads():
        convert(checkpoint, out)
    view = {}
    for folder in (p for p in (out / "zero").iterdir() if p.is_dir()):
        for file in folder.glob("*.pt"):
            value = torch.load(file, weights_only=True)
            view[f"{folder.name}/{file.stem}"] = (value["param"] if isinstance(value, dict) else value).flatten()
    return view


@pytest.fixture(scope="module")
def saved_on_two(tmp_path_factory, features):
    """2-rank runs with a checkpoint at step 7 (mid-epoch), by ZeRO stage, each made when a
    test first asks for it."""
    class Runs(dict):
        def __missing__(self, stage: int) -> Path:
            config, run_dir = cluster_config(tmp_path_factory.mktemp(f"two_ranks_zero{stage}"), features,
                                             checkpoint={"every": 7, "keep": 4})
            run(torchrun(config, 2, stage), run_dir)
            self[stage] = run_dir
            return run_dir

    return Runs()


def test_train_epochs_trains_every_sample_once_per_epoch_and_ends_with_the_schedule(tmp_path):
    """Issue 41: uneven feature shards (7 of 15 samples, the last 10, and a second source of one
    shard of 3: 103 samples) on 2 ranks with the default streams and train.epochs=2: the launch
    says how the epoch splits, each epoch's steps train every sample once apart from its 5
    padded ones, the run ends at the end of epoch 2, and its last step is the schedule's; the
    summary and the last line count every rank's samples."""
    write_feature_shards(tmp_path / "a", 100, shards=7)
    write_feature_shards(tmp_path / "b", 3, seed=1, shards=1)
    sources = [str(tmp_path / "a"), str(tmp_path / "b")]
    config, run_dir = cluster_config(tmp_path, tmp_path / "a", data={"train": sources, "streams": None},
                                     train={"steps": None, "epochs": 2})
    out = run(torchrun(config, 2, 2), run_dir)
    assert "epoch: 103 samples over 12 data streams of 1 per micro-batch = 9 micro-batches, 5 padded" in out.stdout
    keys = sample_keys(run_dir)
    assert sorted(keys) == list(range(1, 19))
    everything = {f"0_{i:05d}" for i in range(100)} | {f"1_{i:05d}" for i in range(3)}
    for epoch in range(2):
        seen = Counter(k for step in range(9 * epoch + 1, 9 * epoch + 10) for micro in keys[step] for k in micro)
        assert set(seen) == everything and sum(seen.values()) == 108, epoch
    assert_lr_follows_the_schedule(run_dir, total=18)
    # issue 44, item 3: the summary's counts are every rank's, as metrics.jsonl's (not rank 0's half)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["data"]["good"] == logged(run_dir, "data/good_samples")[18] == 2 * 108
    assert f"done at step 18: 216 good samples, skipped {{}}; {run_dir / 'summary.json'}" in out.stdout


@pytest.mark.parametrize("old_stage,ranks,stage", [(2, 3, 3), (0, 3, 3), (2, 1, 0),
                                                   pytest.param(0, 1, 1, marks=pytest.mark.slow),
                                                   pytest.param(3, 1, 1, marks=pytest.mark.slow)])
def test_a_checkpoint_resumes_on_another_world_and_zero_stage_exactly(tmp_path, features, saved_on_two, old_stage,
                                                                      ranks, stage):
    """2 ranks under ZeRO-2 -> 3 under ZeRO-3, ZeRO-0 -> 3 ranks under ZeRO-3, ZeRO-2 -> 1 rank
    under ZeRO-0, ZeRO-0 or ZeRO-3 -> 1 rank under ZeRO-1 (ZeRO-0 through universal.py's own conversion
    and load, the others through DeepSpeed's): right after
    the resume (a run of 0 more steps saves again) weights, Adam moments and steps equal the
    checkpoint's; the original is untouched; then every later step trains the uninterrupted
    run's samples to its loss (6 data streams: noise, dropout and mixup keyed by the sample),
    on the schedule, with the same contrastive batch."""
    source = saved_on_two[old_stage] / "checkpoints" / "step_00000007"
    run_dir = tmp_path / "run"
    resumable_copy(saved_on_two[old_stage], 7, run_dir)
    before = {p.relative_to(source): p.read_bytes() for p in source.rglob("*") if p.is_file()}
    config, _ = cluster_config(tmp_path, features)

    out = run(torchrun(config, ranks, stage, "--resume", "latest", "train.steps=7"), run_dir)
    line = next(x for x in out.stdout.splitlines() if "resumed from" in x)
    assert f"written by ZeRO-{old_stage} on 2 ranks, now ZeRO-{stage} on {counted(ranks, 'rank')}" in line, line
    assert "loaded from step_00000007.universal" in line, line
    assert f"6 data streams continue on {counted(ranks, 'rank')} ({6 // ranks} each): the same global batches" in line
    assert "contrastive batch changed" not in line
    assert {p.relative_to(source): p.read_bytes() for p in source.rglob("*") if p.is_file()} == before
    want, got = optimizer_view(source), optimizer_view(run_dir / "checkpoints" / "step_00000007")
    assert sorted(want) == sorted(got) and any(k.endswith("/exp_avg_sq") for k in want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)

    run(torchrun(config, ranks, stage, "--resume", "latest"), run_dir)
    assert sorted(logged(run_dir, "train/loss")) == list(range(8, 25))
    assert_continues(run_dir, saved_on_two[old_stage], 7)
    assert logged(run_dir, "train/contrastive_batch")[24] == GLOBAL_BATCH
    assert_lr_follows_the_schedule(run_dir)


def zero0_view(checkpoint: Path) -> dict[str, torch.Tensor]:
    """Every weight and every Adam state of a ZeRO-0 checkpoint (one file: the module and the
    optimizer as torch holds them), by name."""
    state = torch.load(checkpoint / "state" / "mp_rank_00_model_states.pt", weights_only=False)  # ours: trusted
    view = {f"module/{k}": v for k, v in state["module"].items()}
    for index, param_state in state["optimizer"]["state"].items():
        view.update({f"optimizer/{index}/{k}": torch.as_tensor(v) for k, v in param_state.items()})
    return view


def test_a_zero0_checkpoint_resumes_on_another_world_exactly(tmp_path, features, saved_on_two):
    """ZeRO-0 (`engine.ds_config=zero0`, DeepSpeed's data parallel: what adapter-only runs want)
    from 2 ranks to 1 needs no conversion: right after the resume (0 more steps) every weight
    and Adam state equals the checkpoint's; then training goes on from the loss it had, on the
    schedule, with the same contrastive batch."""
    source = saved_on_two[0] / "checkpoints" / "step_00000007"
    run_dir = tmp_path / "run"
    resumable_copy(saved_on_two[0], 7, run_dir)
    config, _ = cluster_config(tmp_path, features)
    out = run(torchrun(config, 1, 0, "--resume", "latest", "train.steps=7"), run_dir)
    line = next(x for x in out.stdout.splitlines() if "resumed from" in x)
    assert "written by ZeRO-0 on 2 ranks, now ZeRO-0 on 1 rank" in line and "universal" not in line, line
    want, got = zero0_view(source), zero0_view(run_dir / "checkpoints" / "step_00000007")
    assert sorted(want) == sorted(got) and any(k.endswith("/exp_avg_sq") for k in want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    run(torchrun(config, 1, 0, "--resume", "latest"), run_dir)
    assert sorted(logged(run_dir, "train/loss")) == list(range(8, 25))
    assert_continues(run_dir, saved_on_two[0], 7)
    assert logged(run_dir, "train/contrastive_batch")[24] == GLOBAL_BATCH
    assert_lr_follows_the_schedule(run_dir)


def test_three_ranks_train_the_two_rank_run_and_resume_on_two_continuing_it(tmp_path, features, saved_on_two):
    """World invariance: 3 ranks under ZeRO-3 train the very run 2 ranks under ZeRO-2 train
    (6 data streams: the same samples in every global batch, the same noise, dropout and
    mixup for each; losses within reduction order); its step-7 checkpoint resumed on 2 ranks
    under ZeRO-2 goes on as both."""
    config, three = cluster_config(tmp_path, features, "three", checkpoint={"every": 7, "keep": 4})
    run(torchrun(config, 3, 3), three)
    assert_continues(three, saved_on_two[2], 0)
    run_dir = tmp_path / "run"
    resumable_copy(three, 7, run_dir)
    config, _ = cluster_config(tmp_path, features)
    out = run(torchrun(config, 2, 2, "--resume", "latest"), run_dir)
    assert "6 data streams continue on 2 ranks (3 each): the same global batches" in out.stdout
    assert_continues(run_dir, saved_on_two[2], 7)


def test_a_world_that_does_not_divide_the_runs_streams_is_refused_before_launch(tmp_path, features, saved_on_two):
    """6 data streams cannot go on over 4 ranks: one line before any process group naming the
    worlds that can; no conversion is made."""
    run_dir = tmp_path / "run"
    resumable_copy(saved_on_two[2], 7, run_dir)
    config, _ = cluster_config(tmp_path, features, data={"streams": None})
    out = subprocess.run(torchrun(config, 4, 2, "--resume", "latest"), cwd=ROOT, env=env(), capture_output=True,
                         text=True, timeout=300)
    assert out.returncode != 0
    assert ("data.streams: step_00000007's run reads its data through 6 streams, which 4 ranks cannot share; resume "
            "on 1, 2, 3, 6 ranks to continue with the same batches") in out.stderr, out.stderr[-3000:]
    assert not (run_dir / "checkpoints" / "step_00000007.universal").exists()


def test_a_checkpoint_from_before_data_streams_resumes_with_its_epoch_re_dealt(tmp_path, features, saved_on_two):
    """A checkpoint whose data state is the per-rank, per-worker format of earlier versions
    resumes on 3 ranks: the rest of its epoch re-dealt (said in the resume line), then the
    run's data streams; training reaches its last step."""
    run_dir = tmp_path / "run"
    checkpoint = resumable_copy(saved_on_two[2], 7, run_dir)
    for rank in range(2):
        states = torch.load(checkpoint / f"rank_{rank}.pt", weights_only=True)
        states["data"]["stream"] = {"epoch": 0, "batches": 7, "items": 7, "workers": 1, "positions": {"0": [0, 7]}}
        torch.save(states, checkpoint / f"rank_{rank}.pt")
    config, _ = cluster_config(tmp_path, features)
    out = run(torchrun(config, 3, 3, "--resume", "latest"), run_dir)
    line = next(x for x in out.stdout.splitlines() if "resumed from" in x)
    assert "a checkpoint from before data streams: the rest of epoch 0 (" in line and "re-dealt to 3 ranks" in line
    assert sorted(logged(run_dir, "train/loss")) == list(range(8, 25))


@pytest.mark.slow
def test_a_siglip_checkpoint_resumes_on_another_world_and_stage_with_its_bias(tmp_path, features):
    """The sigmoid objective's learned bias goes through the universal conversion like every
    parameter: 2 ranks under ZeRO-2 -> 3 under ZeRO-3, its weight, Adam moments and step equal
    the checkpoint's, and the first step after the resume runs with the bias the original
    run's step 8 had."""
    siglip = {"objective": "siglip", "smoothing": 0.1}
    config, source = cluster_config(tmp_path, features, "two", loss=siglip, checkpoint={"every": 7, "keep": 4})
    run(torchrun(config, 2, 2), source)
    run_dir = tmp_path / "run"
    checkpoint = resumable_copy(source, 7, run_dir)
    config, _ = cluster_config(tmp_path, features, loss=siglip)
    run(torchrun(config, 3, 3, "--resume", "latest", "train.steps=7"), run_dir)
    want, got = optimizer_view(source / "checkpoints" / "step_00000007"), optimizer_view(checkpoint)
    assert sorted(want) == sorted(got) and any("logit_bias" in k for k in want)
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=0, msg=key)
    run(torchrun(config, 3, 3, "--resume", "latest"), run_dir)
    bias = logged(source, "train/logit_bias")
    assert logged(run_dir, "train/logit_bias")[8] == pytest.approx(bias[8], rel=1e-6) and bias[8] != bias[1]


def test_the_same_world_on_another_stage_continues_exactly(tmp_path, features, saved_on_two):
    """ZeRO-2 -> ZeRO-3 on the same 2 ranks: data positions and RNG streams carry over, so
    the losses after the resume equal those of the run that never changed stage."""
    run_dir = tmp_path / "run"
    resumable_copy(saved_on_two[2], 7, run_dir)
    config, _ = cluster_config(tmp_path, features)
    out = run(torchrun(config, 2, 3, "--resume", "latest"), run_dir)
    assert "ZeRO-2 on 2 ranks, now ZeRO-3 on 2 ranks" in out.stdout
    want, got = logged(saved_on_two[2], "train/loss"), logged(run_dir, "train/loss")
    assert got[8] == pytest.approx(want[8], rel=1e-6)  # the same weights, batch and noise
    # After that only the stages' reduction orders differ: two runs of this config from scratch under
    # ZeRO-2 and ZeRO-3 differed by < 1e-6 relative at every step; the shared AdamW step that ZeRO-3's
    # universal load left (fixed in Trainer.resume) made it 4e-2.
    drift = max(abs(got[s] / want[s] - 1) for s in range(8, 25))
    assert drift < 1e-4, drift


def test_a_zero0_checkpoint_without_parameter_names_stays_on_zero0(tmp_path, features, saved_on_two):
    """A ZeRO-0 checkpoint from before the manager named its optimizer's parameters cannot be
    converted: moving it to ZeRO-2 is refused before any process group, in one line saying
    what resumes it; no conversion is made."""
    run_dir = tmp_path / "run"
    checkpoint = resumable_copy(saved_on_two[0], 7, run_dir)
    meta = json.loads((checkpoint / "meta.json").read_text())
    del meta["optimizer_params"]
    (checkpoint / "meta.json").write_text(json.dumps(meta))
    config, _ = cluster_config(tmp_path, features)
    proc = subprocess.run(torchrun(config, 1, 2, "--resume", "latest"), cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0
    line = next(x for x in proc.stderr.splitlines() if "[alignvl-scale] error:" in x)
    assert "written under ZeRO-0 by a version that did not name its optimizer's parameters" in line, line
    assert "resume it under ZeRO-0 (engine.ds_config=zero0)" in line, line
    assert "]: Traceback" not in proc.stderr and not (checkpoint.parent / "step_00000007.universal").exists()


@pytest.mark.slow
def test_a_damaged_universal_conversion_is_converted_again(tmp_path, features, saved_on_two):
    """A conversion counted as complete when its folder existed: with half its parameter folders
    gone, every rank died in FileNotFoundError. Now its COMPLETE marker lists what it wrote, and
    a folder that no longer holds it is converted again, with a line saying so."""
    from alignvl_scale.checkpoint.universal import ensure_universal

    run_dir = tmp_path / "run"
    checkpoint = resumable_copy(saved_on_two[2], 7, run_dir)
    assert ensure_universal(checkpoint) is None
    params = sorted(p for p in (run_dir / "checkpoints" / "step_00000007.universal" / "state" / "zero").iterdir()
                    if p.is_dir())
    for folder in params[: len(params) // 2]:
        shutil.rmtree(folder)
    config, _ = cluster_config(tmp_path, features)
    out = run(torchrun(config, 3, 3, "--resume", "latest", "train.steps=9"), run_dir)
    assert "is not a whole conversion" in out.stdout and "converting again" in out.stdout, out.stdout[-3000:]
    assert logged(run_dir, "train/loss").keys() >= {8, 9}


@pytest.mark.parametrize("override,named", [
    ("model.embed_dim=32", "embed_dim 16 -> 32"),
    ("loss.objective=siglip", "objective infonce -> siglip"),
    ("model.adapter=linear", "adapter mlp x 1 -> linear"),
])
def test_a_checkpoint_of_another_model_is_refused_before_launch_naming_the_key(tmp_path, features, saved_on_two,
                                                                               override, named):
    """Another embed_dim, adapter or objective gave `RuntimeError: Error(s) in loading state_dict`
    with a traceback on every rank, after the process group and the engines were up. Now one line
    before any process group (a rendezvous nobody answers would hang otherwise)."""
    run_dir = tmp_path / "run"
    resumable_copy(saved_on_two[2], 7, run_dir)
    config, _ = cluster_config(tmp_path, features)
    environ = {**env(), "MASTER_ADDR": "no-such-host.invalid", "MASTER_PORT": "9"}
    proc = subprocess.run([sys.executable, "-m", "alignvl_scale.cli", "train", "--config", str(config), "--resume",
                           "latest", override], cwd=ROOT, env=environ, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    line = next(x for x in proc.stderr.splitlines() if "[alignvl-scale] error:" in x)
    assert named in line and "the ZeRO stage" in line, line


def test_another_feature_set_is_another_model(tmp_path, saved_on_two):
    """Features of another size (another text tower) are refused the same way: the dims."""
    other = tmp_path / "other"
    write_feature_shards(other, 12 * 4, dim=32, shards=4)
    run_dir = tmp_path / "run"
    resumable_copy(saved_on_two[2], 7, run_dir)
    config, _ = cluster_config(tmp_path, other)
    proc = subprocess.run([sys.executable, "-m", "alignvl_scale.cli", "train", "--config", str(config), "--resume",
                           "latest"], cwd=ROOT, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "image_dim 24 -> 32" in proc.stderr and "text_dim 24 -> 32" in proc.stderr


LONG = {"train": {"steps": 100}, "checkpoint": {"every": 10, "keep": 2}}  # long enough to be stopped mid-run


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, features):
    """The per-step losses of a 100-step 2-rank run that nobody stops."""
    config, run_dir = cluster_config(tmp_path_factory.mktemp("uninterrupted"), features, **LONG)
    run(torchrun(config, 2, 2), run_dir)
    return logged(run_dir, "train/loss")


@pytest.mark.slow
def test_kill_and_resume_matches_an_uninterrupted_run(tmp_path, features, uninterrupted):
    """SIGKILL a 2-process run mid-training, resume from `latest`: the following steps'
    losses equal those of a run that never stopped (data order, dropout, noise, optimizer),
    and the logs hold each step once (TensorBoard read by its own EventAccumulator)."""
    config, run_dir = cluster_config(tmp_path, features, **LONG)
    launch = Started(torchrun(config, 2, 2), tmp_path / "logs")
    deadline = time.time() + 240
    while time.time() < deadline and max(logged(run_dir, "train/loss") if (run_dir / "metrics.jsonl").exists()
                                         else [0], default=0) < 35:
        time.sleep(0.05)
    launch.kill()
    assert not (run_dir / "summary.json").exists(), "the run finished before it could be killed"
    resumed_from = int((run_dir / "checkpoints" / "latest").read_text().split("_")[1])
    assert 10 <= resumed_from < 100
    before_kill = logged(run_dir, "train/loss")
    # Two runs of one config log the same losses (seeded data and noise, per-rank streams).
    steps_before = range(1, resumed_from + 1)
    assert [before_kill[s] for s in steps_before] == pytest.approx([uninterrupted[s] for s in steps_before], rel=1e-6)
    out = run(torchrun(config, 2, 2, "--resume", "latest"), run_dir)
    assert f"at step {resumed_from}" in out.stdout
    resumed = logged(run_dir, "train/loss")
    for s in range(resumed_from + 1, 101):
        assert resumed[s] == pytest.approx(uninterrupted[s], rel=1e-5, abs=1e-6), s
    assert_lr_follows_the_schedule(run_dir)  # through the resume
    each_step_once(run_dir, 100)  # steps after the checkpoint were logged twice, TensorBoard zig-zagged
    kept = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert len(kept) == 2 and kept[-1] == "step_00000100"


def test_sigterm_to_one_rank_checkpoints_the_step_and_exits_0(tmp_path, features, uninterrupted):
    """SIGTERM reaches rank 1's process group only (as when a scheduler signals one node, or
    torchrun one rank): both ranks agree to stop after the step, save it, and exit 0; the resumed
    run's losses equal those of a run that never stopped (the batch fetched for the next step was
    given back)."""
    config, run_dir = cluster_config(tmp_path, features, **LONG)
    proc = subprocess.Popen(torchrun(config, 2, 2), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and max(logged(run_dir, "train/loss") if (run_dir / "metrics.jsonl").exists()
                                             else [0], default=0) < 5:
            time.sleep(0.05)
        pids = rank_pids(proc.pid)
        os.killpg(os.getpgid(pids[1]), signal.SIGTERM)  # its process group: its DataLoader's processes too
        out, err = proc.communicate(timeout=120)
    finally:
        kill_tree(proc.pid)
    assert proc.returncode == 0, err[-3000:]
    line = next(x for x in out.splitlines() if "stopped by" in x)
    step = int(line.split(" at step ")[1].split(":")[0])
    assert "a stop signal to another rank" in line or "SIGTERM" in line
    assert 5 <= step < 100 and f"checkpoints/step_{step:08d}" in line
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    assert not (run_dir / "summary.json").exists()
    run(torchrun(config, 2, 2, "--resume", "latest"), run_dir)
    got = logged(run_dir, "train/loss")
    for s in range(step + 1, 101):
        assert got[s] == pytest.approx(uninterrupted[s], rel=1e-5), s


def test_a_full_disk_during_a_save_names_the_path_and_keeps_latest(tmp_path, features):
    """The run folder on a 6 MiB tmpfs that a filler leaves nearly full after the first
    checkpoint: the next save fails with one line naming the path and "No space left on
    device"; `latest` still names the first checkpoint; no partial folder is left."""
    mount = tmp_path / "small"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        config, run_dir = cluster_config(tmp_path, features, train={"steps": 40}, checkpoint={"every": 10})
        config.write_text(config.read_text().replace(str(tmp_path / "run"), str(mount / "run")))
        run_dir = mount / "run"
        launch = Started(torchrun(config, 2, 2), tmp_path / "logs")
        deadline = time.time() + 120
        while time.time() < deadline and not (run_dir / "checkpoints" / "latest").exists():
            time.sleep(0.02)
        free = os.statvfs(mount).f_bavail * os.statvfs(mount).f_frsize
        (mount / "filler").write_bytes(b"\0" * max(free - 96 * 1024, 0))  # room for the logs, not a checkpoint
        code, out, err = launch.wait(timeout=120)
    finally:
        saved = (run_dir / "checkpoints").exists() and sorted(p.name for p in (run_dir / "checkpoints").iterdir())
        latest = (run_dir / "checkpoints" / "latest").read_text() if saved else None
        subprocess.run(["umount", "-l", str(mount)])
    assert code != 0
    line = next(x for x in err.splitlines() if "[alignvl-scale] error:" in x)
    assert "no space left on device" in line.lower() and "checkpoints/.step_" in line, line
    assert "`latest` still names step_00000010" in line, line
    assert latest == "step_00000010" and not [n for n in saved if n.endswith(".partial")], saved
    assert "]: Traceback" not in err  # no rank's traceback (torchrun prints its own for a failed child)


def _wait_in_a_new_group(rank: int, world: int) -> dict:
    """Rank 0 all-reduces in a group made after the timeout was set, as DeepSpeed makes its
    own; rank 1 never joins that call."""
    set_default_group_timeout(timedelta(seconds=2))
    group = dist.new_group(list(range(world)))  # collective: both ranks make it
    if rank == 1:
        time.sleep(6)
        return {"waited": None}
    start = time.time()
    try:
        dist.all_reduce(torch.ones(1), group=group)
    except RuntimeError:
        pass
    return {"waited": time.time() - start}


def test_groups_deepspeed_makes_wait_no_longer_than_the_collective_timeout(tmp_path):
    """DeepSpeed's own groups (new_group without a timeout) used to wait torch's 30 minutes:
    a hung peer met first in ZeRO's data-parallel group held the run that long."""
    waited = run_ranks(_wait_in_a_new_group, 2, tmp_path, timeout=60)[0]["waited"]
    assert waited is not None and waited < 5, waited


def test_a_hung_peer_ends_the_run_within_the_collective_timeout(tmp_path, features):
    """Rank 1 stopped (SIGSTOP) mid-run: rank 0 waits at most engine.collective_timeout (10 s),
    then exits with a line saying a peer was lost."""
    config, run_dir = cluster_config(tmp_path, features, train={"steps": 400}, engine={"collective_timeout": 10})
    launch = Started(torchrun(config, 2, 2), tmp_path / "logs")
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists() and logged(run_dir, "train/loss")):
            time.sleep(0.05)
        pids = rank_pids(launch.pid)
        os.kill(pids[1], signal.SIGSTOP)
        stopped = time.time()
        while time.time() < stopped + 120 and running(pids[0]):
            time.sleep(0.2)
        waited = time.time() - stopped
        os.kill(pids[1], signal.SIGKILL)
    finally:
        _, _, err = launch.wait(timeout=60)
    assert waited < 10 + 30, waited
    assert "lost contact with another rank" in err, err[-3000:]


def two_node_cmds(launcher: str, config: Path, tmp_path: Path) -> list[list[str]]:
    """Two one-rank "nodes" on loopback, each its own launcher invocation."""
    port, train = str(free_port()), [str(ROOT / "launchers" / "train.py"), "--config", str(config)]
    if launcher == "torchrun":
        return [[str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(n), "--nproc_per_node", "1",
                 "--master_addr", "127.0.0.1", "--master_port", port, *train, "engine.ds_config=zero2"]
                for n in (0, 1)]
    if launcher == "deepspeed":
        hosts = tmp_path / "hostfile"
        hosts.write_text("node-a slots=1\nnode-b slots=1\n")
        return [[str(BIN / "deepspeed"), "--no_ssh", "--hostfile", str(hosts), "--node_rank", str(n),
                 "--master_addr", "127.0.0.1", "--master_port", port, *train, "engine.ds_config=zero2"]
                for n in (0, 1)]
    return [[str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / "launchers/accelerate/zero2.yaml"),
             "--num_machines", "2", "--machine_rank", str(n), "--num_processes", "2", "--main_process_ip",
             "127.0.0.1", "--main_process_port", port, *train] for n in (0, 1)]


@pytest.fixture(scope="module")
def one_node_two_ranks(tmp_path_factory, features):
    tmp = tmp_path_factory.mktemp("one_node")
    config, run_dir = cluster_config(tmp, features, train={"steps": 8})
    run(launch_cmd("torchrun", 2, config), run_dir)
    return logged(run_dir, "train/loss")


@pytest.mark.parametrize("launcher", [pytest.param("torchrun"), pytest.param("deepspeed", marks=pytest.mark.slow),
                                      pytest.param("accelerate", marks=pytest.mark.slow)])
def test_two_nodes_of_one_rank_train_as_one_node_of_two(tmp_path, features, one_node_two_ranks, launcher):
    config, run_dir = cluster_config(tmp_path, features, train={"steps": 8})
    nodes = [Started(cmd, tmp_path / f"node{n}") for n, cmd in enumerate(two_node_cmds(launcher, config, tmp_path))]
    results = [node.wait(timeout=300) for node in nodes]
    assert [r[0] for r in results] == [0, 0], results[0][2][-3000:] + results[1][2][-3000:]
    assert "2 ranks x 6 = contrastive batch 12" in results[0][1]
    got = logged(run_dir, "train/loss")
    assert got == pytest.approx(one_node_two_ranks, rel=1e-6)


@pytest.mark.slow
def test_accelerate_machines_that_would_train_alone_are_refused(tmp_path, features):
    """accelerate launch --num_machines 2 with its default multi-node launcher (pdsh) starts a
    one-rank world on the machine: refused before training, naming the fix."""
    config, run_dir = cluster_config(tmp_path, features, train={"steps": 2})
    cmd = two_node_cmds("accelerate", config, tmp_path)[0]
    cmd[cmd.index("--num_machines"):cmd.index("--num_machines")] = ["--deepspeed_multinode_launcher", "pdsh"]
    # cwd: Accelerate writes a .deepspeed_env file there for DeepSpeed's multi-node launchers.
    proc = subprocess.run(cmd, cwd=tmp_path, env=env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "accelerate launch declared 2 processes on 2 machine(s)" in proc.stderr, proc.stderr[-3000:]
    assert "deepspeed_multinode_launcher: standard" in proc.stderr
    assert not (run_dir / "summary.json").exists()


def elastic_agent(config: Path, port: int, rdzv_id: str, folder: Path) -> Started:
    """One node of launchers/elastic.example.sh on loopback: a torchrun agent of 1 rank that
    joins a c10d rendezvous of 1 to 2 nodes and restarts its rank up to twice."""
    cmd = ["bash", str(ROOT / "launchers/elastic.example.sh"), str(config), "engine.ds_config=zero2"]
    environ = {"MIN_NODES": "1", "MAX_NODES": "2", "RANKS_PER_NODE": "1", "MAX_RESTARTS": "2",
               "RDZV_ENDPOINT": f"127.0.0.1:{port}", "RDZV_ID": rdzv_id, "LAST_CALL_S": "2",
               "PATH": f"{BIN}:{os.environ['PATH']}"}
    return Started(cmd, folder, environ)


def test_a_lost_node_is_survived_without_anyone(tmp_path, features):
    """Issue 41, item 5: two elastic agents train together; one is killed with its rank mid-run
    (SIGKILL, as a node dies); the survivor's rank fails on the dead peer, its agent restarts it
    on a world of 1, which resumes from `latest` and trains every later step on the
    uninterrupted 2-rank run's samples to its loss; the agent exits 0. What is lost: the steps
    since that checkpoint, and the restart's seconds (the timeline is printed)."""
    reference_config, reference = cluster_config(tmp_path, features, "reference", train={"steps": 60},
                                                 checkpoint={"every": 10, "keep": 2})
    run(torchrun(reference_config, 2, 2), reference)
    config, run_dir = cluster_config(tmp_path, features, train={"steps": 60}, checkpoint={"every": 10, "keep": 10})
    port, start = free_port(), time.time()
    survivor = elastic_agent(config, port, "lost-node", tmp_path / "survivor")
    # The node at the rendezvous endpoint hosts the c10d store, whose loss would end the job:
    # the survivor starts first and holds it (launchers/elastic.example.sh says so).
    listening = time.time() + 60
    while time.time() < listening and subprocess.run(["bash", "-c", f"exec 3<>/dev/tcp/127.0.0.1/{port}"],
                                                     capture_output=True).returncode:
        time.sleep(0.1)
    doomed = elastic_agent(config, port, "lost-node", tmp_path / "doomed")
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists()
                                              and max(logged(run_dir, "train/loss"), default=0) >= 24):
            time.sleep(0.05)
        killed_at, killed_step = time.time(), max(logged(run_dir, "train/loss"))
        assert killed_step < 60
        kill_tree(doomed.pid)
        code, out, err = survivor.wait(timeout=240)
    finally:
        kill_tree(survivor.pid)
        kill_tree(doomed.pid)
    ended = time.time()
    assert code == 0, out[-3000:] + err[-3000:]
    line = next(x for x in out.splitlines() if "resumed from" in x)
    assert "written by ZeRO-2 on 2 ranks, now ZeRO-2 on 1 rank" in line and "the same global batches" in line, line
    resumed = int(line.split(" at step ")[1].split(" ")[0])
    assert killed_step - 10 <= resumed <= killed_step
    assert_continues(run_dir, reference, resumed)
    restarted_at = (run_dir / "checkpoints" / f"step_{resumed + 10:08d}").stat().st_mtime
    print(f"timeline: started 0 s; node killed at {killed_at - start:.1f} s (step {killed_step}); resumed from step "
          f"{resumed} ({killed_step - resumed} steps lost); the next checkpoint at {restarted_at - start:.1f} s; "
          f"done at {ended - start:.1f} s")


def test_a_second_stop_signal_exits_at_once(tmp_path):
    """The first signal only asks for a stop after the step; the second ends the process."""
    script = tmp_path / "stop.py"
    script.write_text("import os, signal, time\nfrom alignvl_scale.training.signals import StopRequested\n"
                      "stop = StopRequested(['SIGUSR1'])\nos.kill(os.getpid(), signal.SIGUSR1)\n"
                      "print('first:', stop.signal, flush=True)\nos.kill(os.getpid(), signal.SIGUSR1)\n"
                      "time.sleep(30)\nprint('still here', flush=True)\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=60)
    assert "first: SIGUSR1" in proc.stdout and "still here" not in proc.stdout
    assert proc.returncode == -signal.SIGUSR1


@pytest.mark.parametrize("environ,want", [
    ({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "GROUP_RANK": "1"},
     LaunchEnv(3, 8, 1, "torchrun", 1, 4)),
    ({"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "CROSS_RANK": "1", "CROSS_SIZE": "2", "LOCAL_SIZE": "1"},
     LaunchEnv(1, 2, 0, "deepspeed", 1, 2)),
    ({"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_NODEID": "2", "SLURM_NNODES": "8"},
     LaunchEnv(5, 16, 1, "slurm", 2, 8)),
    ({"OMPI_COMM_WORLD_RANK": "6", "OMPI_COMM_WORLD_SIZE": "8", "OMPI_COMM_WORLD_LOCAL_RANK": "2",
      "OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, LaunchEnv(6, 8, 2, "mpi", 1, 2)),
    ({"SLURM_PROCID": "0", "SLURM_NTASKS": "1"}, LaunchEnv(0, 1, 0, "none")),  # a one-task job: no launcher
    ({"RANK": "0", "WORLD_SIZE": "2", "SLURM_PROCID": "1", "SLURM_NTASKS": "2"},  # torchrun under srun
     LaunchEnv(0, 2, 0, "torchrun", 0, 1)),
])
def test_the_launch_environment_of_each_launcher(environ, want):
    assert launch_env(environ) == want


def test_srun_without_torchrun_needs_the_rendezvous_address():
    environ = {"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_LOCALID": "1"}
    with pytest.raises(LaunchError, match="set MASTER_ADDR and MASTER_PORT"):
        export_torch_env(launch_env(environ), environ)
    environ.update(MASTER_ADDR="node-a", MASTER_PORT="29500")
    export_torch_env(launch_env(environ), environ)
    assert (environ["RANK"], environ["WORLD_SIZE"], environ["LOCAL_RANK"]) == ("1", "2", "1")


def test_a_declared_world_that_differs_is_refused_naming_the_fix():
    check_declared_world(LaunchEnv(0, 2, 0, "accelerate"), (2, 2, "standard"))
    with pytest.raises(LaunchError, match="deepspeed_multinode_launcher: standard"):
        check_declared_world(LaunchEnv(0, 1, 0, "deepspeed"), (2, 2, "pdsh"))


@pytest.mark.slow
def test_the_slurm_example_checkpoints_on_usr1_and_the_requeued_job_resumes(tmp_path, features):
    """launchers/slurm.example.sh with stand-ins for srun (runs its command here) and
    scontrol (names this host, records the requeue): USR1 to the batch script requeues the
    job and reaches the ranks through srun and torchrun; they save and exit; the script run
    again resumes from that checkpoint and finishes the run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nwhile [ \"${1#-}\" != \"$1\" ]; do shift; done\nexec \"$@\"\n")
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\n[ \"$1\" = show ] && echo 127.0.0.1 && exit 0\n"
                                      f"echo \"$@\" >> {tmp_path / 'requeued'}\n")
    for tool in ("srun", "scontrol"):
        (bin_dir / tool).chmod(0o755)
    config, run_dir = cluster_config(tmp_path, features, train={"steps": 150}, checkpoint={"every": 0})
    job = {**env(), "PATH": f"{bin_dir}:{BIN}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "node-a",
           "SLURM_NNODES": "1", "SLURM_JOB_ID": "7", "RANKS_PER_NODE": "2", "RDZV_PORT": str(free_port())}
    cmd = ["bash", str(ROOT / "launchers/slurm.example.sh"), str(config), "engine.ds_config=zero2"]
    logs = tmp_path / "job.log"
    with logs.open("w") as log:
        script = subprocess.Popen(cmd, cwd=ROOT, env=job, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.time() + 120
            while time.time() < deadline and not ((run_dir / "metrics.jsonl").exists()
                                                  and max(logged(run_dir, "train/loss"), default=0) >= 3):
                time.sleep(0.05)
            os.kill(script.pid, signal.SIGUSR1)
            script.wait(timeout=120)
        finally:
            kill_tree(script.pid)
    out = logs.read_text()
    assert (tmp_path / "requeued").read_text().split() == ["requeue", "7"], out[-3000:]
    line = next(x for x in out.splitlines() if "stopped by SIGUSR1" in x)
    step = int(line.split(" at step ")[1].split(":")[0])
    assert 3 <= step < 150 and (run_dir / "checkpoints" / "latest").read_text() == f"step_{step:08d}"
    again = subprocess.run(cmd, cwd=ROOT, env=job, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"at step {step}" in again.stdout and (run_dir / "summary.json").exists()
