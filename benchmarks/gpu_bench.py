"""End-to-end training throughput, ours against open_clip, on the same synthetic data.

Builds synthetic 224 px JPEG image-text WebDataset shards and random-init towers of the
given shapes (default: ViT-B/16 at 224 px, and a 12-layer 512-wide BERT over 77 tokens,
the shapes of open_clip's ViT-B-16), then trains

- ours: `torchrun ... launchers/train.py` with each of ds_configs/zero{--stages}, both
  towers trainable, cls pooling, linear adapters, at --precision;
- open_clip (when open-clip-torch imports, with --open-clip-pythonpath prepended: it wants
  webdataset <= 0.2.86, this project >= 1.0): `open_clip_train.main` with a model config of
  the same shapes, the same shards (resampled), batch, precision, workers and steps,

and prints the steady state of each (windows after --warmup steps; medians): samples/s,
data-wait fraction, model TFLOP/s and MFU per GPU, peak memory, and ours/open_clip. Our
FLOPs come from the trainer's own count (perf/tflop_per_step_per_rank); open_clip's are
counted the same way (FlopCounterMode over one forward and backward of its model).

    python benchmarks/gpu_bench.py --open-clip-pythonpath /path/to/open_clip_wheels
    python benchmarks/gpu_bench.py --profile-steps 5      # + torch.profiler tables of our runs
    python benchmarks/gpu_bench.py --preset small --ranks 1   # CPU: the README's CPU table
    python benchmarks/gpu_bench.py --preset tiny --steps 8    # CPU smoke test: how it is tested
"""

from __future__ import annotations

import argparse
import io
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from multiprocessing import Pool
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

from alignvl_scale.data.shards import SHARD_PATTERN, sample_members, write_shards
from alignvl_scale.runtime.distributed import free_port
from alignvl_scale.runtime.perf import cpu_matmul_tflops, device_name, peak_tflops

ROOT = Path(__file__).resolve().parents[1]
WORDS = ("red green blue small large round square photo drawing of a the cat dog car tree house bird boat "
         "flower street city field river mountain person child table chair window light dark old new").split()
SHAPE_KEYS = ("image_size", "patch", "vision_width", "vision_layers", "vision_heads", "text_width", "text_layers",
              "text_heads", "context", "embed_dim", "batch", "workers", "samples")
PRESETS = {  # open_clip's ViT-B-16 on a GPU; a model two CPU cores train in a minute; a smoke test
    "vit-b-16": (224, 16, 768, 12, 12, 512, 12, 8, 77, 512, 256, 12, 8192),
    "small": (64, 8, 192, 4, 3, 128, 4, 2, 32, 128, 32, 1, 2048),
    "tiny": (32, 8, 32, 2, 2, 32, 2, 2, 16, 32, 8, 1, 64),
}
# The open_clip runner: count FLOPs per sample of the model (one forward and backward of
# batch 2 on CPU, halved), then train. Run with open_clip's PYTHONPATH.
OPEN_CLIP_RUNNER = """
import json, sys, torch, open_clip
from torch.utils.flop_counter import FlopCounterMode
config, argv = sys.argv[1], sys.argv[2:]
open_clip.add_model_config(config)
if int(__import__('os').environ.get('RANK', '0')) == 0:
    model = open_clip.create_model('alignvl-bench')
    cfg = json.load(open(config))
    size, ctx = cfg['vision_cfg']['image_size'], cfg['text_cfg']['context_length']
    with FlopCounterMode(display=False) as counter:
        out = model(torch.randn(2, 3, size, size), torch.randint(0, 100, (2, ctx)))
        (out['image_features'].sum() + out['text_features'].sum()).backward()
    print(f"FLOPS_PER_SAMPLE {counter.get_total_flops() / 2:.0f}", flush=True)
    del model
from open_clip_train.main import main
main(argv)
"""
OPEN_CLIP_LINE = re.compile(r"Data \(t\): ([\d.]+) Batch \(t\): ([\d.]+),")


def _jpeg(index: int, size: int) -> bytes:
    """A smooth random image (low-frequency noise, upsampled): JPEG sizes like photos'."""
    rng = np.random.default_rng(index)
    low = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    image = Image.fromarray(low).resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _sample(args: tuple[int, int]) -> dict:
    index, size = args
    rng = np.random.default_rng(10_000_000 + index)
    caption = " ".join(rng.choice(WORDS, size=int(rng.integers(5, 15))))
    return sample_members(f"{index:08d}", _jpeg(index, size), "jpg", [caption])


