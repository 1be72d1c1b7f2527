"""Run outputs on rank 0: TensorBoard scalars under RUN_DIR/tb and the same numbers as
JSON lines in RUN_DIR/metrics.jsonl (easy to diff, plot and test)."""

from __future__ import annotations

import json
from pathlib import Path

from alignvl_scale.rundir import METRICS, TENSORBOARD


class RunLogger:
    def __init__(self, run_dir: str | Path, enabled: bool) -> None:
        self.enabled = enabled
        self.writer = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            Path(run_dir).mkdir(parents=True, exist_ok=True)
            self.writer = SummaryWriter(str(Path(run_dir) / TENSORBOARD))
            self.jsonl = (Path(run_dir) / METRICS).open("a")

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)
        self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
        self.jsonl.flush()
        self.writer.flush()

    def text(self, tag: str, text: str) -> None:
        if self.enabled:
            self.writer.add_text(tag, text)

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        if self.enabled:
            self.writer.add_hparams(hparams, metrics, run_name=".")

    def close(self) -> None:
        if self.enabled:
            self.writer.close()
            self.jsonl.close()
