"""Run outputs on rank 0: the numbers as JSON lines in RUN_DIR/metrics.jsonl (easy to diff,
plot and test), TensorBoard scalars under RUN_DIR/tb, and any other trackers of
log.report_to through Accelerate (wandb, mlflow, ...), which the trainer starts."""

from __future__ import annotations

import json
import math
from pathlib import Path

from alignvl_scale.rundir import METRICS, TENSORBOARD


class RunLogger:
    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True, accelerator=None) -> None:
        """accelerator: one whose trackers were started (`init_trackers`): they get every scalar too."""
        self.enabled, self.accelerator = enabled, accelerator
        self.writer = None
        if enabled:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            if tensorboard:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD))
            self.jsonl = (Path(run_dir) / METRICS).open("a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.accelerator is not None:
            self.accelerator.log(values, step=step)
        # JSON has no NaN or Infinity: a non-finite value is written as null.
        finite = {k: v if not isinstance(v, float) or math.isfinite(v) else None for k, v in values.items()}
        self.jsonl.write(json.dumps({"step": step, **finite}, allow_nan=False) + "\n")
        self.jsonl.flush()

    def text(self, tag: str, text: str) -> None:
        if self.writer is not None:
            self.writer.add_text(tag, text)

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        if self.writer is not None:
            self.writer.add_hparams(hparams, metrics, run_name=".")

    def close(self) -> None:
        if self.enabled:
            if self.writer is not None:
                self.writer.close()
            self.jsonl.close()
        if self.accelerator is not None:  # not end_training(): that also ends the process group
            for tracker in self.accelerator.trackers:
                tracker.finish()


def flat_config(tree: dict, prefix: str = "") -> dict[str, object]:
    """{"loss": {"smoothing": 0.1}} -> {"loss.smoothing": 0.1}: the run config as the flat
    parameters trackers take (lists and None as text)."""
    out: dict[str, object] = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flat_config(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, bool | int | float | str) else str(value)
    return out
