"""Shared by the tests: where the project and its launchers are, the environment ranks run in,
launching a real training and reading back what it logged, and taking a launch down."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))  # tests/distributed.py for spawned ranks
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Any op torch JIT-builds for a test goes into a folder of this test run's own, never behind a lock
# in the user's ~/.cache/torch_extensions (on CPU the trainer builds none: alignvl_scale/runtime/ds_ops.py).
os.environ.setdefault("TORCH_EXTENSIONS_DIR", tempfile.mkdtemp(prefix="alignvl-tests-torch-ext-"))

from alignvl_scale.config import config_from_dict  # noqa: E402
from alignvl_scale.data.synthetic import (  # noqa: E402,F401
    make_tiny_towers,
    png_bytes,
    write_feature_shards,
    write_image_shards,
)
from alignvl_scale.runtime.distributed import free_port  # noqa: E402
from alignvl_scale.training.schedule import learning_rate  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent

# Seen on this machine: a finished accelerate-launched rank can abort at interpreter exit.
EXIT_ABORT = "terminate called without an active exception"


GLOBAL_BATCH = 12  # 2 ranks x 6, 3 x 4, 1 x 12


@pytest.fixture(scope="module")
def features(tmp_path_factory) -> Path:
    """Cached features for `cluster_config` runs: an epoch is 16 steps of GLOBAL_BATCH."""
    root = tmp_path_factory.mktemp("features")
    write_feature_shards(root / "train", GLOBAL_BATCH * 16, shards=12)
    return root / "train"


def cluster_config(tmp_path: Path, features: Path, name: str = "run", **sections) -> tuple[Path, Path]:
    """A cached-feature run of two towers' worth of features for 1-3 ranks (6 data streams), with
    noise, dropout, mixup and a decaying learning rate, every step and its sample keys logged;
    `sections` update it key by key."""
    run_dir = tmp_path / name
    cfg = {"model": {"embed_dim": 16, "adapter": "mlp", "adapter_depth": 1, "noise_sigma": 0.05, "dropout": 0.1,
                     "mixup": "permutation"},
           "data": {"kind": "features", "train": [str(features)], "global_batch_size": GLOBAL_BATCH, "workers": 1,
                    "streams": 6},
           "train": {"steps": 24, "lr": 0.01, "warmup_steps": 3, "min_lr_ratio": 0.1, "log_every": 1},
           "checkpoint": {"every": 5, "keep": 3}, "log": {"sample_keys": True}, "run_dir": str(run_dir)}
    for section, values in sections.items():
        cfg.setdefault(section, {}).update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path, run_dir


def launch_cmd(launcher: str, stage: int, config: Path, *args: str, ranks: int = 2) -> list[str]:
    port = str(free_port())
    train = [str(ROOT / "launchers" / "train.py"), "--config", str(config), *args]
    if launcher == "torchrun":
        return [str(BIN / "torchrun"), "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
                "--master_port", port, *train, f"engine.ds_config=ds_configs/zero{stage}.json"]
    if launcher == "deepspeed":
        return [str(BIN / "deepspeed"), "--num_gpus", str(ranks), "--master_port", port, *train,
                f"engine.ds_config=ds_configs/zero{stage}.json"]
    return [str(BIN / "accelerate"), "launch", "--config_file", str(ROOT / f"launchers/accelerate/zero{stage}.yaml"),
            "--num_processes", str(ranks), "--main_process_port", port, *train]


def env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(cmd: list[str], run_dir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=timeout)
    output = proc.stdout + proc.stderr
    finished = (run_dir / "summary.json").exists()
    assert proc.returncode == 0 or (finished and EXIT_ABORT in output), output[-5000:]
    return proc


def logged(run_dir: Path, key: str) -> dict[int, float]:
    """step -> value, the last record of each step (a resumed run appends)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            out[record["step"]] = record[key]
    return out


def sample_keys(run_dir: Path) -> dict[int, list[list[str]]]:
    """step -> its micro-batches' sample keys in the global batch's order (log.sample_keys)."""
    return {r["step"]: r["keys"] for r in map(json.loads, (run_dir / "sample_keys.jsonl").read_text().splitlines())}


def assert_continues(resumed: Path, uninterrupted: Path, after: int) -> None:
    """Every step of `resumed` after step `after` trained the uninterrupted run's samples, in
    the same global order, to its loss (within float reduction order: rel 1e-5)."""
    losses, want = logged(resumed, "train/loss"), logged(uninterrupted, "train/loss")
    keys, want_keys = sample_keys(resumed), sample_keys(uninterrupted)
    steps = sorted(s for s in losses if s > after)
    assert steps and steps == sorted(s for s in want if s > after), (steps, sorted(want))
    for step in steps:
        assert keys[step] == want_keys[step], step
        assert losses[step] == pytest.approx(want[step], rel=1e-5), (step, losses[step], want[step])


