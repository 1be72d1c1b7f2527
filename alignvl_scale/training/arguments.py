"""The train command's arguments, apart from the trainer: `alignvl-scale train --help` answers
without importing torch, DeepSpeed or the towers (seconds under load)."""

from __future__ import annotations

import argparse


def parse_args(argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description="Align-VL training", epilog="Every config key, its "
                                     "default and its meaning: alignvl-scale config show --defaults")
    parser.add_argument("--config", help="run YAML (configs/); key=value overrides follow")
    parser.add_argument("--resume", help="'latest' or a checkpoint folder")
    parser.add_argument("--overwrite", action="store_true",
                        help="start over in a run_dir that holds an earlier run (deletes its checkpoints and logs)")
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle the --resume checkpoint in full (only for files you trust: by default anything "
                        "beyond tensors and DeepSpeed's own types is refused, since unpickling can run code)")
    parser.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher
    parser.add_argument("overrides", nargs="*", help="section.key=value")
    # Overrides before and after the options alike (`--config F a=1 --resume latest b=2`).
    return parser.parse_intermixed_args(argv)
