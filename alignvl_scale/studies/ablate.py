"""`alignvl-scale ablate STUDY.yaml`: a study of Align-VL's knobs, several seeds per setting,
reported as paired differences to the study's baseline.

A study file (configs/studies/ ships the seed's two studies, caption noise and a sigma x
alpha grid) names:
    config: demo.yaml        # the base run config: a path next to the study, or a shipped name
    benchmark: openclipart   # whose data (emoji, the default with demo.yaml, or openclipart)
    overrides: [model.mixup=fusemix]   # for every run
    seeds: 3                 # seeds 0..seeds-1, the same for every setting (so runs pair up)
    epochs: 30               # train.epochs of every run
    baseline: {sigma: 0, alpha: 0}     # axis values of the reference setting
    grid: {sigma: [0.01, 0.05, 0.1, 0.5]}   # the settings: baseline + every point of the grid
    compare_within: [caption_noise]    # optional: each setting's reference is the baseline at
                                       # the setting's value of these axes
The axes (AXES) are objective, sigma, noise_mode, alpha, mixup, caption_noise and train_fraction; a grid
point changes the axes it names and keeps the baseline's other values.

Every run is the real trainer (`train.main`, what `alignvl-scale train` runs), on features
extracted once: by default `--jobs` worker processes each train cell after cell, paying the
interpreter, imports and DeepSpeed's set-up once per worker; `--separate` launches one
process per cell instead (the same numbers: tests/test_demo.py). Runs live in
OUT/runs/<setting>-<base>-seed<k>, shared by the studies that use the same base, and a run
whose summary exists is not run again: an interrupted study picks up where it stopped, and
a setting common to two studies runs once. Per study, in OUT/<name>/: results.csv (one row
per run: axes, seed, R@K, calibration), results.md (the tables), paired_differences.png,
reliability/<setting>.png (and .json: every seed's queries binned together), and each run
keeps its TensorBoard hparams entry, its own reliability diagram (and, in-process, its
output in train.log).

Paired statistics: seeds are shared across settings (same initial weights, data order and
noise draws), so each setting's per-seed difference to the baseline, d_s = m(setting, s) -
m(baseline, s), cancels the seed-to-seed spread the settings share. The report gives the
mean of d and its 95% t-interval over seeds, and marks a difference distinguishable from
zero when that interval excludes 0.
"""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from alignvl_scale.checkpoint.rundir import METRICS as METRICS_FILE
from alignvl_scale.checkpoint.rundir import RELIABILITY, SUMMARY
from alignvl_scale.config import CONFIGS, ConfigError, RunConfig, load_config
from alignvl_scale.data.reader import FeatureDecoder, shard_examples
from alignvl_scale.data.samples import SkipSample
from alignvl_scale.data.shards import resolve_spec
from alignvl_scale.evaluation.metrics import (
    CALIBRATION_KEYS,
    DIRECTIONS,
    PAIRED_KEYS,
    RECALL_KEYS,
    ReliabilityBins,
    recall_key,
)
from alignvl_scale.evaluation.reliability import read_bins, write_reliability
from alignvl_scale.runtime.log import progress
from alignvl_scale.studies.benchmarks import BENCHMARKS, DEMO_CONFIG, STUDIES
from alignvl_scale.training import main as train
from alignvl_scale.training.logger import config_value
from alignvl_scale.training.preflight import check_components

# The axes a study varies: each the run config key it sets. An axis neither the baseline nor the
# grid names takes the config's default (`RunConfig`); log.hparams lists these keys by default, so
# that TensorBoard's hparams table compares runs by them.
AXES = {"objective": "loss.objective", "sigma": "model.noise_sigma", "noise_mode": "model.noise_mode",
        "alpha": "loss.smoothing", "mixup": "model.mixup", "caption_noise": "data.caption_noise",
        "train_fraction": "data.train_fraction"}
DEFAULTS = {axis: config_value(RunConfig(), key) for axis, key in AXES.items()}
METRICS = RECALL_KEYS + CALIBRATION_KEYS
PROGRESS_EVERY_S = 10  # how often the runs' bar reads the running runs' steps
RUN_LOG_EVERY = 10  # a run's logged steps: its TensorBoard curves, and the step the runs' bar shows
STUDY_KEYS = {"name", "description", "config", "benchmark", "overrides", "seeds", "epochs", "baseline", "grid",
              "compare_within"}