def write_jpeg_shards(folder: Path, samples: int, size: int, workers: int) -> int:
    """Shards of `samples` seeded JPEG image-caption pairs (1,000 per shard); returns the shard count."""
    with Pool(max(1, workers)) as pool:
        stream = pool.imap(_sample, ((i, size) for i in range(samples)), chunksize=64)
        manifest = write_shards(stream, folder, 1000, progress=False)
    return len(manifest["shards"])


def make_towers(folder: Path, a: argparse.Namespace) -> dict[str, str]:
    """Random-init HF ViT and BERT of the given shapes, saved like pretrained ones, with a
    word-level WordPiece vocabulary written here (no download)."""
    from transformers import BertConfig, BertModel, BertTokenizerFast, ViTConfig, ViTModel

    paths = {"vit": str(folder / "vit"), "bert": str(folder / "bert")}
    torch.manual_seed(0)
    ViTModel(ViTConfig(image_size=a.image_size, patch_size=a.patch, hidden_size=a.vision_width,
                       num_hidden_layers=a.vision_layers, num_attention_heads=a.vision_heads,
                       intermediate_size=4 * a.vision_width), add_pooling_layer=False).save_pretrained(paths["vit"])
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(vocab))
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=a.text_width, num_hidden_layers=a.text_layers,
                         num_attention_heads=a.text_heads, intermediate_size=4 * a.text_width,
                         max_position_embeddings=max(512, a.context)), add_pooling_layer=False).save_pretrained(
        paths["bert"])
    tokenizer.save_pretrained(paths["bert"])
    return paths


def _run(cmd: list[str], log: Path, env: dict, timeout: int) -> tuple[int, str]:
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        rc, output = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc = 124
        output = "".join(part.decode(errors="replace") if isinstance(part, bytes) else (part or "")
                         for part in (exc.stdout, exc.stderr)) + f"\nTIMEOUT after {timeout} s"
    log.write_text(output + f"\n[{time.perf_counter() - start:.1f} s]\n")
    return rc, output


def _failure(rc: int, output: str) -> dict:
    lines = [line for line in output.splitlines() if "Error" in line or "error" in line] or output.splitlines()[-1:]
    return {"ok": False, "rc": rc, "error": (lines or ["no output"])[-1][-300:]}


def ours(stage: int, a: argparse.Namespace, towers: dict, shards: Path, work: Path, env: dict) -> dict:
    run_dir = work / f"ours-zero{stage}"
    config = work / f"ours-zero{stage}.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"image_tower": {"name": towers["vit"], "pooling": "cls", "trainable": True},
                  "text_tower": {"name": towers["bert"], "pooling": "cls", "trainable": True,
                                 "max_length": a.context},
                  "embed_dim": a.embed_dim, "adapter": "linear"},
        "data": {"train": [str(shards)], "mode": "resampled", "batch_size": a.batch, "workers": a.workers,
                 "image_size": a.image_size},
        "train": {"steps": a.steps, "lr": 1e-4, "warmup_steps": 10, "log_every": a.log_every, "grad_clip": a.grad_clip,
                  "precision": a.precision, "profile_steps": a.profile_steps, "profile_start": a.warmup,
                  "peak_tflops": a.peak_tflops},
        "run_dir": str(run_dir)}))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.ranks), "--master_addr",
           "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "launchers/train.py"), "--config",
           str(config), f"engine.ds_config=ds_configs/zero{stage}.json", "--overwrite"]
    rc, output = _run(cmd, work / f"ours-zero{stage}.log", env, a.timeout)
    metrics = run_dir / "metrics.jsonl"
    if rc != 0 or not metrics.exists():
        return _failure(rc, output)
    windows = [row for row in map(json.loads, metrics.read_text().splitlines())
               if "perf/samples_per_s" in row and row["step"] > a.warmup]
    if not windows:
        return {"ok": False, "rc": rc, "error": f"no log window after step {a.warmup}; raise --steps"}

    def median(key: str) -> float | None:
        values = [w[key] for w in windows if key in w]
        return statistics.median(values) if values else None

    flops_per_step = median("perf/tflop_per_step_per_rank")
    return {"ok": True, "samples_per_s": median("perf/samples_per_s"),
            "data_wait_fraction": median("perf/data_wait_fraction"), "tflops_per_gpu": median("perf/tflops_per_rank"),
            "mfu": median("perf/mfu"), "peak_memory_gib": max(w["perf/peak_memory_gib"] for w in windows),
            "gflop_per_sample": flops_per_step * 1e3 / a.batch if flops_per_step else None,
            "windows": len(windows), "profile": str(run_dir / "profile") if a.profile_steps else None}


