"""Mean class gradients in forward mode against reverse-mode autograd and a classifier's weights."""

import pytest
import torch
from torch import nn

from featscope.kernels.class_attribution import mean_class_gradients


def _net() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU(inplace=True), nn.Conv2d(6, 5, 3, stride=2),
                         nn.BatchNorm2d(5), nn.ReLU6(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(5, 7)).eval()


@pytest.mark.filterwarnings("error::FutureWarning")  # torch's own, on its first dual tensor: not shown to users
def test_at_the_classifiers_input_the_gradients_are_its_weights():
    net = _net()
    done = []
    got = mean_class_gradients(net, net[6], torch.randn(4, 3, 12, 12), chunk=2, batch=3, on_images=done.append)
    torch.testing.assert_close(got, net[7].weight.detach().T)
    assert done == [3, 1]  # a progress bar's updates: every image once


def test_deeper_in_they_equal_reverse_mode_autograd_whatever_the_chunks():
    net = _net()
    images = torch.randn(5, 3, 12, 12)
    seen = {}

    def keep(_m, _i, out):
        seen["a"] = out.detach().requires_grad_()
        return seen["a"]

    handle = net[1].register_forward_hook(keep)
    logits = net(images)
    handle.remove()
    expected = torch.stack([torch.autograd.grad(logits[:, c].sum(), seen["a"], retain_graph=True)[0].sum((0, 2, 3))
                            for c in range(7)], dim=1) / 5
    for chunk, batch in ((6, 5), (4, 2), (1, 1)):
        torch.testing.assert_close(mean_class_gradients(net, net[1], images, chunk=chunk, batch=batch), expected,
                                   rtol=1e-4, atol=1e-5)
