"""Imported first by the DataLoader's fork server (data/reader.py `worker_context`): the fork
server, and every worker it forks, ignore the signals the rank that started it handles itself
(train.stop_signals). A launcher that signals the rank's whole process group, or every process
of a job (SLURM), then stops the rank at a step's end as asked, instead of killing the process
the next epoch's workers come from. The rank names the signals, and itself, in IGNORED_SIGNALS
before the fork server starts; in any other process importing this changes nothing.
"""

import os
import signal

IGNORED_SIGNALS = "ALIGNVL_WORKERS_IGNORE"  # "<pid of the rank>:SIGTERM,SIGINT,..."

_owner, _, _names = os.environ.get(IGNORED_SIGNALS, "").partition(":")
if _owner and _owner == str(os.getppid()):
    for _name in filter(None, _names.split(",")):
        signal.signal(getattr(signal, _name), signal.SIG_IGN)