def open_clip_available(pythonpath: str | None) -> bool:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (pythonpath, os.environ.get("PYTHONPATH")) if p)}
    probe = subprocess.run([sys.executable, "-c", "import open_clip, open_clip_train.main"], env=env,
                           capture_output=True, text=True)
    return probe.returncode == 0


def open_clip(a: argparse.Namespace, shards: Path, shard_count: int, work: Path, env: dict, peak: float | None) -> dict:
    config = work / "alignvl-bench.json"
    config.write_text(json.dumps({
        "embed_dim": a.embed_dim,
        "vision_cfg": {"image_size": a.image_size, "layers": a.vision_layers, "width": a.vision_width,
                       "patch_size": a.patch, "head_width": a.vision_width // a.vision_heads},
        "text_cfg": {"context_length": a.context, "vocab_size": 49408, "width": a.text_width,
                     "heads": a.text_heads, "layers": a.text_layers}}))
    pattern = str(shards / SHARD_PATTERN.replace("{:06d}", "{" + f"{0:06d}..{shard_count - 1:06d}" + "}"))
    precision = {"bf16": "amp_bf16", "fp32": "fp32"}[a.precision]
    argv = ["--train-data", pattern, "--dataset-type", "webdataset", "--dataset-resampled",
            "--train-num-samples", str(a.steps * a.batch * a.ranks), "--batch-size", str(a.batch), "--epochs", "1",
            "--precision", precision, "--workers", str(a.workers), "--model", "alignvl-bench", "--lr", "1e-4",
            "--warmup", "10", "--log-every-n-steps", str(a.log_every), "--logs", str(work / "open_clip_logs"),
            "--name", f"bench-{time.time_ns()}", "--save-frequency", "0",
            "--device", "cuda" if torch.cuda.is_available() else "cpu",
            *(["--grad-clip-norm", str(a.grad_clip)] if a.grad_clip else [])]
    runner = [sys.executable, "-c", OPEN_CLIP_RUNNER, str(config), *argv]
    if a.ranks > 1:
        runner = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(a.ranks), "--master_port",
                  str(free_port()), "--no-python", *runner]
    oc_env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (a.open_clip_pythonpath, str(ROOT)) if p)}
    rc, output = _run(runner, work / "open_clip.log", oc_env, a.timeout)
    if rc != 0:
        return _failure(rc, output)
    steady = open_clip_steady_state(output, a.warmup, a.log_every)
    if steady is None:
        return {"ok": False, "rc": rc, "error": "no 'Batch (t)' lines in open_clip's output"}
    samples_per_s = a.batch * a.ranks / steady["step_seconds"]
    flops = steady["flops_per_sample"]
    tflops = samples_per_s / a.ranks * flops / 1e12 if flops else None
    return {"ok": True, "samples_per_s": samples_per_s, "data_wait_fraction": steady["data_wait_fraction"],
            "tflops_per_gpu": tflops, "mfu": tflops / peak if tflops and peak else None, "peak_memory_gib": None,
            "gflop_per_sample": flops / 1e9 if flops else None, "windows": steady["windows"]}


def open_clip_steady_state(output: str, warmup: int, log_every: int) -> dict | None:
    """open_clip_train logs one line per window of log_every steps, with the window's mean
    data wait and step time: "Data (t): 0.012 Batch (t): 0.170, 1505.9/s, ...". Medians over
    the windows after `warmup` steps (its first line is step 1: left out too)."""
    windows = [(float(d), float(b)) for d, b in OPEN_CLIP_LINE.findall(output)]
    steady = windows[1 + warmup // log_every:] or windows[-1:]
    if not steady:
        return None
    flops = re.search(r"FLOPS_PER_SAMPLE (\d+)", output)
    return {"step_seconds": statistics.median(b for _, b in steady),
            "data_wait_fraction": statistics.median(d / b for d, b in steady if b > 0),
            "flops_per_sample": float(flops.group(1)) if flops else None, "windows": len(steady)}


def _fmt(value, spec: str) -> str:
    return format(value, spec) if isinstance(value, (int, float)) else "-"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=list(PRESETS), default="vit-b-16",
                        help="shapes, batch, workers and data size (each can be set below)")
    for i, name in enumerate(SHAPE_KEYS):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=None,
                            help=", ".join(f"{preset} {values[i]}" for preset, values in PRESETS.items()))
    parser.add_argument("--peak-tflops", type=float, help="per-device peak for MFU (default: the GPU's dense bf16 "
                        "peak by name; on CPU the fp32 matmul rate measured here)")
    parser.add_argument("--ranks", type=int, default=max(1, torch.cuda.device_count()))
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=30, help="steps left out of the steady state")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2], choices=[0, 1, 2, 3])
    parser.add_argument("--precision", choices=["bf16", "fp32"], default="bf16")
    parser.add_argument("--grad-clip", type=float, default=0.0, help="both runs (0: none, open_clip's default)")
    parser.add_argument("--open-clip", choices=["auto", "on", "off"], default="auto",
                        help="auto: run open_clip when it imports")
    parser.add_argument("--open-clip-pythonpath", help="prepended to PYTHONPATH for open_clip's run "
                        "(a pip --target folder with open-clip-torch and webdataset<=0.2.86)")
    parser.add_argument("--profile-steps", type=int, default=0, help="torch.profiler over this many of our "
                        "steps after the warm-up (tables and traces in each run's profile/)")
    parser.add_argument("--timeout", type=int, default=1200, help="seconds per run")
    parser.add_argument("--work", type=Path, help="keep shards, towers, runs and logs here")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/gpu_bench.json"))
    a = parser.parse_args()
    for name, value in zip(SHAPE_KEYS, PRESETS[a.preset], strict=True):
        if getattr(a, name) is None:
            setattr(a, name, value)
    return a


