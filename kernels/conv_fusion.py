"""Run each conv and the clamp after it (ReLU, ReLU6) as one oneDNN call, for CPU forward
passes without gradients.

With batch norms folded (`batchnorm_folding`), MobileNet-V2's ReLU6 after a conv is still a
pass of its own over the conv's output: 38% of a bf16 forward pass here (torch profiler,
batch 4, one thread), as long as the convolutions themselves. oneDNN can clamp inside the
convolution, as a post-op (`torch.ops.mkldnn._convolution_pointwise`, the kernel TorchInductor's
CPU fusion calls). The result is bit-identical: clamping to bounds that the dtype holds
exactly (0, 6) gives the same number before or after rounding to bf16, so features extracted
before and after this agree exactly (tested; in float32 not for a batch of one image, which
PyTorch runs unfused on its own kernels, not oneDNN's). Activations that are not such clamps
(SiLU, Hardswish, GELU) would be computed before rounding, differently: they stay unfused.

A fused conv also keeps its weights in the autocast dtype, instead of autocast casting them
anew on every forward pass (10% of a bf16 pass here), and packed in the layout oneDNN's kernel
reads, instead of oneDNN reordering them on every call (for batches up to PACK_MAX_BATCH).
`pack_weights` does the same for the convs with no clamp after them and for the linear
layers, under autocast. Those costs come once a call, whatever the batch: MobileNet-V2's
extraction model in bf16 on one thread took 7.8-8.8 ms for one image (an upload to the query
service) against 11.8-11.9 before, 18.8-20.5 against 24.7-25.1 for 4, 32.7-37.2 against
43.5-44.7 for 8 (with `kernels.layers`' cheaper tap lookup), every output bit-identical; 64
images on two threads, as extraction runs, as fast as before. Nothing here has a backward
pass: the copies images are optimised through fuse the same chains with one of their own
(`cpu_gradients`); saliency's gradients go through the model unfused.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
import torch.nn.functional as F
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


def weight_and_bias_in(module: nn.Module, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A conv's or linear layer's weight and bias (None where it has none) cast to `dtype`,
    detached: the copies a module below keeps, made once instead of on every call."""
    bias = module.bias
    return module.weight.detach().to(dtype), None if bias is None else bias.detach().to(dtype)


# Batches up to this size take a conv's weight packed in oneDNN's layout for their shape,
# saving a reorder of the weight on every call; a larger one takes it unpacked, the reorder
# small beside its work. MobileNet-V2, bf16: a pass of one image on one thread 7.1-7.9 ms
# packed against 8.4-9.9 unpacked; 64 images on two threads 5-10% slower with the weights
# packed for another shape (oneDNN then picks a kernel that reads that layout).
PACK_MAX_BATCH = 8
PACK_MAX_SHAPES = 16  # packed copies kept, at most: a run's model sees one image size

# Whether this CPU's oneDNN computes in a dtype, asked once: its fp16 convolution needs
# AVX512-FP16 or AVX-NE-CONVERT (a Sapphire Rapids Xeon has them, an AMD EPYC with AVX512-BF16
# does not), its bf16 one AVX-512; elsewhere PyTorch runs the conv on its own kernels.
_ONEDNN_RUNS: dict[torch.dtype, bool] = {}


def onednn_runs(dtype: torch.dtype) -> bool:
    """Whether oneDNN's convolution takes `dtype` on this CPU (the check its calls make)."""
    if dtype not in _ONEDNN_RUNS:
        supported = {torch.bfloat16: torch.ops.mkldnn._is_mkldnn_bf16_supported,
                     torch.float16: torch.ops.mkldnn._is_mkldnn_fp16_supported}.get(dtype, lambda: True)
        _ONEDNN_RUNS[dtype] = bool(supported())
    return _ONEDNN_RUNS[dtype]


