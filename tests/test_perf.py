import pytest
import torch

from alignvl_scale.perf import counted_flops, peak_tflops, throughput_scalars


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
