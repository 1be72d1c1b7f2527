"""Run outputs on rank 0: the numbers as JSON lines in RUN_DIR/metrics.jsonl (easy to diff,
plot and test), TensorBoard scalars under RUN_DIR/tb, and any other trackers of
log.report_to through Accelerate (wandb, mlflow, ...), which the trainer starts.

The logger is one of the run's stateful parts: its state is the last step it logged. A run
that continues from a checkpoint keeps what was logged up to that step and drops what the
interrupted run logged after it (metrics.jsonl is cut there; TensorBoard gets a purge marker,
`SummaryWriter(purge_step=...)`, so that its readers hide the orphaned steps); a run that starts
over in a folder with logs (`--resume latest` before any checkpoint) keeps none. Each step is
then logged once, in order.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

from alignvl_scale.checkpoint.rundir import METRICS, SAMPLE_KEYS, TENSORBOARD
from alignvl_scale.config import ConfigError, LogConfig, RunConfig
from alignvl_scale.runtime.files import write_text_atomic

# The module each tracker of log.report_to needs installed.
TRACKER_MODULES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                   "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab",
                   "trackio": "trackio"}


class RunLogger:
    def __init__(self, run_dir: str | Path, enabled: bool, tensorboard: bool = True, accelerator=None) -> None:
        """accelerator: one whose trackers were started (`init_trackers`): they get every scalar too."""
        self.run_dir, self.enabled, self.tensorboard = Path(run_dir), enabled, tensorboard
        self.accelerator = accelerator
        self.step = -1  # the last step logged; -1: none
        self.writer = self.jsonl = self.keys_jsonl = None

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = state["step"]

    def _open(self) -> None:
        """On the first write: the logs cut back to `self.step` (see the module docstring)."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        for name in (METRICS, SAMPLE_KEYS):
            lines = self.run_dir / name
            if lines.exists():
                kept = [line for line in lines.read_text().splitlines() if json.loads(line)["step"] <= self.step]
                write_text_atomic(lines, "".join(line + "\n" for line in kept))
        self.jsonl = (self.run_dir / METRICS).open("a")
        if self.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            folder = self.run_dir / TENSORBOARD
            earlier = folder.is_dir() and any(folder.glob("events.out.tfevents.*"))
            self.writer = SummaryWriter(str(folder), purge_step=self.step + 1 if earlier else None)

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.enabled and self.jsonl is None:
            self._open()  # cut back to the step loaded, before this one counts
        self.step = step
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

    def sample_keys(self, step: int, keys: list[list[str]]) -> None:
        """log.sample_keys: the keys of the step's samples, micro-batch by micro-batch in the
        global batch's order (after `scalars` of the same step, which cuts the file back)."""
        if not self.enabled:
            return
        if self.jsonl is None:
            self._open()
        if self.keys_jsonl is None:
            self.keys_jsonl = (self.run_dir / SAMPLE_KEYS).open("a")
        self.keys_jsonl.write(json.dumps({"step": step, "keys": keys}) + "\n")
        self.keys_jsonl.flush()

    def text(self, tag: str, text: str) -> None:
        if self.enabled and self.jsonl is None:
            self._open()
        if self.writer is not None:
            self.writer.add_text(tag, text)

    def hparams(self, hparams: dict, metrics: dict[str, float]) -> None:
        if self.enabled and self.jsonl is None:
            self._open()
        if self.writer is not None:
            self.writer.add_hparams(hparams, metrics, run_name=".")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        for lines in (self.jsonl, self.keys_jsonl):
            if lines is not None:
                lines.close()
        if self.accelerator is not None:  # not end_training(): that also ends the process group
            for tracker in self.accelerator.trackers:
                tracker.finish()


def config_value(cfg: RunConfig, key: str) -> object:
    """The value of a dotted config key (`model.noise_sigma`)."""
    node: object = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


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


def check_trackers(cfg: LogConfig, environ: dict | None = None) -> None:
    """Each tracker of log.report_to is installed, and its own settings would not fail only
    after launch. MLflow: its file store (a file: URI, a bare path, or no MLFLOW_TRACKING_URI
    at all, which means ./mlruns) is in maintenance mode and raises when a run starts; its
    SQLite store needs SQLAlchemy and Alembic."""
    environ = os.environ if environ is None else environ
    for name in cfg.report_to:
        if importlib.util.find_spec(TRACKER_MODULES[name]) is None:
            raise ConfigError(f"log.report_to: {name} is not installed (pip install {TRACKER_MODULES[name]}, or the "
                              "project's [track] extra for mlflow)")
    if "mlflow" not in cfg.report_to:
        return
    uri = environ.get("MLFLOW_TRACKING_URI", "")
    allowed = environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() in ("1", "true", "yes")
    if (uri.startswith("file:") or "://" not in uri and not uri.startswith("sqlite:")) and not allowed:
        raise ConfigError(f"log.report_to: mlflow with MLFLOW_TRACKING_URI={uri or '(unset: ./mlruns)'} uses MLflow's "
                          "file store, which refuses new runs (maintenance mode); set MLFLOW_TRACKING_URI=sqlite:///"
                          "PATH/mlflow.db (or a tracking server's http:// address), or MLFLOW_ALLOW_FILE_STORE=true")
    missing = [m for m in ("sqlalchemy", "alembic") if importlib.util.find_spec(m) is None]
    if uri.startswith("sqlite:") and missing:
        raise ConfigError(f"log.report_to: MLflow's SQLite store ({uri}) needs {' and '.join(missing)}: "
                          "pip install -e '.[track]'")
