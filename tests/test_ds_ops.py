"""A first launch that never waits silently on a DeepSpeed build lock (alignvl_scale/runtime/ds_ops.py):
a stale lock is removed with a line, a live builder is named while we wait, a lock on a
shared file system is reported with the fix, and training on CPU builds no op at all."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, cluster_config, env, torchrun

from alignvl_scale.runtime import ds_ops


def test_a_stale_build_lock_is_removed_with_a_line(tmp_path, capsys):
    lock = tmp_path / "op" / "lock"
    lock.parent.mkdir()
    lock.touch()  # what a builder killed with SIGKILL leaves: no process holds it
    ds_ops.clear_stale_lock(lock, timeout=10)
    assert not lock.exists()
    assert f"removed a stale DeepSpeed build lock {lock}" in capsys.readouterr().out


def test_a_live_builder_is_named_and_waited_for(tmp_path, capsys):
    lock = tmp_path / "op" / "lock"
    lock.parent.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import os, sys, time\n"
                               f"fd = os.open({str(lock)!r}, os.O_CREAT | os.O_EXCL)  # as torch's FileBaton\n"
                               "print('held', flush=True)\ntime.sleep(3)\nos.remove(" + repr(str(lock)) + ")\n"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        start = time.monotonic()
        ds_ops.clear_stale_lock(lock, report_every=1, timeout=30)
        waited = time.monotonic() - start
    finally:
        holder.kill()
    assert 1 < waited < 30
    assert f"waiting for pid {holder.pid}" in capsys.readouterr().out


def test_a_lock_on_a_shared_file_system_is_reported_with_the_fix(tmp_path, capsys, monkeypatch):
    lock = tmp_path / "lock"
    lock.touch()
    monkeypatch.setattr(ds_ops, "file_system", lambda path: "nfs4")  # another machine may be the builder
    with pytest.raises(TimeoutError):
        ds_ops.clear_stale_lock(lock, report_every=1, timeout=1.5)
    assert lock.exists()
    assert f"remove it: rm {lock}" in capsys.readouterr().out


def op_dir_under(extensions) -> str:
    """Where torch would build DeepSpeed's shared-memory op with TORCH_EXTENSIONS_DIR=extensions."""
    code = "from alignvl_scale.runtime.ds_ops import build_dir; print(build_dir('deepspeed_shm_comm'))"
    return subprocess.run([sys.executable, "-c", code], env={**env(), "TORCH_EXTENSIONS_DIR": str(extensions)},
                          capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]


def test_training_on_cpu_builds_no_op_and_ignores_a_stale_lock(tmp_path, features):  # noqa: F811
    """The lock a killed first launch leaves where DeepSpeed builds its shared-memory op:
    a 2-rank launch trains anyway (it never loads that op on CPU) and leaves the folder as
    it was."""
    extensions = tmp_path / "torch_extensions"
    op_dir = Path(op_dir_under(extensions))  # (torch makes the folder)
    (op_dir / "lock").touch()
    config, run_dir = cluster_config(tmp_path, features, train={"steps": 3})
    proc = subprocess.run(torchrun(config, 2, 2), cwd=ROOT, env={**env(), "TORCH_EXTENSIONS_DIR": str(extensions)},
                          capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (op_dir / "lock").exists() and sorted(p.name for p in op_dir.iterdir()) == ["lock"]
    assert "deepspeed_shm_comm" not in proc.stdout + proc.stderr


@pytest.mark.slow
def test_a_real_op_build_behind_a_stale_lock_says_so_and_finishes(tmp_path):
    """DeepSpeed's shared-memory op built for real (what a GPU-less launch would build
    without ds_ops) into a fresh folder holding a stale lock: removed, announced, built."""
    code = ("from deepspeed.accelerator import get_accelerator\nfrom alignvl_scale.runtime.ds_ops import "
            "prepare_deepspeed_ops\nprepare_deepspeed_ops(on_gpu=False)\n"
            "print(get_accelerator().create_op_builder('ShareMemCommBuilder').load())\n")
    folder = tmp_path / "ext"
    op_dir = op_dir_under(folder)
    open(os.path.join(op_dir, "lock"), "w").close()
    run_env = {**env(), "TORCH_EXTENSIONS_DIR": str(folder), "ALIGNVL_DS_SHM_COMM": "1"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=run_env, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "removed a stale DeepSpeed build lock" in proc.stdout and "building DeepSpeed op deepspeed_shm_comm" in \
        proc.stdout
    assert "deepspeed_shm_comm.so" in proc.stdout


