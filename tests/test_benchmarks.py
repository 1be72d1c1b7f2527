"""The GPU benchmarks run end to end on CPU with tiny shapes (how they are kept working
between GPU sessions), and their parsing of open_clip's log is checked on its format."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _module(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_gpu_bench_runs_our_trainer_on_cpu_with_tiny_shapes(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "benchmarks/gpu_bench.py", "--preset", "tiny", "--steps", "12",
                           "--warmup", "4", "--log-every", "4", "--ranks", "1", "--stages", "1", "--open-clip", "off",
                           "--profile-steps", "2", "--work", str(tmp_path / "work"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = json.loads(out.read_text())["runs"]["ours, ZeRO-1"]
    assert run["ok"] and run["windows"] == 2 and run["samples_per_s"] > 0, run
    assert 0 <= run["data_wait_fraction"] < 1 and run["peak_memory_gib"] > 0
    # MFU on CPU: against the fp32 matmul rate the bench measured
    assert run["gflop_per_sample"] > 0 and run["tflops_per_gpu"] > 0 and 0 < run["mfu"] < 1
    assert "ours, ZeRO-1" in proc.stdout and "samples/s" in proc.stdout
    # The profiler covered steps 5-6: a table of ops and a trace.
    profile = Path(run["profile"])
    assert (profile / "rank0_steps5-6.txt").read_text().count("aten::") > 5
    assert (profile / "rank0_steps5-6.trace.json").stat().st_size > 0


def test_open_clip_log_is_read_after_the_warm_up():
    bench = _module("gpu_bench")
    line = ("2026-11-27,10:00:00 | INFO | Train Epoch: 0 [{n}/30720 ({p}%)] Data (t): {d} Batch (t): {b}, "
            "1505.9/s, 1505.9/s/gpu LR: 0.000100 Logit Scale: 14.286 Contrastive_loss: 5.5 (5.5)")
    lines = [line.format(n=256, p=1, d="2.000", b="3.000")]  # step 1: start-up
    lines += [line.format(n=256 * 10 * k, p=k, d=f"{0.01 * k:.3f}", b="0.200") for k in range(1, 7)]
    steady = bench.open_clip_steady_state("FLOPS_PER_SAMPLE 52000000000\n" + "\n".join(lines), warmup=20,
                                          log_every=10)
    assert steady["windows"] == 4  # after step 1 and the two windows of the 20 warm-up steps
    assert steady["step_seconds"] == 0.2 and steady["flops_per_sample"] == 52e9
    assert abs(steady["data_wait_fraction"] - 0.045 / 0.2) < 1e-9  # median of 0.03..0.06 over 0.2


def test_loss_bench_times_plain_and_fused_side_by_side(tmp_path):
    out = tmp_path / "loss.json"
    proc = subprocess.run([sys.executable, "benchmarks/loss_bench.py", "--sizes", "256", "--worlds", "1", "2",
                           "--dim", "32", "--chunk", "64", "--rounds", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert {(r["mode"], r["world"]) for r in rows} >= {("plain", 1), ("chunked", 1), ("plain", 2), ("chunked", 2)}
    assert all(r["status"] == "ok" and r["seconds"] > 0 for r in rows), rows


@pytest.mark.slow
def test_train_bench_runs_the_ddp_baseline_and_a_zero_stage(tmp_path):
    out = tmp_path / "train.json"
    proc = subprocess.run([sys.executable, "benchmarks/train_bench.py", "--towers", "tiny", "--steps", "20",
                           "--repeats", "1", "--worlds", "1", "--stages", "1", "3", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "torch DDP" in proc.stdout and "alignvl ZeRO-1" in proc.stdout and "alignvl ZeRO-3" in proc.stdout


@pytest.mark.slow
def test_memory_bench_counts_zero3_parameters_falling_with_the_ranks(tmp_path):
    """benchmarks/memory_bench.py at a small shape, ZeRO-3 with LoRA on 1 and 2 ranks: the
    parameters each rank holds halve (the counts are exact, not timings), and with
    DeepSpeed's default reduce bucket (5e8 fp32 elements, allocated whole) a rank holds
    1.86 GiB more than with the shipped 5e7."""
    out = tmp_path / "memory.json"
    proc = subprocess.run([sys.executable, "benchmarks/memory_bench.py", "--hidden", "256", "--layers", "2",
                           "--ranks", "1", "2", "--stages", "3", "3dsb", "--modes", "lora", "--assets",
                           str(tmp_path / "assets"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {(r["stage"], r["ranks"]): r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {("3", 1), ("3", 2), ("3dsb", 1)} and not any("error" in r for r in rows.values())
    assert rows["3", 2]["params"] == pytest.approx(rows["3", 1]["params"] / 2, rel=0.05)
    assert rows["3", 1]["optimizer"] < 0.01  # LoRA: the optimizer holds the updates only
    assert rows["3dsb", 1]["other"] - rows["3", 1]["other"] == pytest.approx((5e8 - 5e7) * 4 / 2**30, rel=0.01)


@pytest.mark.slow
def test_first_launch_bench_measures_both_ways_on_cpu(tmp_path):
    """benchmarks/first_launch_bench.py, one repeat of a few steps: both ways run, a table and
    its JSON (the timings themselves are the benchmark's to report, not a test's to assert)."""
    out = tmp_path / "first.json"
    proc = subprocess.run([sys.executable, "benchmarks/first_launch_bench.py", "--repeats", "1", "--steps", "41",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = {r["way"]: r for r in json.loads(out.read_text())["rows"]}
    built, skipped = rows["build the op (DeepSpeed's default)"], rows["skip the op (ours)"]
    assert all(r[k] > 0 for r in (built, skipped) for k in ("first", "second", "rate"))
    assert "building costs the first launch" in proc.stdout


@pytest.mark.slow
def test_ablation_bench_splits_a_run_three_ways(tmp_path):
    """benchmarks/ablation_bench.py, one repeat of one epoch on synthetic features: the three
    launches run, and each run's time comes back split into its phases (the figures are the
    benchmark's to report)."""
    from alignvl_scale.data.synthetic import write_feature_shards

    write_feature_shards(tmp_path / "data" / "features" / "train", 512)
    write_feature_shards(tmp_path / "data" / "features" / "test", 64, seed=1, shards=1)
    out = tmp_path / "ablation.json"
    proc = subprocess.run([sys.executable, "benchmarks/ablation_bench.py", "--data-dir", str(tmp_path / "data"),
                           "--epochs", "1", "--repeats", "1", "--out", str(tmp_path / "runs"), "--json", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    medians = json.loads(out.read_text())["medians_s"]
    assert set(medians) == {"separate, unfused AdamW", "separate", "in-process"}
    assert all(medians[m]["startup"] > 0 for m in ("separate, unfused AdamW", "separate"))
    assert medians["in-process"]["startup"] == 0
    assert all(row[p] > 0 for row in medians.values() for p in ("engine", "training", "evaluation", "total"))
    assert "vs before" in proc.stdout


def test_the_mixing_and_keyed_draw_benchmarks_run_with_tiny_shapes(tmp_path):
    """Both print their table and write JSON; with data streams the global batches mix shards
    (fewer same-shard pairs than one shard per rank batch would give)."""
    out = tmp_path / "mixing.json"
    proc = subprocess.run([sys.executable, "benchmarks/mixing_bench.py", "--shards", "16", "--per-shard", "8",
                           "--global-batch", "8", "--workers", "1", "--worlds", "1", "2", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["results"]["this tree"]
    assert [r["world"] for r in rows] == [1, 2] and all(r["streams"] == 8 for r in rows)
    assert all(0 <= r["same_shard_pairs"] < 0.5 for r in rows), rows
    out = tmp_path / "keyed.json"
    proc = subprocess.run([sys.executable, "benchmarks/keyed_draws_bench.py", "--rows", "32", "--image-dim", "16",
                           "--text-dim", "12", "--embed-dim", "8", "--streams", "1", "4", "--steps", "1", "--repeats",
                           "1", "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(json.loads(out.read_text())["medians"]) == {"own generators (no keys)", "keyed, 1 streams",
                                                          "keyed, 4 streams"}


def test_the_tower_dropout_benchmark_runs_with_tiny_shapes(tmp_path):
    out = tmp_path / "tower.json"
    proc = subprocess.run([sys.executable, "benchmarks/tower_dropout_bench.py", "--rows", "4", "--tokens", "4",
                           "--layers", "1", "--streams", "1", "2", "--steps", "1", "--repeats", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(json.loads(out.read_text())["medians"]) == {"torch's dropout (no keys)", "keyed, 1 streams",
                                                          "keyed, 2 streams"}


def test_step_profile_sums_the_training_loops_samples_by_innermost_category(tmp_path):
    """benchmarks/step_profile.py's reading of py-spy's collapsed stacks: only the ranks'
    training loops count, each stack by its innermost frame that names a category."""
    summarize = _module("step_profile").summarize
    loop = ('process 1:"python launchers/train.py";main (launchers/train.py:9);'
            "train_loop (alignvl_scale/training/trainer.py:80)")
    reduce = "backward (torch/_tensor.py:1);allreduce_bucket (deepspeed/x.py:2)"
    raw = tmp_path / "raw.txt"
    raw.write_text("\n".join([
        f"{loop};{reduce};_flatten_dense_tensors (torch/_utils.py:3) 7",
        f"{loop};backward (torch/_tensor.py:1);reduce_ipg_grads (deepspeed/x.py:4);all_reduce (torch/c10d.py:5) 5",
        f"{loop};step (deepspeed/engine.py:6);get_grad_norm_direct (alignvl_scale/runtime/compat.py:7) 2",
        f"{loop};forward (alignvl_scale/model/head.py:8) 3",
        'process 1:"python launchers/train.py";main (launchers/train.py:9);forward (x.py:1) 100',  # start-up
    ]))
    assert summarize(raw) == {"gradient copies and flattening": 7, "communication (reduce, gather)": 5,
                              "gradient norm": 2, "forward": 3}


@pytest.mark.slow
def test_grad_norm_bench_agrees_with_fp64(tmp_path):
    out = tmp_path / "norm.json"
    proc = subprocess.run([sys.executable, "benchmarks/grad_norm_bench.py", "--repeats", "1", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    ours = next(r for r in json.loads(out.read_text())["rows"] if r["way"] == "ours (compat)")
    assert ours["rel_diff_vs_fp64"] < 1e-6


def test_collective_bench_runs_both_zero3_reduces_on_two_ranks(tmp_path):
    out = tmp_path / "collectives.json"
    proc = subprocess.run([sys.executable, "benchmarks/collective_bench.py", "--repeats", "1", "--scale", "0.01",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 4 and all(r["median_ms"] > 0 for r in rows) and rows[0]["ratio"] == 1
