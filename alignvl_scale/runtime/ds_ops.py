"""DeepSpeed's JIT-compiled ops, without silent waits.

DeepSpeed builds some ops with torch's extension loader on first use, into
TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions/<python>_<cpu|cuXYZ>/<op>/). Each
load takes `<op>/lock` (created exclusively, removed when done); a process killed while
holding it (kill -9, a timeout, torchrun tearing down its workers) leaves it behind, and every
later load waits for it forever without a word.

- On CPU the trainer does not load the one op DeepSpeed would build there
  (`deepspeed_shm_comm`): DeepSpeed uses it only for `inference_all_reduce`, never in
  training, and falls back to torch.distributed without it (benchmarks/first_launch_bench.py
  measures both: same step time, minutes of build saved on a first launch).
- Every op DeepSpeed does build (CPU Adam for offload, ops on GPU) goes through `guarded`:
  one line says what is built, where, and about how long it takes; a lock that no process on
  this machine holds open is stale (the builder holds its file descriptor until it is done)
  and is removed with a line saying so (on a file system other machines share, where the
  builder may be elsewhere, it is reported with the fix instead); a live builder is named
  every minute while this process waits for it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from alignvl_scale.runtime import compat
from alignvl_scale.runtime.log import say

SHARED_FILE_SYSTEMS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "ceph", "fuse", "glusterfs",
                       "panfs", "wekafs")


def _say(message: str) -> None:
    say(message, every_rank=True)  # each rank waits for its own build


build_dir = compat.extension_build_dir  # where torch's extension loader builds (and locks) an op


def lock_holders(lock: Path) -> list[int]:
    """Processes on this machine with `lock` open (the builder keeps its descriptor until
    it removes the lock)."""
    holders = []
    target = str(lock.resolve())
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        try:
            if any(os.readlink(fd) == target for fd in fd_dir.iterdir()):
                holders.append(int(fd_dir.parent.name))
        except OSError:  # gone, or not ours to read
            continue
    return holders


def file_system(path: Path) -> str:
    """The type of the file system `path` is on (from /proc/mounts; '' when unknown)."""
    try:
        mounts = [line.split() for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return ""
    path = str(path.resolve())
    best = max((m for m in mounts if len(m) > 2 and (path == m[1] or path.startswith(m[1].rstrip("/") + "/"))),
               key=lambda m: len(m[1]), default=None)
    return best[2] if best else ""


def _command(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return "?"


def clear_stale_lock(lock: Path, report_every: float = 60.0, timeout: float | None = None) -> None:
    """Return once `lock` is gone or removed as stale; wait (saying so) while a live process
    holds it. timeout: give up (TimeoutError) after this many seconds of waiting."""
    start, reported = time.monotonic(), None
    while lock.exists():
        holders = lock_holders(lock)
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:  # released meanwhile
            return
        fs = file_system(lock)
        if not holders and fs.split(".")[0] not in SHARED_FILE_SYSTEMS:
            lock.unlink(missing_ok=True)
            _say(f"removed a stale DeepSpeed build lock {lock} (age {age:.0f} s; no process holds it: a launch "
                 "killed while building left it)")
            return
        if reported is None or time.monotonic() - reported >= report_every:
            reported = time.monotonic()
            if holders:
                who = ", ".join(f"pid {p} ({_command(p)})" for p in holders[:3])
                _say(f"waiting for {who} to finish building in {lock.parent} (lock held {age:.0f} s)")
            else:
                _say(f"waiting for the DeepSpeed build lock {lock} (age {age:.0f} s) on a shared {fs} file system: "
                     "no process on this machine holds it; if no machine is building this op (a killed launch left "
                     f"it), remove it: rm {lock}")
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"{lock} still held after {timeout:.0f} s")
        time.sleep(0.5)


def guarded(jit_load):
    """Wrap DeepSpeed's OpBuilder.jit_load: announce a build, clear a stale lock first."""

    def load(builder, verbose: bool = True):
        folder = build_dir(builder.name)
        built = any(folder.glob(f"{builder.name}*.so"))
        clear_stale_lock(folder / "lock")
        if not built:
            _say(f"building DeepSpeed op {builder.name} into {folder} (once per machine and version; usually "
                 "1-15 minutes, silent until done)")
        return jit_load(builder, verbose)

    load.alignvl_guarded = True
    return load


def prepare_deepspeed_ops(on_gpu: bool) -> None:
    """Before DeepSpeed starts its communication backend: guard its JIT builds, and on CPU
    keep it from building its shared-memory op (training never uses it)."""
    compat.guard_op_builds(guarded)
    if not on_gpu and os.environ.get("ALIGNVL_DS_SHM_COMM", "0") != "1":
        compat.skip_op("deepspeed_shm_comm")
