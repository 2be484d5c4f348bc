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
  directly; the backward of a stride-1 one (`_FrozenConvInputGradient`) as the 1x1 conv that
  it is, by the transposed weight. MobileNet-V2 spent a fifth of a float32 step in the
  im2col kernel's backward; on one thread of a 2-core AMD EPYC, batches of 4: 26-30 ms an
  image-step against 28-36 (six interleaved pairs), `render_units` on 2 lanes 0.89-0.96
  units/s against 0.84-0.87 (three pairs). bf16 is unchanged: PyTorch sends it to oneDNN.

Under bf16 autocast (`units render --precision bf16`) a third choice matters: oneDNN's bf16
gradient of a strided depthwise conv's input is 20-100x its float32 one on a CPU with
AVX512-BF16 but no AMX, so that gradient is computed in float32 (two casts), or, for large
inputs, in bf16 as one stride-1 conv for each phase of the input
(`_depthwise_input_gradient_by_phases`); every conv runs forward in bf16, its weights cast
once instead of by autocast on every call. `render_units` was 1.27-1.34x faster than in
float32 on a 2-core AMD EPYC with those convs wholly in float32 (1.07x before); their forward
in bf16 too: 8 interleaved pairs, 1.47-1.73 units/s against 1.39-1.66 (medians 1.63, 1.47);
then the phases for large inputs: 4 pairs, 1.78-1.85 against 1.59-1.76 (one thread, batch 4,
8 pairs: 14.9-16.2 ms an image-step against 15.4-18.4).

Each conv and the clamp after it (ReLU, ReLU6) run as one oneDNN call, the clamp a post-op,
as `conv_fusion` does for forward passes, wherever no tapped module would see another tensor
(`keep`); the backward (`_ClampedConvInputGradient`) masks the gradient by the clamped
output, as PyTorch's own ReLU backward does, so the clamp costs no pass of its own and one
activation is kept instead of two. On one thread of the EPYC, batches of 4, six interleaved
pairs: bf16 17.5-19.6 ms an image-step against 21.5-23.9, float32 unchanged (27.2-28.6
against 26.4-30.1); `render_units` on 2 lanes, bf16 1.40-1.63 units/s against 1.31-1.44.

MobileNet-V2 up to block13, Lucid's renderer at 128 px on one thread of a 2-core Xeon:
28-29 ms an image-step against 31-34 (batches of 4), 30-31 against 33-39 (batches of 1),
outputs within 2e-6; `render_units`, 8 units on 2 lanes, 48 steps: 1.24-1.37 units/s against
1.19-1.22 (four interleaved runs each). ResNet-18 (3x3 convs, plain ReLU) is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from featscope.kernels.conv_fusion import changes_tap, clamp_of, conv_clamp_chains, onednn_runs, weight_and_bias_in


