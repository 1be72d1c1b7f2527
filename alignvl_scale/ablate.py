"""`alignvl-scale ablate`: the seed's two studies, several seeds each.

Settings (each x seeds):
- baseline: sigma = 0, alpha = 0 (FuseMix-style adapters, plain CLIP loss)
- Study 1, Random Perturbation: sigma in {0.01, 0.05, 0.1, 0.5}, alpha = 0; sigma = 0.01 is
  the paper's default
- Study 2, Embedding Smoothing: alpha in {0.1, 0.2, 0.5, 0.8}, sigma = 0.01 (the paper's
  level; its alpha = 0 point is the paper default above)

Every run is the real trainer in its own process (`alignvl-scale train`), on features
extracted once and reused. A run whose summary exists is not run again, so an interrupted
ablation picks up where it stopped. Writes OUT/results.csv (one row per run),
OUT/results.md (mean +- std per setting), OUT/r_at_k_vs_sigma.png, OUT/r_at_k_vs_alpha.png,
and each run's TensorBoard hparams entry under OUT/runs/.
"""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from alignvl_scale.metrics import DIRECTIONS, RECALL_KEYS, RECALL_KS, recall_key
from alignvl_scale.rundir import SUMMARY

METRICS = RECALL_KEYS
SIGMAS = (0.01, 0.05, 0.1, 0.5)
ALPHAS = (0.1, 0.2, 0.5, 0.8)
PAPER_SIGMA = 0.01


@dataclass(frozen=True)
class Setting:
    name: str
    study: str  # baseline | sigma | alpha
    sigma: float
    alpha: float


def default_grid(sigmas=SIGMAS, alphas=ALPHAS) -> list[Setting]:
    grid = [Setting("baseline", "baseline", 0.0, 0.0)]
    grid += [Setting(f"sigma={s:g}" + (" (paper default)" if s == PAPER_SIGMA else ""), "sigma", s, 0.0)
             for s in sigmas]
    grid += [Setting(f"alpha={a:g}", "alpha", PAPER_SIGMA, a) for a in alphas]
    return grid


def run_one(config: Path, overrides: list[str], setting: Setting, seed: int, out: Path) -> dict:
    run_dir = out / "runs" / f"{setting.study}-sigma{setting.sigma:g}-alpha{setting.alpha:g}-seed{seed}"
    summary = run_dir / SUMMARY
    if not summary.exists():
        cmd = [sys.executable, "-m", "alignvl_scale.cli", "train", "--config", str(config), *overrides,
               f"model.noise_sigma={setting.sigma}", f"loss.smoothing={setting.alpha}", f"seed={seed}",
               f"run_dir={run_dir}", "eval.every=0", "train.log_every=1000000",
               "--overwrite"]  # no summary: a cell that died earlier starts over
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0 and not summary.exists():
            raise RuntimeError(f"ablation run {run_dir} failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}")
    evaluation = json.loads(summary.read_text())["eval"]
    return {"setting": setting.name, "study": setting.study, "sigma": setting.sigma, "alpha": setting.alpha,
            "seed": seed, **{m: evaluation[f"eval/{m}"] for m in METRICS}}


def summarize(rows: list[dict]) -> list[dict]:
    """Mean and sample std over seeds, per setting, in grid order."""
    out = []
    for name in dict.fromkeys(r["setting"] for r in rows):
        runs = [r for r in rows if r["setting"] == name]
        entry = {k: runs[0][k] for k in ("setting", "study", "sigma", "alpha")} | {"seeds": len(runs)}
        for m in METRICS:
            values = [r[m] for r in runs]
            entry[m] = statistics.fmean(values)
            entry[m + "_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        out.append(entry)
    return out


def markdown_table(summary: list[dict]) -> str:
    header = "| setting | sigma | alpha | seeds | " + " | ".join(METRICS) + " |"
    lines = [header, "|" + "---|" * (4 + len(METRICS))]
    for s in summary:
        cells = " | ".join(f"{s[m]:.1f} ± {s[m + '_std']:.1f}" for m in METRICS)
        lines.append(f"| {s['setting']} | {s['sigma']:g} | {s['alpha']:g} | {s['seeds']} | {cells} |")
    return "\n".join(lines) + "\n"


def plot(summary: list[dict], out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = {
        "sigma": [s for s in summary if s["study"] in ("baseline", "sigma")],
        # alpha = 0 at sigma = 0.01 is the paper default, measured in Study 1
        "alpha": [s for s in summary if s["study"] == "alpha" or (s["study"] == "sigma" and s["sigma"] == PAPER_SIGMA)],
    }
    paths = []
    for param, points in curves.items():
        points = sorted(points, key=lambda s: s[param])
        fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
        for ax, direction in zip(axes, DIRECTIONS, strict=True):
            for k in RECALL_KS:
                key = recall_key(direction, k)
                ax.errorbar([p[param] for p in points], [p[key] for p in points],
                            yerr=[p[key + "_std"] for p in points], marker="o", capsize=3, label=f"R@{k}")
            ax.set_title(f"{'image→text' if direction == 'i2t' else 'text→image'}")
            ax.set_xlabel(param)
            if param == "sigma":
                ax.set_xscale("symlog", linthresh=0.01)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("recall (%)")
        axes[0].legend()
        fig.suptitle(f"Held-out retrieval vs {param} (mean ± std over seeds)")
        fig.tight_layout()
        path = out / f"r_at_k_vs_{param}.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        paths.append(path)
    return paths


def run_ablation(config: Path, overrides: list[str], out: str | Path, seeds: int = 3,
                 grid: list[Setting] | None = None) -> list[dict]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    grid = grid or default_grid()
    start, rows = time.perf_counter(), []
    total = len(grid) * seeds
    for setting in grid:
        for seed in range(seeds):
            rows.append(run_one(config, overrides, setting, seed, out))
            print(f"[ablate] {len(rows)}/{total} {setting.name} seed {seed}: "
                  f"i2t R@1 {rows[-1]['i2t_R@1']:.1f}, t2i R@1 {rows[-1]['t2i_R@1']:.1f}", flush=True)
    with (out / "results.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = summarize(rows)
    table = markdown_table(summary)
    minutes = (time.perf_counter() - start) / 60
    (out / "results.md").write_text(f"{table}\n{total} runs, {minutes:.1f} min.\n")
    plot(summary, out)
    print(table)
    print(f"[ablate] {total} runs in {minutes:.1f} min; results in {out}")
    return summary
