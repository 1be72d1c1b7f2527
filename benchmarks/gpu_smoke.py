"""Launcher x ZeRO-stage smoke grid: a few bf16 training steps of small random-init HF towers
(ViT + BERT) under `torchrun`, `deepspeed` and `accelerate launch` with each of
ds_configs/zero1, zero2, zero3 and zero3_offload, then `export` and `eval` of one cell.
One line per cell; JSON to --out. Meant for a GPU machine (one line per cell goes in an
issue's closing note); it also runs on CPU (gloo, DS_ACCELERATOR=cpu), which is how it is
tested.

    python benchmarks/gpu_smoke.py                     # ranks = visible GPUs (or 2 on CPU)
    python benchmarks/gpu_smoke.py --ranks 1 --steps 10 --out /tmp/smoke.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

from alignvl_scale.data.synthetic import make_tiny_towers, write_image_shards
from alignvl_scale.runtime.distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
LAUNCHERS = ("torchrun", "deepspeed", "accelerate")
DS_CONFIGS = ("zero1", "zero2", "zero3", "zero3_offload")


def launch_cmd(launcher: str, ds_config: str, ranks: int, config: Path) -> list[str]:
    """Module forms of the three launchers: they work where only wheels (no scripts) are installed."""
    port = str(free_port())
    train = [str(ROOT / "launchers/train.py"), "--config", str(config)]
    ds_json = str(ROOT / "ds_configs" / f"{ds_config}.json")
    if launcher == "torchrun":
        return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr",
                "127.0.0.1", "--master_port", port, *train, f"engine.ds_config={ds_json}"]
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", str(ranks), "--master_port", port,
                *train, f"engine.ds_config={ds_json}"]
    stage = ds_config.removesuffix("_offload")[-1]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / f"launchers/accelerate/zero{stage}.yaml"), "--deepspeed_config_file", ds_json,
            "--num_processes", str(ranks), "--main_process_port", port, *train]


def write_run_config(tmp: Path, towers: dict, run_dir: Path, steps: int) -> Path:
    path = tmp / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump({
        "model": {"image_tower": {"name": towers["vit"], "pooling": "mean", "trainable": True},
                  "text_tower": {"name": towers["bert"], "max_length": 16}, "embed_dim": 32, "noise_sigma": 0.01},
        "data": {"train": [str(tmp / "train")], "batch_size": 8, "workers": 2, "image_size": 16},
        "train": {"steps": steps, "lr": 1e-3, "warmup_steps": 2, "log_every": max(1, steps // 2),
                  "precision": "bf16"},
        "eval": {"data": [str(tmp / "eval")], "batch_size": 16},
        "run_dir": str(run_dir)}))
    return path


def run_cell(cmd: list[str], run_dir: Path, log: Path, timeout: int) -> dict:
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        output, rc = proc.stdout + proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as exc:
        output, rc = f"{exc.stdout or ''}{exc.stderr or ''}\nTIMEOUT after {timeout} s", 124
    log.write_text(output if isinstance(output, str) else output.decode(errors="replace"))
    seconds = time.perf_counter() - start
    summary = run_dir / "summary.json"
    if not summary.exists():
        lines = [line for line in str(output).splitlines() if "Error" in line or "error" in line]
        return {"ok": False, "rc": rc, "seconds": seconds, "error": (lines or ["no summary.json"])[-1][-300:]}
    last = json.loads(summary.read_text())["last"]
    return {"ok": True, "rc": rc, "seconds": seconds, "steps": json.loads(summary.read_text())["step"],
            "loss": last.get("train/loss"), "samples_per_s": last.get("perf/samples_per_s"),
            "logit_scale": last.get("train/logit_scale")}


def export_and_eval(run_dir: Path, tmp: Path, timeout: int) -> dict:
    checkpoint = run_dir / "checkpoints" / (run_dir / "checkpoints" / "latest").read_text().strip()
    cli = [sys.executable, "-m", "alignvl_scale.cli"]
    out = {}
    for name, cmd in (("export", [*cli, "export", "--checkpoint", str(checkpoint), "--out", str(tmp / "export")]),
                      ("eval", [*cli, "eval", "--checkpoint", str(tmp / "export"), "--data", str(tmp / "eval"),
                                "--json", str(tmp / "eval.json")])):
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        out[name] = proc.returncode == 0
        if proc.returncode != 0:
            out[f"{name}_error"] = (proc.stdout + proc.stderr)[-500:]
            return out
    out["eval_metrics"] = json.loads((tmp / "eval.json").read_text())[str(tmp / "eval")]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ranks", type=int, default=torch.cuda.device_count() or 2)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--launchers", nargs="+", default=list(LAUNCHERS), choices=LAUNCHERS)
    parser.add_argument("--ds-configs", nargs="+", default=list(DS_CONFIGS), choices=DS_CONFIGS)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per cell")
    parser.add_argument("--logs", type=Path, help="keep each cell's output here")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_smoke.json"))
    args = parser.parse_args()
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        logs = args.logs or tmp / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        towers = make_tiny_towers(tmp / "towers")
        write_image_shards(tmp / "train", [32] * (4 * max(2, args.ranks)))
        write_image_shards(tmp / "eval", [32])
        print(f"device: {device}; ranks: {args.ranks}; {args.steps} bf16 steps per cell", flush=True)
        print(f"{'launcher':<11} {'ds_config':<14} {'status':<6} {'steps':>5} {'loss':>7} {'samples/s':>10} "
              f"{'seconds':>8}", flush=True)
        for launcher in args.launchers:
            for ds_config in args.ds_configs:
                run_dir = tmp / f"{launcher}-{ds_config}"
                config = write_run_config(tmp, towers, run_dir, args.steps)
                cell = run_cell(launch_cmd(launcher, ds_config, args.ranks, config), run_dir,
                                logs / f"{run_dir.name}.log", args.timeout)
                rows.append({"launcher": launcher, "ds_config": ds_config, "run_dir": str(run_dir), **cell})
                if cell["ok"]:
                    print(f"{launcher:<11} {ds_config:<14} {'ok':<6} {cell['steps']:>5} {cell['loss']:>7.4f} "
                          f"{cell['samples_per_s']:>10.1f} {cell['seconds']:>8.1f}", flush=True)
                else:
                    print(f"{launcher:<11} {ds_config:<14} {'FAIL':<6} rc={cell['rc']} {cell['error']}", flush=True)
        exported = next((r for r in rows if r["ok"] and r["ds_config"] == "zero3"), None) or next(
            (r for r in rows if r["ok"]), None)
        result = {"device": device, "ranks": args.ranks, "steps": args.steps, "cells": rows}
        if exported is not None:
            result["export_eval"] = {"cell": f"{exported['launcher']}-{exported['ds_config']}",
                                     **export_and_eval(Path(exported["run_dir"]), tmp, args.timeout)}
            ok = result["export_eval"].get("eval", False)
            metrics = result["export_eval"].get("eval_metrics", {})
            print(f"export + eval of {result['export_eval']['cell']}: {'ok' if ok else 'FAIL'}"
                  + (f" (i2t R@1 {metrics['i2t_R@1']:.1f}, t2i R@1 {metrics['t2i_R@1']:.1f})" if ok else ""))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    if not all(r["ok"] for r in rows) or not result.get("export_eval", {}).get("eval", False):
        sys.exit(1)


if __name__ == "__main__":
    main()