def each_step_once(run_dir: Path, last: int) -> None:
    """metrics.jsonl and TensorBoard (read by its own EventAccumulator, which honours the purge
    markers a resumed run writes) hold train/loss for steps 1..last, each once, in order."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in records if "train/loss" in r]
    assert steps == list(range(1, last + 1)), steps
    events = EventAccumulator(str(run_dir / "tb"))
    events.Reload()
    for tag in ("train/loss", "train/lr", "data/good_samples"):
        logged_steps = [e.step for e in events.Scalars(tag)]
        assert logged_steps == list(range(1, last + 1)), (tag, logged_steps)


def assert_lr_follows_the_schedule(run_dir: Path, total: int | None = None) -> None:
    """`train/lr` (read back from the optimizer DeepSpeed steps) at every logged step s is
    the schedule's value for the optimizer step that made s: warmup, then cosine over
    train.steps (or `total`, a run's steps from train.epochs)."""
    cfg = config_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()), validate=False)
    lrs = logged(run_dir, "train/lr")
    assert lrs, "no train/lr logged"
    total = total or cfg.train.steps
    assert max(lrs) == total, (max(lrs), total)
    for step, lr in lrs.items():
        assert lr == pytest.approx(learning_rate(cfg.train, step - 1, total), rel=1e-6), (step, lrs)



def borrowing_venv(folder: Path) -> tuple[Path, Path]:
    """A fresh venv whose dependencies (torch, transformers, ...) are this environment's,
    borrowed through a .pth path entry, where the editable install's own .pth files are not
    read: alignvl_scale cannot be imported there (a stranger's machine, or the wheel's). Returns
    its python and its site-packages."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(folder)], check=True, timeout=120)
    python = folder / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "borrowed_dependencies.pth").write_text(str(Path(yaml.__file__).parents[1]) + "\n")
    return python, site


def descendants(pid: int) -> list[int]:
    """Every process below `pid` (children, theirs, ...), from /proc."""
    found, frontier = [], [pid]
    while frontier:
        parent = frontier.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                children = [int(c) for c in (task / "children").read_text().split()]
            except OSError:  # gone meanwhile
                continue
            found += children
            frontier += children
    return found


def running(pid: int) -> bool:
    """Alive and not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants at once, as when a node dies."""
    for member in [pid, *descendants(pid)]:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass



class Started:
    """A launch in the background whose output goes to files (a pipe nobody reads fills up
    and blocks the ranks that write to it)."""

    def __init__(self, cmd: list[str], folder: Path, environ: dict | None = None) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.out, self.err = folder / "stdout.log", folder / "stderr.log"
        with self.out.open("w") as out, self.err.open("w") as err:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env={**env(), **(environ or {})}, stdout=out, stderr=err,
                                         start_new_session=True)
        self.pid = self.proc.pid

    def wait(self, timeout: float) -> tuple[int, str, str]:
        try:
            code = self.proc.wait(timeout=timeout)
        finally:
            kill_tree(self.proc.pid)
        return code, self.out.read_text(), self.err.read_text()

    def kill(self) -> None:
        """SIGKILL the launcher and its ranks at once, as when a node dies."""
        kill_tree(self.proc.pid)
        self.proc.wait()



def torchrun(config: Path, ranks: int, stage: int, *args: str) -> list[str]:
    return [str(BIN / "torchrun"), "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1", "--master_port",
            str(free_port()), str(ROOT / "launchers" / "train.py"), "--config", str(config), *args,
            f"engine.ds_config=zero{stage}"]



def rank_pids(launcher: int) -> dict[int, int]:
    """rank -> pid of the trainer processes a torchrun process started (its children)."""
    found = {}
    for task in Path(f"/proc/{launcher}/task").glob("*"):
        for pid in (task / "children").read_text().split():
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            rank = [v.split("=", 1)[1] for v in environ if v.startswith("RANK=")]
            if rank:
                found[int(rank[0])] = int(pid)
    return found


def resumable_copy(run_dir: Path, step: int, to: Path) -> Path:
    """A run folder holding only `run_dir`'s checkpoint of `step`, named by `latest`."""
    name = f"step_{step:08d}"
    shutil.copytree(run_dir / "checkpoints" / name, to / "checkpoints" / name)
    (to / "checkpoints" / "latest").write_text(name)
    return to / "checkpoints" / name
