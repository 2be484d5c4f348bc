"""A copy prepared for CPU gradients computes the same function and gradient, without the
copies that made MobileNet-V2's backward pass slow on one thread."""

import copy

import pytest
import torch
import torchvision
from helpers import trained_like_batchnorms
from torch import nn
from torch.profiler import profile

from featscope.kernels.batchnorm_folding import fold_batchnorm
from featscope.kernels.conv_fusion import onednn_runs
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


def folded(model: nn.Module) -> nn.Module:
    """`model` with trained-like batch norms folded into its convs, channels-last and frozen, as
    `visualisation_model` makes its copy before `for_cpu_gradients`."""
    model = trained_like_batchnorms(model.eval())
    fold_batchnorm(model)
    return model.to(memory_format=torch.channels_last).requires_grad_(False)


def model_copy_and_input(arch: str) -> tuple[nn.Module, nn.Module, torch.Tensor]:
    """A seeded model with trained-like batch norms folded, its copy prepared for CPU gradients, and an input."""
    torch.manual_seed(0)
    model = folded(torchvision.models.get_model(arch, weights=None))
    return model, for_cpu_gradients(copy.deepcopy(model)), torch.rand(2, 3, 64, 80).contiguous(
        memory_format=torch.channels_last)


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
def test_the_prepared_copy_computes_the_same_values_and_input_gradients(arch, one_thread):
    model, prepared, x = model_copy_and_input(arch)
    (value, gradient), (ref_value, ref_gradient) = value_and_input_gradient(prepared, x), value_and_input_gradient(
        model, x)
    torch.testing.assert_close(value, ref_value, rtol=1e-4, atol=1e-5 * ref_value.abs().max().item())
    torch.testing.assert_close(gradient, ref_gradient, rtol=1e-4, atol=1e-5 * ref_gradient.abs().max().item())
    assert not any(getattr(m, "inplace", False) for m in prepared.modules())
    assert all(type(m) is OneDnnConv2d for m in prepared.modules() if isinstance(m, nn.Conv2d))
    clamps = [m for m in model.modules() if isinstance(m, (nn.ReLU, nn.Hardtanh))]
    fused = [m for m in prepared.modules() if getattr(m, "clamp", None)]
    if arch == "mobilenet_v2":  # every ReLU6 follows a conv (ResNet-18's blocks call one ReLU twice: one fused)
        assert len(fused) == len(clamps) == 35 and not any(isinstance(m, nn.Hardtanh) for m in prepared.modules())
    else:
        assert len(fused) == 1