class FusedConv(nn.Module):
    """A Conv2d and the clamp after it as one oneDNN convolution (no gradient). attr "none":
    a conv with no clamp after it (`pack_weights`), which runs so only under autocast, where
    PyTorch sends it to the same oneDNN kernel; in float32 it runs as the Conv2d does
    (PyTorch's own kernels take some small float32 convs). In a dtype this CPU's oneDNN does
    not take (`onednn_runs`), the conv and then the clamp, as the model did before fusing."""

    def __init__(self, conv: nn.Conv2d, attr: str, scalars: list[float]):
        super().__init__()
        self.conv, self.attr, self.scalars = conv, attr, scalars
        self._cast: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor | None]] = {}  # weight and bias in a dtype
        self._packed: dict[tuple, torch.Tensor] = {}  # the weight packed for (dtype, input shape)

    def _weights_in(self, dtype: torch.dtype, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight and bias in `dtype`, the weight packed for inputs shaped as x where the
        batch is at most PACK_MAX_BATCH (oneDNN's layout depends on the shape; the same numbers
        either way)."""
        if dtype not in self._cast:
            self._cast[dtype] = weight_and_bias_in(self.conv, dtype)
        weight, bias = self._cast[dtype]
        if len(x) > PACK_MAX_BATCH or len(self._packed) >= PACK_MAX_SHAPES:
            return weight, bias
        key = (dtype, tuple(x.shape))
        if key not in self._packed:
            conv = self.conv
            self._packed[key] = torch.ops.mkldnn._reorder_convolution_weight(
                weight, list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups, list(x.shape))
        return self._packed[key], bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        autocast = torch.is_autocast_enabled("cpu")
        if self.attr == "none" and not autocast:
            return self.conv(x)
        dtype = torch.get_autocast_dtype("cpu") if autocast else x.dtype
        if not onednn_runs(dtype):
            return self._unfused(x)
        weight, bias = self._weights_in(dtype, x)
        conv = self.conv
        return torch.ops.mkldnn._convolution_pointwise(x.to(dtype), weight, bias, list(conv.padding),
                                                       list(conv.stride), list(conv.dilation), conv.groups,
                                                       self.attr, self.scalars, "")

    def _unfused(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.attr == "relu":
            return F.relu(y)
        return F.hardtanh(y, *self.scalars) if self.attr == "hardtanh" else y

    def __getstate__(self) -> dict:
        """Copies (deepcopy, pickle) leave the packed weights behind: oneDNN's opaque tensors
        cannot be copied, and the copy packs its own on its first call."""
        return self.__dict__ | {"_packed": {}}


class AutocastLinear(nn.Module):
    """A Linear whose weights are kept in the autocast dtype, so autocast does not cast the
    whole matrix again on every call (MobileNet-V2's classifier: 0.8 ms of a bf16 pass of one
    image). The same call with the same numbers: autocast casts the input as before and finds
    the weights cast. In float32 it is the Linear."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.linear = linear
        self._cast: dict[torch.dtype, tuple[torch.Tensor, torch.Tensor | None]] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_autocast_enabled(x.device.type):
            return self.linear(x)
        dtype = torch.get_autocast_dtype(x.device.type)
        if dtype not in self._cast:
            self._cast[dtype] = weight_and_bias_in(self.linear, dtype)
        return F.linear(x, *self._cast[dtype])


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


def changes_tap(tap: str, chain: list[str]) -> bool:
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
        if any(changes_tap(tap, chain) for tap in taps):
            continue
        attr, scalars = clamp_of(model.get_submodule(chain[-1]))
        model.set_submodule(chain[0], FusedConv(model.get_submodule(chain[0]), attr, scalars))
        model.set_submodule(chain[-1], nn.Identity())
        fused += 1
    return fused


def pack_weights(model: nn.Module) -> int:
    """Keep the weights of `model`'s other convs (those `fuse_conv_clamps` left, with no clamp
    fused) packed for oneDNN and of its linear layers in the autocast dtype, in place; returns
    how many modules. Forward passes under autocast only gain; every output stays
    bit-identical (a tap on such a module sees the same tensor)."""
    if model.training:
        raise ValueError("weights can be packed only in eval mode")
    if not torch.backends.mkldnn.is_available():
        return 0
    wrapped = 0
    for path, module in list(model.named_modules()):
        if type(module) is nn.Linear and module.weight.device.type == "cpu":
            model.set_submodule(path, AutocastLinear(module))
        elif _fusable(module) and not isinstance(model.get_submodule(path.rpartition(".")[0]), FusedConv):
            model.set_submodule(path, FusedConv(module, "none", []))
        else:
            continue
        wrapped += 1
    return wrapped
