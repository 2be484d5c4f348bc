"""ONNX Runtime's forward pass stands in for PyTorch's only where it gives the same numbers:
equal outputs at any batch, height and width, from several threads at once; a shape the
exported graph got wrong runs in PyTorch; a model the exporter cannot take stays in PyTorch."""

import copy
import logging
import threading

import pytest
import torch
import torchvision
from torch import nn

from featscope.pipelines.core.device import inference_model
from featscope.pipelines.core.models import load_model
from featscope.pipelines.core.onnx_forward import OnnxForward, fast_forward
from featscope.pipelines.core.workers import ModelRef, curves_model


@pytest.fixture(scope="module")
def resnet():
    torch.manual_seed(0)
    return inference_model(load_model("resnet18", "random", seed=0), []).to(memory_format=torch.channels_last)


def test_outputs_equal_pytorchs_at_any_batch_and_size_and_from_two_threads(resnet):
    fast = fast_forward(resnet, torch.zeros(1, 3, 224, 224))
    assert isinstance(fast, OnnxForward) and copy.deepcopy(fast) is fast  # one session for every lane
    inputs = [torch.randn(b, 3, h, w, generator=torch.Generator().manual_seed(b + h))
              for b, h, w in ((1, 224, 224), (3, 192, 256), (2, 301, 207))]
    for x in inputs:
        with torch.no_grad():
            expected = resnet(x.contiguous(memory_format=torch.channels_last))
        found = fast(x)
        assert found.dtype == torch.float32 and found.shape == expected.shape
        assert torch.allclose(found, expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    alone = [fast(x) for x in inputs]
    together = {}
    threads = [threading.Thread(target=lambda i=i: together.setdefault(i, [fast(x) for x in inputs]))
               for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert all(torch.equal(a, b) for i in range(2) for a, b in zip(alone, together[i]))


class FixedCrop(nn.Module):
    """Its graph keeps the example's height as a constant: right for that height only."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        half = int(x.shape[2]) // 2  # a Python int: the trace records the number, not the size
        return self.conv(x)[:, :, :half].mean(dim=(2, 3))


def test_a_shape_the_graph_gets_wrong_runs_in_pytorch(caplog):
    model = FixedCrop().eval()
    fast = fast_forward(model, torch.zeros(1, 3, 32, 32))
    assert isinstance(fast, OnnxForward)
    same, other = torch.randn(2, 3, 32, 32), torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        assert torch.allclose(fast(same), model(same), atol=1e-5)
        assert not torch.allclose(fast._run(other), model(other), atol=1e-3)  # what the session alone gives
        with caplog.at_level(logging.WARNING):
            assert torch.equal(fast(other), model(other))
    assert "running the model in PyTorch for 48x32 inputs" in caplog.text


class Bessel(nn.Module):
    """An op ONNX has no counterpart for."""

    def forward(self, x):
        return torch.special.bessel_j0(x).mean(dim=(2, 3))


def test_pytorch_stays_where_onnx_runtime_would_not_do_the_same_work(caplog, capfd):
    """AlexNet's and VGG's adaptive pools to a grid: the exporter refuses them with dynamic
    sizes, after printing its whole graph to stdout (50 lines for AlexNet, in every worker)."""
    alexnet = torchvision.models.alexnet().eval()
    with caplog.at_level(logging.INFO):
        assert fast_forward(alexnet, torch.zeros(1, 3, 224, 224)) is alexnet
    assert "avgpool pools to a 6x6 grid" in caplog.text
    assert capfd.readouterr().out == ""
    model = Bessel().eval()
    with caplog.at_level(logging.WARNING):  # a failure not known beforehand: a warning, and PyTorch
        assert fast_forward(model, torch.zeros(1, 3, 16, 16)) is model
    assert "its ONNX export failed (UnsupportedOperatorError" in caplog.text
    net = torchvision.models.resnet18(num_classes=3).eval()
    assert fast_forward(net, torch.zeros(1, 3, 16, 16), dtype=torch.bfloat16) is net  # autocast: PyTorch's


def test_the_curves_of_saliency_evaluate_run_in_onnx_runtime_on_a_cpu():
    """What `test_saliency_trust`'s AUCs (equal to PyTorch's curves) then go through."""
    ref = ModelRef("resnet18", "random", 0, None)
    assert isinstance(curves_model(ref), OnnxForward)
    assert not isinstance(curves_model(ref, torch.bfloat16), OnnxForward)  # autocast: PyTorch's folded model
