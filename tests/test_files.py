"""Atomic folder writes (alignvl_scale/runtime/files.py): what lands is readable as the user's
other files are (issue 44, item 7: exports were 0700 folders of 0600 files, which other users
and nodes on shared storage could not load), and a failed block leaves nothing."""

import os
import stat
import tempfile

import pytest

from alignvl_scale.runtime.files import written_aside


@pytest.mark.parametrize("umask,folder_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_a_folder_written_aside_takes_the_umasks_modes(tmp_path, umask, folder_mode, file_mode):
    old = os.umask(umask)
    try:
        with written_aside(tmp_path / "export") as folder:
            (folder / "sub").mkdir(mode=0o700)
            handle, name = tempfile.mkstemp(dir=folder / "sub")  # 0600, as tempfile and some savers make them
            os.write(handle, b"weights")
            os.close(handle)
            (folder / "config.json").write_text("{}")
            (folder / "run.sh").write_text("#!/bin/sh\n")
            (folder / "run.sh").chmod(0o700)
    finally:
        os.umask(old)
    out = tmp_path / "export"

    def mode(path):
        return stat.S_IMODE(path.stat().st_mode)

    assert mode(out) == mode(out / "sub") == folder_mode
    assert mode(out / "sub" / os.path.basename(name)) == mode(out / "config.json") == file_mode
    assert mode(out / "run.sh") == folder_mode  # executable stays executable


def test_a_failed_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), written_aside(tmp_path / "export") as folder:
        (folder / "half").write_text("x")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []
