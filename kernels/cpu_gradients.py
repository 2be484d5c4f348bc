"""Make a model copy cheaper to differentiate on a CPU, the same function of its input.

Images optimised through a model (feature visualisations, atlas cells, the toolbox) pay for a
backward pass every step. Two of PyTorch's CPU choices slow that pass on MobileNet-style
networks, and a copy made only for such optimisation can avoid both:

- An in-place ReLU6 (`hardtanh_`) makes autograd clone its input to compute its backward:
  a full extra copy of every expanded activation. Out of place, the output it keeps is the
  one the next layer reads anyway.
- A 1x1 convolution with fewer than 16 images on one thread (a CPU lane's case,
  `pipelines.core.lanes`) goes to PyTorch's own im2col kernel instead of oneDNN's, which
  first copies a channels-last input to contiguous. Its backward still goes there (PyTorch
  dispatches it); the forward is what can be moved.

MobileNet-V2 up to block13, Lucid's renderer at 128 px on one thread of a 2-core Xeon:
28-29 ms an image-step against 31-34 (batches of 4), 30-31 against 33-39 (batches of 1),
outputs within 2e-6; `render_units`, 8 units on 2 lanes, 48 steps: 1.24-1.37 units/s against
1.19-1.22 (four interleaved runs each). ResNet-18 (3x3 convs, plain ReLU) is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn


class OneDnnConv2d(nn.Conv2d):
    """A Conv2d that runs float32 CPU inputs on oneDNN whatever its kernel size, batch or
    thread count (PyTorch's dispatch sends small 1x1 ones to its im2col kernel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (x.device.type != "cpu" or x.dtype != torch.float32 or self.weight.dtype != torch.float32
                or torch.is_autocast_enabled("cpu")):
            return super().forward(x)
        return torch.mkldnn_convolution(x, self.weight, self.bias, list(self.padding), list(self.stride),
                                        list(self.dilation), self.groups)


def for_cpu_gradients(model: nn.Module) -> nn.Module:
    """`model` itself, changed in place: activations out of place and zero-padded Conv2d
    layers on oneDNN (where this PyTorch has it). Only for a copy that images are optimised
    through: the function it computes does not change."""
    onednn = torch.backends.mkldnn.is_available()
    for module in model.modules():
        if hasattr(module, "inplace") and isinstance(module.inplace, bool):
            module.inplace = False
        if onednn and type(module) is nn.Conv2d and module.padding_mode == "zeros" \
                and not isinstance(module.padding, str):
            module.__class__ = OneDnnConv2d
    return model
