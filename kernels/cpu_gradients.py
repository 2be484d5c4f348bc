"""Make a model copy cheaper to differentiate on a CPU, the same function of its input.

Images optimised through a model (feature visualisations, atlas cells, the toolbox) pay for a
backward pass every step. Two of PyTorch's CPU choices slow that pass on MobileNet-style
networks, and a copy made only for such optimisation can avoid both:

- An in-place ReLU6 (`hardtanh_`) makes autograd clone its input to compute its backward:
  a full extra copy of every expanded activation. Out of place, the output it keeps is the
  one the next layer reads anyway.
- A 1x1 convolution with fewer than 16 images on one thread (a CPU lane's case,
  `pipelines.core.lanes`) goes to PyTorch's own im2col kernel instead of oneDNN's, which
  first copies a channels-last input to contiguous, in float32 both ways: the forward and
  the backward, which PyTorch dispatches by the same rule. The forward is moved to oneDNN
  directly; the backward of a stride-1 one (`_PointwiseInputGradient`) as the 1x1 conv that
  it is, by the transposed weight. MobileNet-V2 spent a fifth of a float32 step in the
  im2col kernel's backward; on one thread of a 2-core AMD EPYC, batches of 4: 26-30 ms an
  image-step against 28-36 (six interleaved pairs), `render_units` on 2 lanes 0.89-0.96
  units/s against 0.84-0.87 (three pairs). bf16 is unchanged: PyTorch sends it to oneDNN.

Under bf16 autocast (`units render --precision bf16`) a third choice matters: oneDNN's bf16
gradient of a strided depthwise conv's input is 20-100x its float32 one on a CPU with
AVX512-BF16 but no AMX, so those convs run in float32 (two casts), and every other conv keeps
its weights in bf16 instead of autocast casting them on every call: `render_units` 1.27-1.34x
faster than in float32 on a 2-core AMD EPYC (1.07x before).

MobileNet-V2 up to block13, Lucid's renderer at 128 px on one thread of a 2-core Xeon:
28-29 ms an image-step against 31-34 (batches of 4), 30-31 against 33-39 (batches of 1),
outputs within 2e-6; `render_units`, 8 units on 2 lanes, 48 steps: 1.24-1.37 units/s against
1.19-1.22 (four interleaved runs each). ResNet-18 (3x3 convs, plain ReLU) is unchanged.
"""

from __future__ import annotations

import torch
from torch import nn

from featscope.kernels.conv_fusion import onednn_runs, weight_and_bias_in


class OneDnnConv2d(nn.Conv2d):
    """A Conv2d that runs CPU inputs on oneDNN whatever its kernel size, batch or thread count
    (PyTorch's dispatch sends small 1x1 float32 ones to its im2col kernel). Under bf16
    autocast it keeps its weights in bf16 (autocast would cast them again on every call) and
    runs a strided depthwise conv in float32 (see `_slow_in_bf16`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.weight.dtype != torch.float32:
            return super().forward(x)
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            if dtype != torch.bfloat16 or not onednn_runs(dtype):
                return super().forward(x)
            if self._slow_in_bf16():
                return self._onednn(x.float(), self.weight, self.bias).to(dtype)
            return self._onednn(x.to(dtype), *self._weights_in_bf16())
        if x.dtype != torch.float32:
            return super().forward(x)
        return self._onednn(x, self.weight, self.bias)

    def _onednn(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if self._pointwise() and x.requires_grad and torch.is_grad_enabled() and not weight.requires_grad \
                and (bias is None or not bias.requires_grad):
            return _PointwiseInputGradient.apply(x, weight, bias, self._transposed(weight))
        return torch.mkldnn_convolution(x, weight, bias, list(self.padding), list(self.stride), list(self.dilation),
                                        self.groups)

    def _pointwise(self) -> bool:
        """A 1x1 conv, stride 1, no padding, one group: its input's gradient is a 1x1 conv too."""
        return self.kernel_size == (1, 1) and self.stride == (1, 1) and self.padding == (0, 0) and self.groups == 1

    def _transposed(self, weight: torch.Tensor) -> torch.Tensor:
        """(in, out, 1, 1): the weight of the conv that carries the gradient back, made once
        for each dtype (the copy's weights never change)."""
        key = f"_transposed_{weight.dtype}"
        if key not in self.__dict__:
            self.__dict__[key] = weight.detach().transpose(0, 1).contiguous()
        return self.__dict__[key]

    def _weights_in_bf16(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias in bf16, cast once (the copy's weights never change)."""
        if "_bf16" not in self.__dict__:
            self.__dict__["_bf16"] = weight_and_bias_in(self, torch.bfloat16)
        return self.__dict__["_bf16"]

    def _slow_in_bf16(self) -> bool:
        """A depthwise conv with a stride: oneDNN's bf16 gradient of its input is 20-100x its
        float32 one on an AVX512-BF16 CPU without AMX (2-core AMD EPYC, one thread, a batch of
        4, channels-last: MobileNet-V2's 96 channels at 112 px 28.0 ms against 1.4, 576 at 14 px
        12.8 against 0.1), 60% of a bf16 step through MobileNet-V2; in float32 it costs
        two casts."""
        return self.groups > 1 and self.groups == self.in_channels and self.stride != (1, 1)


class _PointwiseInputGradient(torch.autograd.Function):
    """A frozen 1x1 conv on oneDNN whose input's gradient is the 1x1 conv by the transposed
    weight on oneDNN too (PyTorch's autograd would send a float32 one of fewer than 16 images
    on one thread to its im2col kernel). No gradient for the weight or the bias."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                transposed: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(transposed)
        ctx.layout = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else \
            torch.contiguous_format
        return torch.mkldnn_convolution(x, weight, bias, [0, 0], [1, 1], [1, 1], 1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (transposed,) = ctx.saved_tensors
        grad = grad.contiguous(memory_format=ctx.layout)  # laid out as the input was (a sum's gradient is expanded)
        return torch.mkldnn_convolution(grad, transposed, None, [0, 0], [1, 1], [1, 1], 1), None, None, None


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
