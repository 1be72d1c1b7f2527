"""Stop signals (train.stop_signals: SIGTERM, SIGUSR1 and SIGINT by default): the first one asks
every rank to stop after its step, save and exit 0 (agreed across ranks: the signal may reach
only one); the same signal a second time ends the process at once.

Why "the same": launchers add signals of their own. Ctrl-C in a terminal sends SIGINT to every
process of the foreground group, and the `deepspeed` launcher, which gets it too, then sends
SIGTERM to every rank; a rank that counted any two signals would die in the middle of the
save the first one asked for. A second Ctrl-C is a second SIGINT.

The rank's helper processes (the DataLoader's fork server and its workers) ignore these
signals: torchrun signals each rank's whole process group, the `deepspeed` launcher every
process of the tree, SLURM every process of the step, and a fork server that died with them
left the next epoch unable to start its workers before the stop was agreed
(data/worker_signals.py).
"""

from __future__ import annotations

import os
import signal


class StopRequested:
    def __init__(self, names: list[str]) -> None:
        self.signal: str | None = None
        self.previous = {name: signal.signal(getattr(signal, name), self._handle) for name in names}

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.previous)

    def restore(self) -> None:
        """The handlers from before (a process that trains in-process goes on without them)."""
        for name, handler in self.previous.items():
            signal.signal(getattr(signal, name), handler)

    def _handle(self, signum: int, _frame) -> None:
        name = signal.Signals(signum).name
        if name == self.signal:  # the same signal again: now
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        self.signal = self.signal or name