class OneDnnConv2d(nn.Conv2d):
    """A Conv2d that runs CPU inputs on oneDNN whatever its kernel size, batch or thread count
    (PyTorch's dispatch sends small 1x1 float32 ones to its im2col kernel). Under bf16
    autocast it keeps its weights in bf16 (autocast would cast them again on every call) and
    takes a strided depthwise conv's input gradient by phases or in float32 (see
    `_slow_in_bf16`)."""

    clamp: tuple[str, list[float]] | None = None  # the clamp after it, fused in (`for_cpu_gradients`)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu" or self.weight.dtype != torch.float32:
            return self._clamped(super().forward(x))
        if torch.is_autocast_enabled("cpu"):
            dtype = torch.get_autocast_dtype("cpu")
            if dtype != torch.bfloat16 or not onednn_runs(dtype):
                return self._clamped(super().forward(x))
            return self._onednn(x.to(dtype), *self._weights_in_bf16())
        if x.dtype != torch.float32:
            return self._clamped(super().forward(x))
        return self._onednn(x, self.weight, self.bias)

    def _onednn(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        frozen = not weight.requires_grad and (bias is None or not bias.requires_grad)
        differentiated = torch.is_grad_enabled() and (x.requires_grad or not frozen)
        if self.clamp is not None and not differentiated:
            return torch.ops.mkldnn._convolution_pointwise(x, weight, bias, list(self.padding), list(self.stride),
                                                           list(self.dilation), self.groups, *self.clamp, "")
        if self.clamp is not None and frozen:
            return _ClampedConvInputGradient.apply(x, weight, bias, self)
        if differentiated and frozen and (self._pointwise() or self._slow_in_bf16(x.dtype)):
            return _FrozenConvInputGradient.apply(x, weight, bias, self)
        return self._clamped(torch.mkldnn_convolution(x, weight, bias, list(self.padding), list(self.stride),
                                                      list(self.dilation), self.groups))

    def _clamped(self, y: torch.Tensor) -> torch.Tensor:
        """y through the fused clamp, where it runs apart (another device or dtype, weights that learn)."""
        if self.clamp is None:
            return y
        attr, scalars = self.clamp
        return F.relu(y) if attr == "relu" else F.hardtanh(y, *scalars)

    def _input_gradient(self, grad: torch.Tensor, x: torch.Tensor | None, weight: torch.Tensor,
                        layout: torch.memory_format) -> torch.Tensor:
        """The gradient of the conv's input (frozen weights): a pointwise conv's as the 1x1 conv
        by the transposed weight (see `_FrozenConvInputGradient`), a bf16 strided depthwise
        one's by phases or in float32 (`_slow_in_bf16`), another's as autograd's."""
        if self._pointwise():  # laid out as the output (a sum's gradient is expanded)
            return torch.mkldnn_convolution(grad.contiguous(memory_format=layout), self._transposed(weight), None,
                                            [0, 0], [1, 1], [1, 1], 1)
        dtype = grad.dtype
        if self._slow_in_bf16(dtype):
            if self.dilation == (1, 1) and x[0].numel() >= _PHASES_FROM:
                return _depthwise_input_gradient_by_phases(grad.contiguous(memory_format=layout), weight,
                                                           x.shape[2:], self.stride, self.padding)
            # The input's values are not read, only its shape and layout: an uninitialised
            # float32 stand-in laid out as x (torch.nn.grad.conv2d_input's expanded one made
            # oneDNN copy and convert it, 2.4x slower at 96 channels, 112 px)
            x = torch.empty(x.shape, dtype=torch.float32, device=x.device, memory_format=_layout_of(x))
            grad, weight = grad.float(), self.weight
        return torch.ops.aten.convolution_backward(grad, x, weight, None, list(self.stride), list(self.padding),
                                                   list(self.dilation), False, [0, 0], self.groups,
                                                   [True, False, False])[0].to(dtype)

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

    def _slow_in_bf16(self, dtype: torch.dtype) -> bool:
        """A bf16 depthwise conv with a stride: oneDNN's bf16 gradient of its input is 20-100x
        its float32 one on an AVX512-BF16 CPU without AMX (2-core AMD EPYC, one thread, a batch
        of 4, channels-last: MobileNet-V2's 96 channels at 112 px 28.7 ms against 2.6, 576 at
        14 px 13.5 against 0.1), 60% of a bf16 step through MobileNet-V2; so it is taken by
        phases (`_depthwise_input_gradient_by_phases`), or in float32 at the cost of two casts.
        Its forward is fast in bf16 (0.5 ms against 2.8 at 96 channels, 112 px)."""
        return dtype == torch.bfloat16 and self.groups > 1 and self.groups == self.in_channels \
            and self.stride != (1, 1)


class _FrozenConvInputGradient(torch.autograd.Function):
    """A frozen conv on oneDNN whose input's gradient is `_input_gradient`'s: for a 1x1 conv
    the 1x1 conv by the transposed weight on oneDNN too (PyTorch's autograd would send a
    float32 one of fewer than 16 images on one thread to its im2col kernel), for a bf16
    strided depthwise conv by phases or in float32. No gradient for the weight or the bias."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                conv: OneDnnConv2d) -> torch.Tensor:
        y = torch.mkldnn_convolution(x, weight, bias, list(conv.padding), list(conv.stride), list(conv.dilation),
                                     conv.groups)
        ctx.save_for_backward(None if conv._pointwise() else x, weight)
        ctx.conv, ctx.layout = conv, _layout_of(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        return ctx.conv._input_gradient(grad, x, weight, ctx.layout), None, None, None


class _ClampedConvInputGradient(torch.autograd.Function):
    """A frozen conv and the clamp after it (ReLU, ReLU6) as one oneDNN call, and the input's
    gradient from the clamped output: the clamp passes a gradient where its output is strictly
    inside its bounds, which is where its input was (PyTorch's own ReLU backward reads the
    output too). Keeps the output and, unless the conv is pointwise, the input."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                conv: OneDnnConv2d) -> torch.Tensor:
        y = torch.ops.mkldnn._convolution_pointwise(x, weight, bias, list(conv.padding), list(conv.stride),
                                                    list(conv.dilation), conv.groups, *conv.clamp, "")
        ctx.save_for_backward(None if conv._pointwise() else x, weight, y)
        ctx.conv, ctx.layout = conv, _layout_of(y)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight, y = ctx.saved_tensors
        attr, scalars = ctx.conv.clamp
        grad = grad.contiguous(memory_format=ctx.layout)  # laid out as the output (a sum's gradient is expanded)
        inside = torch.ops.aten.threshold_backward(grad, y, 0) if attr == "relu" else \
            torch.ops.aten.hardtanh_backward(grad, y, *scalars)
        return ctx.conv._input_gradient(inside, x, weight, ctx.layout), None, None, None


_PHASES_FROM = 1 << 18  # input values an image, from which the phases beat float32 (see below)


def _depthwise_input_gradient_by_phases(grad: torch.Tensor, weight: torch.Tensor, size: Sequence[int],
                                        stride: Sequence[int], padding: Sequence[int]) -> torch.Tensor:
    """The input gradient of a strided depthwise conv (dilation 1) in its own dtype, as one
    stride-1 depthwise conv of `grad` for each phase of the input (each remainder of its row
    and column modulo the stride) and their results interleaved: input row i receives from
    kernel rows t = r, r + s, ... (r = (i + padding) mod s), a full convolution of `grad` by
    that sub-kernel. Such convs are fast in bf16 where the strided conv's own backward is not
    (`_slow_in_bf16`). MobileNet-V2's 96 channels at 112 px, a batch of 4, one thread of the
    EPYC: 3.0 ms against 4.9 for float32 and its casts; 144 at 56 px 0.63 against 1.64; at 28
    px and less the four small calls cost more than float32 (`_PHASES_FROM`)."""
    n, channels = grad.shape[:2]
    out = torch.empty(n, channels, *size, dtype=grad.dtype, device=grad.device, memory_format=torch.channels_last)
    for rh in range(stride[0]):
        for rw in range(stride[1]):
            sub = weight[:, :, rh::stride[0], rw::stride[1]]  # the kernel's taps that reach this phase
            rows, cols = ((r - p) % s for r, p, s in zip((rh, rw), padding, stride))  # its first row and column
            first = [(i + p - r) // s for i, p, r, s in zip((rows, cols), padding, (rh, rw), stride)]
            target = out[:, :, rows::stride[0], cols::stride[1]]
            if sub.shape[2] == 0 or sub.shape[3] == 0:  # a stride longer than the kernel: no tap reaches it
                target.zero_()
                continue
            taps = sub.shape[2:]
            full = torch.mkldnn_convolution(grad, sub.flip(-2, -1).contiguous(), None, [taps[0] - 1, taps[1] - 1],
                                            [1, 1], [1, 1], channels)
            part = full[:, :, first[0]:first[0] + target.shape[2], first[1]:first[1] + target.shape[3]]
            if part.shape != target.shape:  # rows or columns past the gradient's reach receive nothing
                target.zero_()
            target[:, :, :part.shape[2], :part.shape[3]].copy_(part)
    return out


def _layout_of(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def for_cpu_gradients(model: nn.Module, keep: Iterable[str] = ()) -> nn.Module:
    """`model` itself, changed in place: activations out of place, zero-padded Conv2d layers
    on oneDNN (where this PyTorch has it), each with the clamp after it fused in where no
    module of `keep` (read by hooks) would see another tensor (`conv_fusion`'s chains). Only
    for a copy that images are optimised through: the function it computes does not change."""
    onednn = torch.backends.mkldnn.is_available()
    if onednn and not model.training:
        taps = list(keep)
        for chain in conv_clamp_chains(model):
            if not any(changes_tap(tap, chain) for tap in taps):
                model.get_submodule(chain[0]).clamp = clamp_of(model.get_submodule(chain[-1]))
                model.set_submodule(chain[-1], nn.Identity())
    for module in model.modules():
        if hasattr(module, "inplace") and isinstance(module.inplace, bool):
            module.inplace = False
        if onednn and type(module) is nn.Conv2d and module.padding_mode == "zeros" \
                and not isinstance(module.padding, str):
            module.__class__ = OneDnnConv2d
    return model