def print_table(runs: dict) -> None:
    """Each run's row, against open_clip's samples/s where it ran (the ratio is stored in the run)."""
    base = runs.get("open_clip", {}).get("samples_per_s") if runs.get("open_clip", {}).get("ok") else None
    header = (f"{'run':<16} {'samples/s':>10} {'data wait':>10} {'TFLOP/s/GPU':>12} {'MFU':>6} "
              f"{'GFLOP/sample':>13} {'peak GiB':>9} {'x open_clip':>12}")
    print(header)
    print("-" * len(header))
    for name, r in runs.items():
        if not r["ok"]:
            print(f"{name:<16} FAILED (rc {r['rc']}): {r['error']}")
            continue
        r["ratio_to_open_clip"] = r["samples_per_s"] / base if base else None
        print(f"{name:<16} {_fmt(r['samples_per_s'], '10.1f')} {_fmt(r['data_wait_fraction'], '10.2f')} "
              f"{_fmt(r['tflops_per_gpu'], '12.3f')} {_fmt(r['mfu'], '6.1%')} "
              f"{_fmt(r['gflop_per_sample'], '13.3f')} {_fmt(r['peak_memory_gib'], '9.2f')} "
              f"{_fmt(r['ratio_to_open_clip'], '12.2f')}")


def main() -> None:
    a = parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    a.peak_tflops = a.peak_tflops or peak_tflops(device) or (cpu_matmul_tflops() if device.type == "cpu" else None)
    peak = a.peak_tflops
    run_open_clip = a.open_clip == "on" or (a.open_clip == "auto" and open_clip_available(a.open_clip_pythonpath))
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    work = a.work or Path(tempfile.mkdtemp(prefix="gpu_bench_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        start = time.perf_counter()
        shard_count = write_jpeg_shards(work / "shards", a.samples, a.image_size, os.cpu_count() or 1)
        towers = make_towers(work / "towers", a)
        print(f"device: {device_name(device)} x {a.ranks}; peak {f'{peak:.3g}' if peak else '-'} TFLOP/s; "
              f"batch {a.batch}/GPU, "
              f"{a.steps} steps (steady state after {a.warmup}), {a.precision}, {a.workers} workers; "
              f"towers ViT {a.image_size}px/{a.patch} {a.vision_layers}x{a.vision_width}, text {a.text_layers}x"
              f"{a.text_width} over {a.context} tokens; {a.samples} samples in {shard_count} shards "
              f"({time.perf_counter() - start:.0f} s to build)", flush=True)
        runs = {}
        for stage in a.stages:
            runs[f"ours, ZeRO-{stage}"] = ours(stage, a, towers, work / "shards", work, env)
            print(f"  ours, ZeRO-{stage}: {'ok' if runs[f'ours, ZeRO-{stage}']['ok'] else 'FAILED'}", flush=True)
        if run_open_clip:
            runs["open_clip"] = open_clip(a, work / "shards", shard_count, work, env, peak)
            print(f"  open_clip: {'ok' if runs['open_clip']['ok'] else 'FAILED'}", flush=True)
        print_table(runs)
        result = {"device": device_name(device), "ranks": a.ranks, "peak_tflops": peak,
                  "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}, "runs": runs}
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(result, indent=1))
        print(f"wrote {a.out}; logs in {work if a.work else '(temporary folder, --work to keep)'}")
        if not all(r["ok"] for r in runs.values()):
            sys.exit(1)
    finally:
        if a.work is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
