"""Signals as a cluster user sends them: to a launcher, to a rank's whole process group, Ctrl-C
once and twice, kill -9 of a rank and kill -9 before the first checkpoint. Each run is a real
launch on tiny cached-feature shards (1-2 gloo ranks); what a user reads afterwards (exit codes,
the checkpoint, TensorBoard's own EventAccumulator, metrics.jsonl) is what is checked. The other
resume seams (kill -9 after a checkpoint, a damaged universal conversion, a checkpoint of
another model) are in tests/test_cluster.py.

Slow-marked: SIGTERM to torchrun and to `accelerate launch`, Ctrl-C under the `deepspeed`
launcher (`pytest -m slow`).
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import (
    BIN,
    ROOT,
    Started,
    cluster_config,
    descendants,
    each_step_once,
    env,
    launch_cmd,
    logged,
    rank_pids,
    run,
    running,
    torchrun,
)

from alignvl_scale.data.synthetic import write_feature_shards


@pytest.fixture(scope="module")
def one_step_epochs(tmp_path_factory):
    """Two shards of 6: with 2 ranks and 2 data streams (one shard each), every epoch is one step
    (a new epoch, and new DataLoader workers from the fork server, at every step)."""
    root = tmp_path_factory.mktemp("tiny")
    write_feature_shards(root / "train", 12, shards=2)
    return root / "train"


def config_for(tmp_path: Path, features: Path, name: str = "run", **sections) -> tuple[Path, Path]:
    """A run long enough to be stopped mid-way (400 steps), checkpoints every 5 steps."""
    return cluster_config(tmp_path, features, name, **{"train": {"steps": 400}, "checkpoint": {"keep": 2}, **sections})


def train_cmd(config: Path, *args: str) -> list[str]:
    """One process, no launcher (`alignvl-scale train`)."""
    return [sys.executable, "-m", "alignvl_scale.cli", "train", "--config", str(config), *args]


def wait_for_step(run_dir: Path, step: int, launch: Started, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if (run_dir / "metrics.jsonl").exists() and max(logged(run_dir, "train/loss"), default=0) >= step:
            return
        if launch.proc.poll() is not None:
            raise AssertionError(f"the launch ended early: {launch.err.read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"step {step} not reached in {timeout} s")


def stopped_step(out: str, why: str) -> int:
    """The step of the trainer's `stopped by` line (its checkpoint's step)."""
    line = next(x for x in out.splitlines() if "stopped by" in x)
    assert why in line, line
    return int(line.split(" at step ")[1].split(":")[0])


# -- kill -9 before the first checkpoint (after it: tests/test_cluster.py, the kill test) ------
def test_kill_9_before_the_first_checkpoint_restarts_with_fresh_logs(tmp_path, features):
    """No checkpoint yet: `--resume latest` starts over, and the logs start over with it (they
    held steps 1..k of the dead run, then 1..N again)."""
    config, run_dir = config_for(tmp_path, features, checkpoint={"every": 0})
    launch = Started(train_cmd(config), tmp_path / "logs")
    wait_for_step(run_dir, 4, launch)
    launch.kill()
    assert not (run_dir / "checkpoints").exists()
    out = run(train_cmd(config, "--resume", "latest", "train.steps=8"), run_dir)
    assert "resumed from" not in out.stdout
    each_step_once(run_dir, 8)


# -- signals to a rank's process group, and to the launchers ---------------------------------
def test_sigterm_to_a_ranks_process_group_stops_at_a_step_with_a_checkpoint(tmp_path, one_step_epochs):
    """torchrun signals each rank's whole process group when it shuts down (SLURM: every process
    of the step). The DataLoader's fork server died with it, and the next epoch could not start
    its workers (`BrokenPipeError` on every rank, no checkpoint). Now the fork server and the
    workers ignore the rank's stop signals, and the stop is agreed before a new epoch starts
    them: exit 0, the stopped step saved, and the run resumes from it."""
    config, run_dir = config_for(tmp_path, one_step_epochs, data={"streams": 2})
    launch = Started(torchrun(config, 2, 2), tmp_path / "logs")
    wait_for_step(run_dir, 3, launch)
    os.killpg(os.getpgid(rank_pids(launch.pid)[1]), signal.SIGTERM)
    code, out, err = launch.wait(timeout=120)
    assert code == 0, err[-3000:]
    assert "BrokenPipeError" not in err and "Traceback" not in err
    step = stopped_step(out, "")  # rank 0 names "a stop signal to another rank"
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{step:08d}"  # resumed exactly: test_cluster.py


def test_a_rank_killed_with_sigkill_takes_its_fork_server_and_workers_along(tmp_path, features):
    """The fork server and its workers ignore the stop signals now, so nothing but the rank may
    end them: torch's watchdog watches a worker's parent (the fork server, alive), and the fork
    server lives while a worker holds its pipe. A rank killed alone left both behind for good."""
    config, run_dir = config_for(tmp_path, features)
    launch = Started(train_cmd(config), tmp_path / "logs")
    wait_for_step(run_dir, 3, launch)
    helpers = descendants(launch.pid)
    assert len(helpers) >= 2, helpers  # the fork server and at least one worker
    os.kill(launch.pid, signal.SIGKILL)
    launch.proc.wait()
    deadline = time.time() + 20
    while time.time() < deadline and any(map(running, helpers)):
        time.sleep(0.1)
    alive = [p for p in helpers if running(p)]
    for p in alive:
        os.kill(p, signal.SIGKILL)
    assert not alive, alive


@pytest.mark.slow
def test_sigterm_to_torchrun_saves_and_its_exit_code_is_documented(tmp_path, features):
    """torchrun forwards SIGTERM to each rank's process group; the ranks save and exit 0, and
    torchrun itself then exits 1 with its SignalException (docs/training.md says so)."""
    config, run_dir = config_for(tmp_path, features)
    launch = Started(torchrun(config, 2, 2), tmp_path / "logs")
    wait_for_step(run_dir, 3, launch)
    launch.proc.send_signal(signal.SIGTERM)
    code, out, err = launch.wait(timeout=120)
    assert code == 1 and "SignalException" in err, (code, err[-3000:])
    step = stopped_step(out, "SIGTERM")
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{step:08d}"


def test_ctrl_c_under_accelerate_launch_stops_at_a_step_and_saves(tmp_path, features):
    """Ctrl-C in a terminal: SIGINT to the foreground process group, which is the launcher's
    (torch elastic starts each rank in a session of its own and forwards the signal). SIGINT was
    not a stop signal: a KeyboardInterrupt traceback per rank, no checkpoint."""
    config, run_dir = config_for(tmp_path, features)
    launch = Started(launch_cmd("accelerate", 2, config), tmp_path / "logs")
    wait_for_step(run_dir, 3, launch)
    os.killpg(launch.pid, signal.SIGINT)
    code, out, err = launch.wait(timeout=120)
    assert "KeyboardInterrupt" not in err, err[-3000:]
    step = stopped_step(out, "SIGINT")
    assert code == 130, code  # the launcher's own exit for SIGINT, 128 + 2 (docs/training.md)
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{step:08d}"


@pytest.mark.slow
def test_sigterm_to_accelerate_launch_saves(tmp_path, one_step_epochs):
    """`kill -TERM` of the accelerate launcher: its ranks got SIGTERM on their process groups and
    died in `popen_forkserver.py` (BrokenPipeError), no checkpoint."""
    config, run_dir = config_for(tmp_path, one_step_epochs, data={"streams": 2})
    launch = Started(launch_cmd("accelerate", 2, config), tmp_path / "logs")
    wait_for_step(run_dir, 3, launch)
    launch.proc.send_signal(signal.SIGTERM)
    code, out, err = launch.wait(timeout=120)
    assert "BrokenPipeError" not in err, err[-3000:]
    step = stopped_step(out, "SIGTERM")
    assert code == 143 and (run_dir / "checkpoints" / "latest").read_text() == f"step_{step:08d}"  # 128 + 15


def deepspeed_cmd(config: Path) -> list[str]:
    from alignvl_scale.runtime.distributed import free_port

    return [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
            str(ROOT / "launchers" / "train.py"), "--config", str(config), "engine.ds_config=zero2"]


@pytest.mark.slow
def test_ctrl_c_under_the_deepspeed_launcher_saves_though_it_adds_a_sigterm(tmp_path, one_step_epochs):
    """Ctrl-C reaches every process of the `deepspeed` launcher's group at once (launcher, ranks,
    fork servers, workers), and the launcher then sends SIGTERM to its whole tree: the ranks get
    two different signals, and still save once (a second *same* signal would abort)."""
    config, run_dir = config_for(tmp_path, one_step_epochs, data={"streams": 2})
    launch = Started(deepspeed_cmd(config), tmp_path / "logs")
    wait_for_step(run_dir, 3, launch)
    os.killpg(launch.pid, signal.SIGINT)
    code, out, err = launch.wait(timeout=120)
    step = stopped_step(out, "SIGINT")
    assert (run_dir / "checkpoints" / "latest").read_text() == f"step_{step:08d}", err[-3000:]
    # The only traceback is the `deepspeed` command's own KeyboardInterrupt, none from a rank.
    assert "BrokenPipeError" not in err and err.count("Traceback") == err.count("launcher/runner.py"), err[-3000:]
    assert code == -signal.SIGINT, code  # the `deepspeed` command dies of the SIGINT: 130 in a shell (docs/training.md)


def test_ctrl_c_twice_aborts_at_once_and_a_launchers_sigterm_between_does_not(tmp_path):
    """The real handler in a process of its own: the first SIGINT only asks for a stop; the
    SIGTERM a launcher adds (the `deepspeed` launcher, after the terminal's SIGINT) does not
    abort the save it asked for; a second SIGINT ends the process at once."""
    script = tmp_path / "stop.py"
    script.write_text("import os, signal, time\nfrom alignvl_scale.training.signals import StopRequested\n"
                      "stop = StopRequested(['SIGTERM', 'SIGINT'])\n"
                      "os.kill(os.getpid(), signal.SIGINT)\nprint('first:', stop.signal, flush=True)\n"
                      "os.kill(os.getpid(), signal.SIGTERM)\nprint('after SIGTERM:', stop.signal, flush=True)\n"
                      "os.kill(os.getpid(), signal.SIGINT)\ntime.sleep(30)\nprint('still here', flush=True)\n")
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=60)
    assert "first: SIGINT" in proc.stdout and "after SIGTERM: SIGINT" in proc.stdout, proc.stderr[-2000:]
    assert "still here" not in proc.stdout and proc.returncode == -signal.SIGINT
