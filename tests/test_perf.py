import json
import os
import subprocess
import sys

import pytest
import torch
import yaml
from conftest import ROOT, env
from distributed import run_ranks

from alignvl_scale.data.synthetic import write_feature_shards
from alignvl_scale.runtime.perf import counted_flops, peak_tflops, throughput_scalars


def test_counted_flops_are_the_matmuls_of_forward_and_backward():
    torch.manual_seed(0)
    layer = torch.nn.Linear(16, 32)
    x = torch.randn(4, 16, requires_grad=True)
    _, forward = counted_flops(lambda: layer(x))
    assert forward == 2 * 4 * 16 * 32
    _, step = counted_flops(lambda: layer(x).sum().backward())
    assert step == 3 * forward  # backward: the input's and the weight's gradients
    frozen = torch.nn.Linear(16, 32).requires_grad_(False)
    _, inference = counted_flops(lambda: frozen(x.detach()))
    assert inference == forward


@pytest.mark.parametrize("name,peak", [
    ("NVIDIA H100 80GB HBM3", 989.4), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.4),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("Some Future GPU", None)])
def test_peak_is_looked_up_by_device_name(monkeypatch, name, peak):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda _=None: name)
    assert peak_tflops(torch.device("cuda")) == peak
    assert peak_tflops(torch.device("cuda"), configured=123.0) == 123.0


def test_cpu_has_tflops_but_no_mfu_unless_a_peak_is_configured():
    assert peak_tflops(torch.device("cpu")) is None
    assert throughput_scalars(2e12, steps=10, elapsed=4.0, peak=None) == {
        "perf/tflop_per_step_per_rank": 2.0, "perf/tflops_per_rank": 5.0}
    assert throughput_scalars(2e12, steps=10, elapsed=4.0, peak=10.0)["perf/mfu"] == 0.5
    assert throughput_scalars(None, steps=10, elapsed=4.0, peak=10.0) == {}


def _syncs_per_step(tmp_path, ds_config: str, *overrides: str) -> list[dict]:
    """tests/scripts/count_syncs.py on a one-process cached-feature run: per step, what would
    make the host wait for a GPU, by kind and caller."""
    write_feature_shards(tmp_path / "f", 8 * 32, shards=4)
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"embed_dim": 16, "adapter": "mlp", "adapter_depth": 1, "noise_sigma": 0.05, "dropout": 0.1},
        "data": {"kind": "features", "train": [str(tmp_path / "f")], "batch_size": 16, "workers": 1},
        "train": {"steps": 8, "lr": 0.01, "log_every": 100}, "run_dir": str(tmp_path / "run")}))
    proc = subprocess.run([sys.executable, str(ROOT / "tests/scripts/count_syncs.py"), "--config", str(config),
                           f"engine.ds_config={ds_config}", *overrides], cwd=ROOT, env=env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("SYNCS "))
    return json.loads(line.removeprefix("SYNCS "))


def _ours(step: dict) -> dict:
    """This project's own host reads and synchronizations in a step, by file."""
    out: dict = {}
    for key, n in step.items():
        where = key.split(" @ ")[1].split(":")[0]
        if where.startswith("alignvl_scale/"):
            out[where] = out.get(where, 0) + n
    return out


@pytest.mark.parametrize("stage,clip", [(2, 1.0)] + [pytest.param(stage, clip, marks=pytest.mark.slow)
                                                      for stage, clip in ((2, 0.0), (3, 1.0))])
def test_a_step_waits_on_the_device_only_where_it_must(tmp_path, stage, clip):
    """After DeepSpeed's throughput timer starts (step 3): no device synchronize in a step
    (the timer's 2 a step are off in the shipped configs; the trainer measures its own
    throughput), and no host read of a tensor from this project's code where DeepSpeed checks
    the gradient norm (ZeRO-3; ZeRO 1-2 with clipping: it skips a non-finite step itself, with
    its own reads, 3 a step under ZeRO-2 and 1 under ZeRO-3). ZeRO 1-2 without clipping: one,
    the loss's finiteness check, which every rank needs before backward to skip a bad step
    together."""
    for step in _syncs_per_step(tmp_path, f"ds_configs/zero{stage}.json", f"train.grad_clip={clip}")[2:]:
        assert not [k for k in step if "synchronize" in k], step
        assert _ours(step) == ({} if clip else {"alignvl_scale/losses/tiles.py": 1}), step  # its finiteness check


@pytest.mark.slow
def test_the_sync_count_sees_the_throughput_timer(tmp_path):
    """The counter can fail: the same run with DeepSpeed's timer on shows its 2 a step."""
    shipped = json.loads((ROOT / "alignvl_scale/ds_configs/zero2.json").read_text())
    timed = tmp_path / "timed.json"
    timed.write_text(json.dumps({**shipped, "timers": {"throughput": {"enabled": True}}}))
    steps = _syncs_per_step(tmp_path, str(timed))
    assert all(sum(n for k, n in step.items() if "synchronize" in k) == 2 for step in steps[2:]), steps


