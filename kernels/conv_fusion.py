"""Run each conv and the clamp after it (ReLU, ReLU6) as one oneDNN call, for CPU forward
passes without gradients.

With batch norms folded (`batchnorm_folding`), MobileNet-V2's ReLU6 after a conv is still a
pass of its own over the conv's output: 38% of a bf16 forward pass here (torch profiler,
batch 4, one thread), as long as the convolutions themselves. oneDNN can clamp inside the
convolution, as a post-op (`torch.ops.mkldnn._convolution_pointwise`, the kernel TorchInductor's
CPU fusion calls). The result is bit-identical: clamping to bounds that the dtype holds
exactly (0, 6) gives the same number before or after rounding to bf16, so features extracted
before and after this agree exactly (tested). Activations that are not such clamps (SiLU,
Hardswish, GELU) would be computed before rounding, differently: they stay unfused.

A fused conv also keeps its weights in the autocast dtype, instead of autocast casting them
anew on every forward pass (10% of a bf16 pass here). It has no backward pass: gradient
methods (saliency, visualisation) keep the model as folded.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
from torch import fx, nn

from featscope.kernels.batchnorm_folding import traced_graph


def clamp_of(module: nn.Module) -> tuple[str, list[float]] | None:
    """oneDNN's post-op for a ReLU, ReLU6 or Hardtanh whose bounds every float dtype holds
    exactly; None for any other module."""
    if isinstance(module, nn.ReLU):
        return "relu", []
    if isinstance(module, nn.Hardtanh):  # nn.ReLU6 is a Hardtanh(0, 6)
        low, high = float(module.min_val), float(module.max_val)
        if all(torch.tensor(v, dtype=torch.bfloat16).item() == v == torch.tensor(v, dtype=torch.float16).item()
               for v in (low, high)):
            return "hardtanh", [low, high]
    return None


class FusedConv(nn.Module):
    """A Conv2d and the clamp after it as one oneDNN convolution (no gradient)."""

    def __init__(self, conv: nn.Conv2d, attr: str, scalars: list[float]):
        super().__init__()
        self.conv, self.attr, self.scalars = conv, attr, scalars
        self._weights: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def _weights_in(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
        if dtype not in self._weights:
            weight, bias = self.conv.weight.detach(), self.conv.bias
            self._weights[dtype] = (weight.to(dtype), None if bias is None else bias.detach().to(dtype))
        return self._weights[dtype]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else x.dtype
        weight, bias = self._weights_in(dtype)
        conv = self.conv
        return torch.ops.mkldnn._convolution_pointwise(x.to(dtype), weight, bias, list(conv.padding),
                                                       list(conv.stride), list(conv.dilation), conv.groups,
                                                       self.attr, self.scalars, "")


def _fusable(conv: nn.Module) -> bool:
    return (type(conv) is nn.Conv2d and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
            and conv.weight.device.type == "cpu" and conv.weight.dtype == torch.float32)


def conv_clamp_chains(model: nn.Module) -> list[list[str]]:
    """Module paths [conv, (identities), clamp] where the clamp's only input is the conv,
    through Identity modules (folded batch norms) used nowhere else; [] when the model cannot
    be traced."""
    graph = traced_graph(model)
    if graph is None:
        return []
    modules = dict(model.named_modules())
    calls = Counter(node.target for node in graph.nodes if node.op == "call_module")
    chains = []
    for node in graph.nodes:
        # a module called twice (ResNet's blocks call one ReLU after a conv and after the sum)
        # cannot become an Identity for one of its calls
        if node.op != "call_module" or clamp_of(modules.get(node.target)) is None or calls[node.target] > 1:
            continue
        chain, source = [node.target], node.args[0]
        while (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1
               and isinstance(modules.get(source.target), nn.Identity) and calls[source.target] == 1):
            chain.insert(0, source.target)
            source = source.args[0]
        if (isinstance(source, fx.Node) and source.op == "call_module" and len(source.users) == 1
                and calls[source.target] == 1 and _fusable(modules.get(source.target))):
            chains.append([source.target, *chain])
    return chains


def _changes_tap(tap: str, chain: list[str]) -> bool:
    """Whether a hook on `tap` would see another tensor once the chain is one module: the
    conv's and the identities' outputs become clamped, and a module holding the conv but not
    the clamp would output the clamped tensor."""
    holds = lambda path: path.startswith(tap + ".")  # noqa: E731
    return tap in chain[:-1] or (tap != "" and holds(chain[0]) and not holds(chain[-1]))


def fuse_conv_clamps(model: nn.Module, keep: Iterable[str] = ()) -> int:
    """Fuse each conv -> clamp chain of an eval-mode CPU `model` in place where no module of
    `keep` (tapped for its output) would see a different tensor; returns how many. Nothing
    where this PyTorch has no oneDNN."""
    if model.training:
        raise ValueError("convs and clamps can be fused only in eval mode")
    if not torch.backends.mkldnn.is_available():
        return 0
    taps = list(keep)
    fused = 0
    for chain in conv_clamp_chains(model):
        if any(_changes_tap(tap, chain) for tap in taps):
            continue
        attr, scalars = clamp_of(model.get_submodule(chain[-1]))
        model.set_submodule(chain[0], FusedConv(model.get_submodule(chain[0]), attr, scalars))
        model.set_submodule(chain[-1], nn.Identity())
        fused += 1
    return fused
