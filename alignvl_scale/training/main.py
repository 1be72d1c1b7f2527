"""`alignvl-scale train` and launchers/train.py: the command line, and what a run ends with.

A user's mistake (config, data, run folder, checkpoint, launch: `config.UserError`) ends the
process with one line naming it and exit code 2, not a traceback per rank; a lost peer rank
with one line and exit code 3; a stop signal with a checkpoint and exit code 0. Under
torchrun and `accelerate launch` the line is also the rank's root cause in the launcher's
failure summary (which exits 1; `deepspeed` passes the 2 on): docs/training.md, "Exit codes".
"""

from __future__ import annotations

import sys

import torch.distributed as dist

from alignvl_scale.config import UserError, load_config
from alignvl_scale.runtime.log import error
from alignvl_scale.training.arguments import parse_args
from alignvl_scale.training.launch import report_to_launcher
from alignvl_scale.training.preflight import preflight
from alignvl_scale.training.trainer import Trainer

# What a collective raises when a peer died (gloo: its connection closed) or hung (a timeout).
PEER_ERRORS = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "Timed out", "timed out",
               "timeout", "Connection refused", "NCCL communicator was aborted")


def _peer_lost(exc: BaseException) -> bool:
    return isinstance(exc, dist.DistError) or any(p in str(exc) for p in PEER_ERRORS)


def main(argv: list[str] | None = None, keep_process_group: bool = False, prog: str | None = None) -> dict:
    """Train. keep_process_group: the process goes on to train another run (`Trainer.close`);
    prog: the command's name in usage lines (default: the script's)."""
    args = parse_args(argv, prog)
    trainer = None
    try:
        cfg = load_config(args.config, args.overrides)  # validated before any process group exists
        trainer = Trainer(preflight(cfg, args.resume, args.overwrite, args.trust_checkpoint))
        summary = trainer.run()
    except UserError as exc:
        _exit_with(f"error: {exc}", 2)
    except KeyboardInterrupt:  # SIGINT before the trainer handles it, or not among train.stop_signals
        _exit_with("interrupted; nothing saved since the last checkpoint", 130)
    except RuntimeError as exc:
        if not (dist.is_initialized() and _peer_lost(exc)):
            raise
        step = trainer.progress.step if trainer is not None and hasattr(trainer, "progress") else "?"
        _exit_with(f"error: lost contact with another rank at step {step} (it died, hung past "
                   f"engine.collective_timeout, or the network failed): {str(exc).splitlines()[0][:200]}; "
                   "the run stopped. Continue with --resume latest", 3, destroy=False)
    trainer.close(end_process_group=not keep_process_group)
    return summary


def _exit_with(message: str, code: int, destroy: bool = True) -> None:
    error(message)
    report_to_launcher(message)
    if destroy and dist.is_initialized():
        dist.destroy_process_group()
    sys.exit(code)