def test_tf32_is_the_process_default_but_not_inside_exact_blocks():
    """train.tf32 sets the process-wide switch; the head's and the loss's forward run inside
    exact_fp32_matmuls, which turns it off on CUDA and restores it after (on CPU it leaves
    the switch alone: there is nothing to round)."""
    from alignvl_scale.runtime.compat import tf32_switch
    from alignvl_scale.runtime.perf import exact_fp32_matmuls, set_cuda_math

    key, on, off = tf32_switch()
    matmul = torch.backends.cuda.matmul
    saved, benchmark = getattr(matmul, key), torch.backends.cudnn.benchmark
    try:
        set_cuda_math(tf32=True, cudnn_benchmark=True)
        assert getattr(matmul, key) == on and torch.backends.cudnn.benchmark
        with exact_fp32_matmuls(torch.device("cuda")):
            assert getattr(matmul, key) == off
        assert getattr(matmul, key) == on
        with exact_fp32_matmuls(torch.device("cpu")):
            assert getattr(matmul, key) == on
        set_cuda_math(tf32=False, cudnn_benchmark=False)
        assert getattr(matmul, key) == off and not torch.backends.cudnn.benchmark
    finally:
        setattr(matmul, key, saved)
        torch.backends.cudnn.benchmark = benchmark


@pytest.mark.slow
def test_deepspeed_zero3_leaf_modules_still_lose_their_parameters_in_backward():
    """Why ZeRO-3 leaf modules (and stage3_module_granularity_threshold, which sets them) are
    not used: pins DeepSpeed's behaviour in tests/scripts/zero3_leaf_repro.py. A leaf called
    with its input as a keyword (as transformers 5 calls attention), or whose input needs no
    gradient (a head fed by frozen towers), runs its backward on released parameters. When
    this test fails, DeepSpeed fixed it: measure the hook savings (benchmarks/train_bench.py)."""
    from alignvl_scale.runtime.distributed import free_port

    seen = {}
    for case in ("positional", "keyword", "no_grad", "none"):
        proc = subprocess.run([sys.executable, str(ROOT / "tests/scripts/zero3_leaf_repro.py"), case], cwd=ROOT,
                              env={**env(), "MASTER_PORT": str(free_port())}, capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        seen[case] = proc.stdout.strip().splitlines()[-1]
    assert seen["positional"] == seen["none"] == "OK"
    for case in ("keyword", "no_grad"):
        assert seen[case].startswith("The size of tensor a (0) must match"), seen


def _clipped_zero_step(rank: int, world: int, stage: int, ours: bool) -> dict:
    """One clipped ZeRO `stage` step of a small MLP on rank-dependent data: the gradient norm
    DeepSpeed reports and the updated weights, with this project's norm installed or not."""
    import deepspeed

    from alignvl_scale.runtime import compat
    from alignvl_scale.runtime.ds_ops import prepare_deepspeed_ops

    prepare_deepspeed_ops(on_gpu=False)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world))
    deepspeed.init_distributed(dist_backend="gloo")
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.GELU(), torch.nn.Linear(64, 8))
    ds_config = {"train_micro_batch_size_per_gpu": 8, "train_batch_size": 8 * world, "gradient_clipping": 1e-3,
                 "zero_allow_untested_optimizer": True, "zero_optimization": {"stage": stage},
                 "steps_per_print": 10**9}
    engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                      optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2))
    installed = compat.zero_norm_without_fp64_copies(engine.optimizer) if ours else False
    x = torch.randn(8, 16, generator=torch.Generator().manual_seed(rank))
    engine.backward(engine(x).square().mean() * (1 + rank))
    engine.step()
    params = list(engine.module.named_parameters())
    with deepspeed.zero.GatheredParameters([p for _, p in params], enabled=stage == 3):
        return {"installed": installed, "norm": float(engine.get_global_grad_norm()),
                "params": {n: p.detach().clone() for n, p in params}}


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_gradient_norm_without_fp64_copies_clips_as_deepspeed_does(tmp_path, stage):
    """compat.zero_norm_without_fp64_copies (each gradient's squares summed in fp32, not an
    fp64 copy per tensor) on 2 ranks with different data and clipping active: the same global
    norm as DeepSpeed's own and the same clipped update."""
    (tmp_path / "theirs").mkdir()
    theirs = run_ranks(_clipped_zero_step, 2, tmp_path / "theirs", stage, False)
    ours = run_ranks(_clipped_zero_step, 2, tmp_path, stage, True)
    for want, got in zip(theirs, ours, strict=True):
        assert "error" not in want and "error" not in got, (want.get("traceback"), got.get("traceback"))
        assert got["installed"] and got["norm"] > 1e-3  # clipping is active
        assert got["norm"] == pytest.approx(want["norm"], rel=1e-6)
        for name, value in want["params"].items():
            torch.testing.assert_close(got["params"][name], value, rtol=1e-6, atol=1e-8, msg=name)
    assert ours[0]["norm"] == ours[1]["norm"]
