"""Writes that a kill at any moment leaves whole or not at all: a file or a folder is written
beside its place, then renamed into it (os.replace is atomic on one file system)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


def write_text_atomic(path: Path, text: str) -> None:
    """`path` holds either its old content or `text`, never part of it."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, value: object) -> None:
    write_text_atomic(path, json.dumps(value, indent=1))


def replace_dir(partial: Path, final: Path) -> None:
    """Move a folder written aside into place. An earlier folder of that name is moved out of
    the way first and deleted after, so that no reader ever sees the two merged."""
    old = final.with_name(f".{final.name}.old-{os.getpid()}")
    if final.exists():
        os.replace(final, old)
    os.replace(partial, final)
    shutil.rmtree(old, ignore_errors=True)


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def with_umask_modes(folder: Path) -> None:
    """`folder` and everything in it readable as the user's other files are: the modes a plain
    mkdir and open would give under the umask (tempfile's private 0700 and 0600 undone)."""
    mask = current_umask()
    for path in [folder, *folder.rglob("*")]:
        if not path.is_symlink():
            path.chmod((0o777 if path.is_dir() or os.access(path, os.X_OK) else 0o666) & ~mask)


@contextmanager
def written_aside(out: str | Path):
    """A fresh folder beside `out` to write into; it replaces `out` when the block completes
    (an earlier `out` stays whole until then), with the umask's modes (`with_umask_modes`: on
    shared storage other users and nodes read it), and is removed when the block fails."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    with_umask_modes(partial)
    replace_dir(partial, out)
