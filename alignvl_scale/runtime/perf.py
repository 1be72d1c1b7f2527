"""Performance scalars: model FLOPs per step, TFLOP/s and MFU per rank, peak memory per rank.

FLOPs are counted once, on the first step a process runs, by torch's FlopCounterMode: the
matmuls, convolutions and attention of the forward and backward that actually ran on this
rank (frozen towers: forward only; the loss's tiles included; gradient checkpointing's
recomputation included, so with it on this is hardware FLOPs, not model FLOPs). MFU is
against the device's dense bf16 peak, as torchtitan and the PaLM paper report it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from alignvl_scale.runtime.compat import tf32_switch

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity), by device-name substring, first match.
PEAK_BF16_TFLOPS = (
    ("H100 NVL", 835.0), ("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 70.0), ("L4", 121.0), ("MI300X", 1307.0),
)


def set_cuda_math(tf32: bool, cudnn_benchmark: bool) -> None:
    """The process's defaults on CUDA (train.tf32, train.cudnn_benchmark), as open_clip sets
    them: fp32 matmuls on TF32 tensor cores, and cuDNN timing its convolution algorithms
    once per shape. The head and the loss's fp32 tiles opt out (`exact_fp32_matmuls`)."""
    key, on, off = tf32_switch()
    setattr(torch.backends.cuda.matmul, key, on if tf32 else off)
    torch.backends.cudnn.benchmark = cudnn_benchmark


@contextmanager
def matmul_tf32(enabled: bool):
    """fp32 matmuls on CUDA inside the block at TF32 (enabled) or full fp32 precision, whatever
    the process default; restored after."""
    key, on, off = tf32_switch()
    matmul = torch.backends.cuda.matmul
    saved = getattr(matmul, key)
    setattr(matmul, key, on if enabled else off)
    try:
        yield
    finally:
        setattr(matmul, key, saved)


def exact_fp32_matmuls(device: torch.device):
    """Full fp32 matmuls inside the block on CUDA (nothing to change elsewhere)."""
    return matmul_tf32(False) if device.type == "cuda" else nullcontext()


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def peak_tflops(device: torch.device, configured: float | None = None) -> float | None:
    """The configured peak (train.peak_tflops), else the table's entry for this device, else
    None (CPUs and unknown devices: no MFU, TFLOP/s only)."""
    if configured is not None:
        return configured
    name = device_name(device)
    return next((peak for key, peak in PEAK_BF16_TFLOPS if key in name), None)


def cpu_matmul_tflops(n: int = 2048, repeats: int = 5) -> float:
    """The fp32 matmul rate of this process's CPU threads (median of `repeats`): the CPU's
    stand-in for a peak, which benchmarks use for an MFU on CPU."""
    import statistics

    x, y = torch.randn(n, n), torch.randn(n, n)
    x @ y
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        x @ y
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e12


def counted_flops(fn: Callable[[], Any]) -> tuple[Any, int]:
    """fn()'s result and the FLOPs it ran on this rank (forward and any backward inside)."""
    with FlopCounterMode(display=False) as counter:
        result = fn()
    return result, counter.get_total_flops()


def process_memory_bytes(field: str) -> int:
    """A memory figure of this process from Linux's /proc/self/status: VmRSS (resident now),
    VmHWM (its peak; reset by writing 5 to /proc/self/clear_refs)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_rss_bytes() -> int:
    """This process's peak resident memory."""
    return process_memory_bytes("VmHWM")


def peak_memory_gib(device: torch.device) -> float:
    """This rank's peak: allocated CUDA memory, or the process's peak RSS on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return peak_rss_bytes() / 2**30


def throughput_scalars(flops_per_step: int | None, steps: int, elapsed: float,
                       peak: float | None) -> dict[str, float]:
    """The FLOPs of one step on one rank, and TFLOP/s and MFU per rank over a window of
    `steps` steps (MFU only where the peak is known)."""
    if not flops_per_step or elapsed <= 0:
        return {}
    tflops = flops_per_step * steps / elapsed / 1e12
    return {"perf/tflop_per_step_per_rank": flops_per_step / 1e12, "perf/tflops_per_rank": tflops,
            **({"perf/mfu": tflops / peak} if peak else {})}


class StepProfiler:
    """torch.profiler over train.profile_steps steps from step train.profile_start, on every
    rank: a Chrome/TensorBoard trace per rank and a table of the ops by total device (else
    CPU) time, under RUN_DIR/profile. Call step() after each optimizer step; it decides."""

    def __init__(self, folder: Path, start: int, steps: int, rank: int, device: torch.device) -> None:
        self.folder, self.start, self.steps, self.rank, self.device = folder, start, steps, rank, device
        self.profiler = None

    def step(self, step: int) -> None:
        """Call with the number of steps done so far (the step just finished)."""
        if self.steps <= 0:
            return
        if step == self.start:
            from torch.profiler import ProfilerActivity, profile

            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.profiler = profile(activities=activities, record_shapes=True, with_stack=False)
            self.profiler.__enter__()
        elif self.profiler is not None and step == self.start + self.steps:
            self.profiler.__exit__(None, None, None)
            self.folder.mkdir(parents=True, exist_ok=True)
            name = f"rank{self.rank}_steps{self.start + 1}-{step}"
            self.profiler.export_chrome_trace(str(self.folder / f"{name}.trace.json"))
            sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
            table = self.profiler.key_averages().table(sort_by=sort, row_limit=60)
            (self.folder / f"{name}.txt").write_text(table)
            self.profiler = None


class MetricsWindow:
    """Throughput and data wait since the last log line."""

    def __init__(self) -> None:
        self.start, self.data_time, self.steps = time.perf_counter(), 0.0, 0

    @contextmanager
    def waiting_for_data(self):
        start = time.perf_counter()
        yield
        self.data_time += time.perf_counter() - start

    def close(self, global_batch: int, world: int, flops_per_step: int | None = None,
              peak_tflops: float | None = None) -> dict[str, float]:
        """The window's scalars; a new window starts."""
        elapsed = time.perf_counter() - self.start
        out = {"perf/samples_per_s": self.steps * global_batch / elapsed,
               "perf/samples_per_s_per_rank": self.steps * global_batch / world / elapsed,
               "perf/data_wait_fraction": self.data_time / elapsed,
               **throughput_scalars(flops_per_step, self.steps, elapsed, peak_tflops)}
        self.__init__()
        return out