def _axis_value(axis: str, value: object) -> object:
    """Numbers as floats (sigma 0 and 0.0 are one setting); YAML's bare `off` (a boolean) as "off"."""
    if isinstance(DEFAULTS[axis], float):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"study axis {axis}: must be a number, got {value!r}")
        return float(value)
    return "off" if value is False else str(value)


def _shown(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


@dataclass(frozen=True)
class Setting:
    """One point of a study: a value for every axis."""

    values: tuple[tuple[str, object], ...]  # (axis, value) in AXES order

    @classmethod
    def of(cls, values: dict) -> Setting:
        values = {axis: _axis_value(axis, values.get(axis, default)) for axis, default in DEFAULTS.items()}
        if values["sigma"] == 0:  # no noise: the noise mode changes nothing, so the runs are shared
            values["noise_mode"] = DEFAULTS["noise_mode"]
        return cls(tuple(values.items()))

    def __getitem__(self, axis: str):
        return dict(self.values)[axis]

    def overrides(self) -> list[str]:
        return [f"{AXES[axis]}={value}" for axis, value in self.values]

    def slug(self) -> str:
        return "-".join(f"{axis}{_shown(value)}" for axis, value in self.values)

    def name(self, baseline: Setting) -> str:
        changed = [f"{axis}={_shown(value)}" for (axis, value), (_, base) in zip(self.values, baseline.values,
                                                                                 strict=True) if value != base]
        return ", ".join(changed) or "baseline"


@dataclass
class Study:
    name: str
    config: Path
    overrides: list[str] = field(default_factory=list)
    seeds: int = 3
    epochs: int | None = None
    base: dict = field(default_factory=dict)  # the baseline's axis values as the file gives them
    grid: dict[str, list] = field(default_factory=dict)
    description: str = ""
    compare_within: list[str] = field(default_factory=list)
    benchmark: str | None = None  # whose data and features the runs train on (None: the config's own data)

    def reference(self, setting: Setting) -> Setting:
        """What `setting` is compared with: the baseline, at its values of compare_within."""
        return Setting.of({**self.base, **{a: setting[a] for a in self.compare_within}})

    @property
    def baseline(self) -> Setting:
        return Setting.of(self.base)

    def settings(self) -> list[Setting]:
        """The baseline, every grid point (in grid order) and the reference each point is
        compared with; repeats dropped."""
        points = [Setting.of({**self.base, **dict(zip(self.grid, combo, strict=True))})
                  for combo in itertools.product(*self.grid.values())]
        return list(dict.fromkeys([self.baseline, *(s for p in points for s in (self.reference(p), p))]))

    def run_overrides(self) -> list[str]:
        return [*self.overrides, *([f"train.epochs={self.epochs}", "train.steps=null"] if self.epochs else [])]


def load_study(path: str | Path, seeds: int | None = None) -> Study:
    """A study file, checked before anything runs: unknown keys and axes are named."""
    path = Path(path)
    if not path.exists() and (STUDIES / Path(path).with_suffix(".yaml").name).exists():
        path = STUDIES / Path(path).with_suffix(".yaml").name  # a shipped study by name: `ablate sigma`
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except OSError as exc:
        raise ConfigError(f"study {path}: {exc.strerror}") from None
    unknown = set(raw) - STUDY_KEYS
    if unknown:
        raise ConfigError(f"study {path}: unknown keys {sorted(unknown)} (known: {sorted(STUDY_KEYS)})")
    for key in ("baseline", "grid", "compare_within"):
        bad = set(raw.get(key) or {}) - set(AXES)
        if bad:
            raise ConfigError(f"study {path}: {key} names unknown axes {sorted(bad)} (axes: {', '.join(AXES)})")
    grid = {axis: values if isinstance(values, list) else [values] for axis, values in (raw.get("grid") or {}).items()}
    config = Path(raw.get("config", "demo.yaml"))
    config = next((p for p in (path.parent / config, CONFIGS / config) if p.exists()), config)
    benchmark = raw.get("benchmark", "emoji" if config.resolve() == DEMO_CONFIG.resolve() else None)
    if benchmark is not None and benchmark not in BENCHMARKS:
        raise ConfigError(f"study {path}: benchmark {benchmark!r} is not one of {', '.join(BENCHMARKS)}")
    study = Study(raw.get("name", path.stem), config, list(raw.get("overrides") or []), seeds or raw.get("seeds", 3),
                  raw.get("epochs"), dict(raw.get("baseline") or {}), grid, raw.get("description", ""),
                  list(raw.get("compare_within") or []), benchmark)
    if study.seeds < 2:
        raise ConfigError(f"study {path}: seeds must be >= 2 for an interval over seeds, got {study.seeds}")
    if not isinstance(study.name, str) or not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", study.name):
        raise ConfigError(f"study {path}: name {study.name!r} must be a plain folder name (letters, digits, _ . -): "
                          "the study writes to OUT/<name>, and a path there could write outside OUT")
    return study


def check_runs(study: Study, overrides: list[str]) -> None:
    """Every setting's run config loads and validates, before the first run starts."""
    for setting in study.settings():
        check_components(load_config(study.config, [*study.run_overrides(), *overrides, *setting.overrides()]))


def run_dir_of(out: Path, study: Study, overrides: list[str], setting: Setting, seed: int) -> Path:
    """Runs of the same base (the config file's text, overrides, epochs) and setting are shared
    by studies, wherever the config file lives."""
    base = json.dumps([study.config.read_text(), study.run_overrides(), overrides])
    return out / "runs" / f"{setting.slug()}-{hashlib.sha1(base.encode()).hexdigest()[:8]}-seed{seed}"


def train_argv(study: Study, overrides: list[str], setting: Setting, seed: int, run_dir: Path) -> list[str]:
    """The `alignvl-scale train` arguments of one cell (no summary yet: a cell that died starts over)."""
    return ["--config", str(study.config), *study.run_overrides(), *overrides, *setting.overrides(), f"seed={seed}",
            f"run_dir={run_dir}", "eval.every=0", f"train.log_every={RUN_LOG_EVERY}", "--overwrite"]


def _omp_threads(threads: int) -> str:
    """Threads per run: the caller's OMP_NUM_THREADS where set, else cores / jobs."""
    return os.environ.get("OMP_NUM_THREADS", str(threads))


def train_separately(argv: list[str], threads: int) -> str | None:
    """One run as its own `alignvl-scale train` process; None, or what it printed when it failed."""
    env = {**os.environ, "OMP_NUM_THREADS": _omp_threads(threads)}
    proc = subprocess.run([sys.executable, "-m", "alignvl_scale.cli", "train", *argv], capture_output=True, text=True,
                          env=env)
    return None if proc.returncode == 0 else f"{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"


def _worker_threads(threads: int) -> None:
    os.environ["OMP_NUM_THREADS"] = _omp_threads(threads)
    import torch

    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


def train_in_this_process(argv: list[str], log: Path) -> str | None:
    """One run through the trainer's own entry point (`train.main`) in this worker process,
    which goes on to the next run: the interpreter, imports, DeepSpeed's op checks and the
    process group of one are paid once per worker, not once per run. Its output goes to
    `log`; None, or the log's tail when the run failed."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    with log.open("w") as f:
        os.dup2(f.fileno(), 1)
        os.dup2(f.fileno(), 2)
    try:
        train.main(argv, keep_process_group=True)
    except (Exception, SystemExit) as exc:  # SystemExit: train.main's one-line user error
        sys.stdout.flush()
        sys.stderr.flush()
        return f"{log.read_text()[-4000:]}\n{type(exc).__name__}: {exc}"
    return None


def _started(run_dir: Path) -> bool:
    """A run a worker has begun (the pool also marks the next queued one as running)."""
    return (run_dir / "train.log").exists() or (run_dir / METRICS_FILE).exists()


def _last_step(run_dir: Path) -> int:
    """The last step a running run logged (its metrics.jsonl), 0 before the first."""
    try:
        lines = (run_dir / METRICS_FILE).read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, KeyError):
        return 0


def row_of(study: Study, setting: Setting, seed: int, run_dir: Path) -> dict:
    """A finished run's line of results.csv, from its summary."""
    result = json.loads((run_dir / SUMMARY).read_text())
    evaluation = result["eval"]
    return {"setting": setting.name(study.baseline), **dict(setting.values), "seed": seed,
            **{m: evaluation[f"eval/{m}"] for m in METRICS},
            "noisy_captions": result["data"].get("noisy_captions", 0), "good_samples": result["data"]["good"],
            "run_dir": str(run_dir)}


# Two-sided 95% Student t quantiles, t_{0.975, df}, df = 1..30; beyond, the Cornish-Fisher expansion.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t_quantile_975(df: int) -> float:
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def paired_interval(values: list[float], baseline: list[float]) -> tuple[float, float, float]:
    """(mean difference, 95% interval low, high) of the per-seed differences values[s] -
    baseline[s]: mean +- t_{0.975, n-1} x sd / sqrt(n)."""
    diffs = [v - b for v, b in zip(values, baseline, strict=True)]
    if len(diffs) < 2:
        raise ValueError("a paired interval needs at least 2 seeds")
    mean = statistics.fmean(diffs)
    half = t_quantile_975(len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def summarize(rows: list[dict], study: Study) -> list[dict]:
    """Per setting: mean and std over seeds of every metric, and the paired difference to its
    reference (`Study.reference`, same seeds) with its 95% interval for the PAIRED_KEYS metrics."""
    by_setting: dict[Setting, dict[int, dict]] = {}
    for row in rows:
        by_setting.setdefault(Setting.of(row), {})[row["seed"]] = row
    out = []
    for setting, runs in by_setting.items():
        seeds = sorted(runs)
        reference = study.reference(setting)
        entry = {"setting": setting.name(study.baseline), **dict(setting.values), "seeds": len(seeds),
                 "reference": None if reference == setting else reference.name(study.baseline)}
        for m in METRICS:
            values = [runs[s][m] for s in seeds]
            entry[m], entry[m + "_std"] = statistics.fmean(values), statistics.stdev(values)
        if entry["reference"] is not None:
            base = by_setting[reference]
            for m in PAIRED_KEYS:
                # Calibration compares like with like: a softmax and a sigmoid confidence differ in kind.
                comparable = m in RECALL_KEYS or setting["objective"] == reference["objective"]
                entry[m + "_diff"] = (paired_interval([runs[s][m] for s in seeds], [base[s][m] for s in seeds])
                                      if comparable else None)
        out.append(entry)
    return out


def _sigma_cell(entry: dict, rms: dict[str, float] | None) -> str:
    """sigma as given, and in the other unit where the feature RMS is known (image / text)."""
    sigma = entry["sigma"]
    if entry["noise_mode"] == "relative":
        if not rms or not sigma:
            return f"{sigma:g} x RMS"
        return f"{sigma:g} x RMS (abs {sigma * rms['image']:.3g} / {sigma * rms['text']:.3g})"
    if not rms or not sigma:
        return f"{sigma:g}"
    return f"{sigma:g} (rel {sigma / rms['image']:.3g} / {sigma / rms['text']:.3g})"


def markdown_tables(summary: list[dict], study: Study, rms: dict[str, float] | None) -> str:
    varied = [a for a in AXES if a != "sigma" and len({s[a] for s in summary}) > 1]
    fixed = ", ".join(f"{a}={summary[0][a]}" for a in AXES if a != "sigma" and a not in varied)
    head = ["setting", "sigma" + (" (rel img / txt)" if rms else ""), *varied, "seeds"]

    def row(s: dict, cells: list[str]) -> str:
        return "| " + " | ".join([s["setting"], _sigma_cell(s, rms), *(str(s[a]) for a in varied), str(s["seeds"]),
                                  *cells]) + " |"

    def table(title: str, columns: list[str], cells) -> list[str]:
        return [title, "", "| " + " | ".join(head + columns) + " |", "|" + "---|" * (len(head) + len(columns)),
                *(row(s, cells(s)) for s in summary), ""]

    lines = [f"Fixed: {fixed}; {summary[0]['seeds']} seeds per setting." if fixed else "", ""]
    lines += table("Retrieval, R@K in % (mean ± std over seeds):", RECALL_KEYS,
                   lambda s: [f"{s[m]:.1f} ± {s[m + '_std']:.1f}" for m in RECALL_KEYS])
    gaps = [f"{d}_confidence - R@1" for d in DIRECTIONS]  # > 0: overconfident, < 0: underconfident
    lines += table("Calibration at the learned temperature (and bias; confidence is the softmax's over candidates for "
                   "infonce, the per-pair sigmoid's for siglip: metrics.Calibration; "
                   "ECE and confidence in %, NLL in nats; mean ± std; "
                   "confidence - R@1 > 0 is overconfidence):", CALIBRATION_KEYS + gaps,
                   lambda s: [f"{s[m]:.2f} ± {s[m + '_std']:.2f}" for m in CALIBRATION_KEYS]
                   + [f"{s[f'{d}_confidence'] - s[recall_key(d, 1)]:+.1f}" for d in DIRECTIONS])

    def diff(s: dict, m: str) -> str:
        if s["reference"] is None:
            return "(reference)"
        if s[m + "_diff"] is None:
            return "n/a (other objective)"
        mean, low, high = s[m + "_diff"]
        mark = " *" if low > 0 or high < 0 else ""
        return f"{mean:+.2f} [{low:+.2f}, {high:+.2f}]{mark}"

    within = f" at the same {', '.join(study.compare_within)}" if study.compare_within else ""
    lines += table(f"Paired difference to the baseline{within}, mean [95% t-interval over seeds]; * = the interval "
                   "excludes 0:", list(PAIRED_KEYS), lambda s: [diff(s, m) for m in PAIRED_KEYS])
    return "\n".join(lines)


def plot(summary: list[dict], study: Study, path: Path) -> Path:
    """Paired differences with their 95% intervals, one panel per metric, one point per setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [s for s in summary if s["reference"] is not None]
    metrics = ("i2t_R@1", "t2i_R@1", "i2t_ece", "t2i_ece")
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 1.2 + 0.35 * len(others)), sharey=True)
    positions = range(len(others))
    for ax, m in zip(axes, metrics, strict=True):
        for y, s in zip(positions, others, strict=True):
            if s[m + "_diff"] is None:  # calibration of another objective: not comparable
                continue
            mean, low, high = s[m + "_diff"]
            ax.errorbar([mean], [y], xerr=[[mean - low], [high - mean]], fmt="o", capsize=3,
                        color="C3" if low > 0 or high < 0 else "C0")
        ax.axvline(0, color="gray", lw=0.8)
        ax.set_title(f"Δ {m}" + (" (points)" if "R@" in m else " (% points)"))
        ax.grid(alpha=0.3)
    axes[0].set_yticks(list(positions), [s["setting"] for s in others])
    axes[0].invert_yaxis()
    within = f" at the same {', '.join(study.compare_within)}" if study.compare_within else ""
    fig.suptitle(f"{study.name}: difference to the baseline{within}, mean and 95% interval over {summary[0]['seeds']} "
                 "paired seeds (red: excludes 0)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def setting_diagrams(study: Study, cells: list[tuple[Setting, int, Path]], folder: Path) -> None:
    """One reliability diagram per setting: the queries of all its seeds' final evaluations
    binned together (each run wrote its own to RUN_DIR/reliability, evaluation/reliability.py)."""
    merged: dict[Setting, dict[str, ReliabilityBins]] = {}
    for setting, _seed, run_dir in cells:
        for path in sorted((run_dir / RELIABILITY).glob("*.json")):
            bins = read_bins(path)
            mine = merged.setdefault(setting, {})
            for direction, b in bins.items():
                mine[direction] = mine[direction].merged(b) if direction in mine else b
    for setting, bins in merged.items():
        write_reliability(folder, setting.slug(), bins,
                          f"{study.name}: {setting.name(study.baseline)}, {study.seeds} seeds")


def feature_rms(study: Study, overrides: list[str]) -> dict[str, float] | None:
    """Mean per-vector RMS of the training features (image, text): what noise_mode relative
    scales by; None for image-text data (the features exist only inside the towers)."""
    import random

    import torch

    # The baseline's config: the study's overrides may hold only for its settings (a bias init for siglip).
    cfg = load_config(study.config, [*study.run_overrides(), *overrides, *study.baseline.overrides()])
    if cfg.data.kind != "features":
        return None
    sums, count = torch.zeros(2, dtype=torch.float64), 0
    for spec in cfg.data.train:
        for shard in resolve_spec(spec):
            for _, example, _ in shard_examples(shard.url, FeatureDecoder(), 1, random.Random(0)):
                if not isinstance(example, SkipSample):
                    sums += torch.stack([x.double().pow(2).mean().sqrt() for x in example])
                    count += 1
    return {"image": (sums[0] / count).item(), "text": (sums[1] / count).item()} if count else None


def run_study(study: Study, overrides: list[str], out: str | Path, jobs: int = 1,
              in_process: bool = True) -> list[dict]:
    """Every cell without a summary is trained: by `jobs` worker processes that each train
    cell after cell (in_process), or as one `alignvl-scale train` process per cell; the
    runs are the same either way (tests/test_demo.py)."""
    out = Path(out)
    (out / study.name).mkdir(parents=True, exist_ok=True)
    check_runs(study, overrides)
    cells = [(setting, seed, run_dir_of(out, study, overrides, setting, seed))
             for setting in study.settings() for seed in range(study.seeds)]
    threads = max(1, (os.cpu_count() or 1) // jobs)
    start = time.perf_counter()
    if in_process:
        pool = ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), initializer=_worker_threads,
                                   initargs=(threads,))
    else:
        pool = ThreadPoolExecutor(jobs)
    with pool:
        futures = {pool.submit(train_in_this_process, train_argv(study, overrides, setting, seed, run_dir),
                               run_dir / "train.log") if in_process else
                   pool.submit(train_separately, train_argv(study, overrides, setting, seed, run_dir), threads):
                   (setting, seed, run_dir) for setting, seed, run_dir in cells if not (run_dir / SUMMARY).exists()}
        finished = {}
        with progress(len(cells), f"ablate {study.name}", "run", initial=len(cells) - len(futures)) as bar:
            while len(finished) < len(futures):
                for future in wait(set(futures) - set(finished), timeout=PROGRESS_EVERY_S,
                                   return_when=FIRST_COMPLETED).done:
                    setting, seed, run_dir = finished[future] = futures[future]
                    error = future.result()
                    if error is not None and not (run_dir / SUMMARY).exists():
                        raise RuntimeError(f"ablation run {run_dir} failed:\n{error}")
                    row = row_of(study, setting, seed, run_dir)
                    bar.update(1)
                    bar.write(f"[ablate] {study.name} {len(cells) - len(futures) + len(finished)}/{len(cells)} "
                              f"{row['setting']} seed {seed}: i2t R@1 {row['i2t_R@1']:.1f}, "
                              f"t2i R@1 {row['t2i_R@1']:.1f}")
                bar.set_postfix_str("; ".join(f"{s.name(study.baseline)} seed {k}: step {_last_step(d)}"
                                              for f, (s, k, d) in futures.items() if f.running() and _started(d)))
    rows = [row_of(study, setting, seed, run_dir) for setting, seed, run_dir in cells]
    folder = out / study.name
    with (folder / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(rows, study)
    rms = feature_rms(study, overrides)
    minutes = (time.perf_counter() - start) / 60
    rms_line = (f"Training feature RMS (mean per-vector): image {rms['image']:.3f}, text {rms['text']:.3f}; "
                "'rel' is sigma in units of it.\n" if rms else "")
    report = (f"# {study.name}\n\n{study.description.strip()}\n\n{markdown_tables(summary, study, rms)}\n{rms_line}"
              f"{len(cells)} runs ({study.epochs or 'config'} epochs each), {minutes:.1f} min in this call.\n")
    (folder / "results.md").write_text(report)
    if any(s["reference"] is not None for s in summary):
        plot(summary, study, folder / "paired_differences.png")
    setting_diagrams(study, cells, folder / RELIABILITY)
    print(report)
    print(f"[ablate] {study.name}: {len(cells)} runs; results in {folder}")
    return summary
