"""A copy prepared for CPU gradients computes the same function and gradient, without the
copies that made MobileNet-V2's backward pass slow on one thread."""

import copy

import pytest
import torch
import torchvision
from helpers import trained_like_batchnorms
from torch import nn
from torch.profiler import profile

from featscope.kernels.cpu_gradients import OneDnnConv2d, for_cpu_gradients

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch has no oneDNN")


@pytest.fixture
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def value_and_input_gradient(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.clone().requires_grad_(True)
    out = model(x)
    (out[:, :5] ** 2).sum().backward()
    return out.detach(), x.grad


def ops_run(model: nn.Module, x: torch.Tensor) -> set[str]:
    """The ops a step runs, each as 'op' and as 'op < the op that called it'."""
    with profile() as trace:
        value_and_input_gradient(model, x)
    return {event.name for event in trace.events()} | {
        f"{event.name} < {event.cpu_parent.name}" for event in trace.events() if event.cpu_parent is not None}


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
def test_the_prepared_copy_computes_the_same_values_and_input_gradients(arch, one_thread):
    torch.manual_seed(0)
    model = trained_like_batchnorms(torchvision.models.get_model(arch, weights=None).eval())
    model = model.to(memory_format=torch.channels_last).requires_grad_(False)
    prepared = for_cpu_gradients(copy.deepcopy(model))
    x = torch.rand(2, 3, 64, 80).contiguous(memory_format=torch.channels_last)
    (value, gradient), (ref_value, ref_gradient) = value_and_input_gradient(prepared, x), value_and_input_gradient(
        model, x)
    torch.testing.assert_close(value, ref_value, rtol=1e-4, atol=1e-5 * ref_value.abs().max().item())
    torch.testing.assert_close(gradient, ref_gradient, rtol=1e-4, atol=1e-5 * ref_gradient.abs().max().item())
    assert not any(getattr(m, "inplace", False) for m in prepared.modules())
    assert all(type(m) is OneDnnConv2d for m in prepared.modules() if isinstance(m, nn.Conv2d))


def test_one_thread_runs_1x1_convs_on_onednn_and_clones_no_relu6_input(one_thread):
    """What the speed comes from (timings stay in benchmarks/units_bench.py): the model as it
    was took PyTorch's im2col path for its 1x1 convs and cloned each in-place ReLU6's input."""
    model = torchvision.models.mobilenet_v2(weights=None).features[:4].eval().requires_grad_(False)
    model = model.to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    before = ops_run(model, x)
    after = ops_run(for_cpu_gradients(copy.deepcopy(model)), x)
    assert {"aten::_slow_conv2d_forward", "aten::clone < aten::hardtanh_"} <= before
    assert "aten::_slow_conv2d_forward" not in after  # (their backward still takes it: PyTorch's dispatch)
    assert "aten::clone < aten::hardtanh_" not in after and "aten::hardtanh_" not in after


def test_autocast_and_other_dtypes_keep_pytorchs_own_dispatch():
    conv = for_cpu_gradients(nn.Sequential(nn.Conv2d(4, 6, 1))).eval()
    x = torch.rand(1, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert conv(x).dtype == torch.bfloat16
    assert conv.double()(x.double()).dtype == torch.float64