def test_a_conv_and_its_clamp_run_as_one_call_both_ways_unless_a_tap_reads_between(one_thread):
    """Fused, a conv's clamp is a oneDNN post-op and its backward reads the clamped output: no
    clamp pass of its own. A conv read by a hook (`keep`) keeps its clamp apart, so the hook
    still sees the conv's own output; values and input gradients are the model's either way."""
    torch.manual_seed(0)
    model = folded(torchvision.models.mobilenet_v2(weights=None).features[:4])
    x = torch.rand(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    prepared = for_cpu_gradients(copy.deepcopy(model))
    assert not {"aten::clamp", "aten::hardtanh"} & ops_run(prepared, x)
    tapped = "1.conv.0.0"  # the first block's depthwise conv, a ReLU6 after it
    kept = for_cpu_gradients(copy.deepcopy(model), keep=[tapped])
    assert kept.get_submodule(tapped).clamp is None and isinstance(kept.get_submodule("1.conv.0.2"), nn.Hardtanh)
    seen = []
    kept.get_submodule(tapped).register_forward_hook(lambda module, args, out: seen.append(out.detach()))
    reference = value_and_input_gradient(model, x)
    for copied in (prepared, kept):
        value, gradient = value_and_input_gradient(copied, x)
        torch.testing.assert_close(value, reference[0], rtol=1e-4, atol=1e-5 * reference[0].abs().max().item())
        torch.testing.assert_close(gradient, reference[1], rtol=1e-4, atol=1e-5 * reference[1].abs().max().item())
    assert seen[0].min() < 0  # the conv's output, before its ReLU6
    with torch.no_grad():
        torch.testing.assert_close(prepared(x), model(x), rtol=1e-4, atol=1e-5)
    learning = copy.deepcopy(prepared).requires_grad_(True)  # a fused conv whose weights learn: autograd's backward
    reference_model = copy.deepcopy(model).requires_grad_(True)
    value_and_input_gradient(learning, x), value_and_input_gradient(reference_model, x)
    stem, reference_stem = learning.get_submodule("0.0"), reference_model.get_submodule("0.0")
    torch.testing.assert_close(stem.weight.grad, reference_stem.weight.grad, rtol=1e-4, atol=1e-4)


def test_one_thread_runs_1x1_convs_both_ways_on_onednn_and_clones_no_relu6_input(one_thread):
    """What the speed comes from (timings stay in benchmarks/units_bench.py): the model as it
    was took PyTorch's im2col path for its 1x1 convs, forward and backward, and cloned each
    in-place ReLU6's input."""
    model = torchvision.models.mobilenet_v2(weights=None).features[:4].eval().requires_grad_(False)
    model = model.to(memory_format=torch.channels_last)
    x = torch.rand(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    before = ops_run(model, x)
    after = ops_run(for_cpu_gradients(copy.deepcopy(model)), x)
    im2col = {"aten::_slow_conv2d_forward", "aten::_slow_conv2d_backward"}
    assert im2col | {"aten::clone < aten::hardtanh_"} <= before
    assert not im2col & after
    assert "aten::clone < aten::hardtanh_" not in after and "aten::hardtanh_" not in after


@pytest.mark.parametrize("layout", [torch.channels_last, torch.contiguous_format])
def test_a_1x1_conv_gives_pytorchs_gradients_for_its_input_and_for_weights_that_learn(layout, one_thread):
    """The pointwise backward by the transposed weight equals autograd's in either layout; a
    conv whose weights learn keeps autograd's own backward, weight gradients included."""
    torch.manual_seed(0)
    conv = nn.Conv2d(24, 40, 1).requires_grad_(False).to(memory_format=torch.channels_last)
    x = torch.randn(3, 24, 9, 11).contiguous(memory_format=layout)
    for learns in (False, True):
        conv.requires_grad_(learns)
        prepared = for_cpu_gradients(copy.deepcopy(conv))
        (value, gradient), (ref_value, ref_gradient) = (value_and_input_gradient(m, x) for m in (prepared, conv))
        torch.testing.assert_close(value, ref_value, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(gradient, ref_gradient, rtol=1e-5, atol=1e-5)
        if learns:
            torch.testing.assert_close(prepared.weight.grad, conv.weight.grad, rtol=1e-5, atol=1e-4)
            torch.testing.assert_close(prepared.bias.grad, conv.bias.grad, rtol=1e-5, atol=1e-4)


def test_fp16_autocast_and_other_dtypes_keep_pytorchs_own_dispatch():
    conv = for_cpu_gradients(nn.Sequential(nn.Conv2d(4, 6, 1))).eval()
    x = torch.rand(1, 4, 8, 8)
    with torch.autocast("cpu", dtype=torch.float16):
        assert conv(x).dtype == torch.float16
    assert conv.double()(x.double()).dtype == torch.float64


needs_bf16 = pytest.mark.skipif(not onednn_runs(torch.bfloat16), reason="this CPU's oneDNN has no bf16")


@needs_bf16
@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
def test_under_bf16_autocast_the_copy_is_as_close_to_float32_as_autocast_on_the_model(arch, one_thread):
    model, prepared, x = model_copy_and_input(arch)
    exact = value_and_input_gradient(model, x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = value_and_input_gradient(prepared, x), value_and_input_gradient(model, x)
    assert ours[0].dtype == theirs[0].dtype == torch.bfloat16

    def error(approximate, reference):
        return float((approximate.float() - reference).norm() / reference.norm())

    # bf16 keeps 8 bits: both round layer after layer; the copy's strided depthwise convs
    # take their input gradients in float32
    for k in range(2):  # the value, then the input gradient
        assert error(ours[k], exact[k]) < 1.25 * error(theirs[k], exact[k]) + 1e-3
@needs_bf16
def test_under_bf16_autocast_a_strided_depthwise_conv_takes_its_input_gradient_in_float32(one_thread):
    """oneDNN's bf16 input gradient of a strided depthwise conv was 20-100x its float32 one
    on an AVX512-BF16 CPU (60% of a bf16 step through MobileNet-V2): the copy runs the conv
    forward in bf16, as autocast does (5x faster than float32 at 96 channels, 112 px), and
    computes its input gradient in float32 from the float32 weight, rounded once to bf16."""
    conv = nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8).eval().requires_grad_(False)
    prepared = for_cpu_gradients(nn.Sequential(copy.deepcopy(conv)))
    x = torch.rand(2, 8, 16, 16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, expected = prepared(x), conv(x)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    grad = torch.rand_like(out)
    (ours,) = torch.autograd.grad(out, x, grad)
    in_float32 = torch.nn.grad.conv2d_input(x.shape, conv.weight, grad.float(), 2, 1, 1, 8)
    torch.testing.assert_close(ours, in_float32.bfloat16().float(), rtol=0, atol=0)
    (autocasts,) = torch.autograd.grad(expected, x, grad)  # bf16 weights: not the same numbers
    assert not torch.equal(ours, autocasts)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a 1x1 conv stays in bf16, its weights cast once
        pointwise = for_cpu_gradients(nn.Sequential(nn.Conv2d(8, 4, 1))).eval()
        assert pointwise(x).dtype == torch.bfloat16
        assert pointwise[0]._weights_in_bf16()[0] is pointwise[0]._weights_in_bf16()[0]


@pytest.mark.parametrize("channels, side, kernel, stride, padding", [
    (96, 112, 3, 2, 1),  # MobileNet-V2's first strided depthwise conv
    (4, 257, 5, 2, 2),  # EfficientNet's and MNASNet's 5x5, an odd side
    (4, 256, 3, 2, 0),  # no padding: the first row's phase starts one row in
    (4, 256, 3, 3, 1),  # stride 3
    (4, 256, 1, 2, 0),  # a stride longer than the kernel: some rows receive nothing
])
def test_a_large_strided_depthwise_conv_takes_its_bf16_input_gradient_by_phases(channels, side, kernel, stride, padding):
    """Large inputs take the gradient in bf16 as stride-1 convs, one for each phase of the
    input, interleaved: float32's gradient to bf16's rounding, and every position written."""
    from featscope.kernels.cpu_gradients import _PHASES_FROM

    assert channels * side * side >= _PHASES_FROM
    conv = nn.Conv2d(channels, channels, kernel, stride=stride, padding=padding, groups=channels, bias=False)
    prepared = for_cpu_gradients(nn.Sequential(copy.deepcopy(conv).eval().requires_grad_(False)))
    x = torch.rand(2, channels, side, side).contiguous(memory_format=torch.channels_last).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = prepared(x)
    grad = torch.randn_like(out)
    (ours,) = torch.autograd.grad(out, x, grad)
    exact = torch.nn.grad.conv2d_input(x.shape, conv.weight.detach(), grad.float(), stride, padding, 1, channels)
    assert torch.isfinite(ours).all()
    # bf16 weights and one rounding of the sum: the error of a bf16 dot product of <= 25 terms
    assert float((ours - exact).abs().max() / exact.abs().max()) < 2e-2
    assert not torch.equal(ours, exact.bfloat16().float())  # bf16 weights: not float32's path, rounded
    if kernel < stride:
        assert (ours[:, :, 1::stride] == 0).all() and (exact[:, :, 1::stride] == 0).all()
