"""One voice: Python `logging` under the logger "alignvl_scale", every line prefixed
"[alignvl-scale] ". Information goes to stdout from the launch's rank 0 only (every rank runs
the same code and would say the same), or from every rank where it says so; warnings and errors
go to stderr from every rank. The streams are looked up at each line, so that a caller that
redirects them (pytest, `ablate`'s worker processes) gets the lines.

    say("resumed from ...")                      # rank 0, stdout
    say("building an op ...", every_rank=True)   # each rank waits for its own
    error("error: ...")                          # stderr
    with progress(total, "encode images", "image") as bar: bar.update(n)   # every wait, rank 0
"""

from __future__ import annotations

import logging
import os
import sys

PREFIX = "[alignvl-scale] "
_LOGGER = logging.getLogger("alignvl_scale")


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    try:
        return int(os.environ.get("RANK", "0"))  # before the process group: what the launcher said
    except ValueError:
        return 0


class _Streams(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.WARNING and not getattr(record, "every_rank", False) and _rank() != 0:
            return
        stream = sys.stderr if record.levelno >= logging.WARNING else sys.stdout
        print(self.format(record), file=stream, flush=True)


def logger() -> logging.Logger:
    if not _LOGGER.handlers:
        handler = _Streams()
        handler.setFormatter(logging.Formatter(PREFIX + "%(message)s"))
        _LOGGER.addHandler(handler)
        _LOGGER.setLevel(logging.INFO)
        _LOGGER.propagate = False
    return _LOGGER


def say(message: str, every_rank: bool = False) -> None:
    logger().info(message, extra={"every_rank": every_rank})


def warn(message: str) -> None:
    logger().warning(message)


def error(message: str) -> None:
    logger().error(message)


def progress(total: int | None, desc: str, unit: str, initial: int = 0, leave: bool = True, enabled: bool = True):
    """The one progress bar of every wait (tqdm, on stderr): on the launch's rank 0 only (and
    where `enabled`), redrawn ten times a second on a terminal and once every 30 s in a log
    file (a line per interval)."""
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=leave, dynamic_ncols=True,
                disable=not enabled or _rank() != 0, mininterval=0.1 if sys.stderr.isatty() else 30)
