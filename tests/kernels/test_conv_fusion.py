"""Fusing each conv with its clamp leaves every output bit-identical, in fp32 and bf16, and
never touches a module that is called twice or tapped for its own output."""

import copy

import pytest
import torch
import torchvision
from helpers import trained_like_batchnorms
from torch import nn

from featscope.kernels.batchnorm_folding import fold_batchnorm
from featscope.kernels.conv_fusion import FusedConv, clamp_of, conv_clamp_chains, fuse_conv_clamps

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this PyTorch has no oneDNN")


def folded(arch: str) -> nn.Module:
    """Random weights, batch norms with statistics far from a fresh network's, folded, as an
    extraction runs them (channels-last)."""
    torch.manual_seed(0)
    model = trained_like_batchnorms(torchvision.models.get_model(arch, weights=None).eval())
    fold_batchnorm(model)
    return model.to(memory_format=torch.channels_last)


def outputs(model: nn.Module, x: torch.Tensor, paths: list[str], dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    seen = {}
    handles = [model.get_submodule(p).register_forward_hook(lambda _m, _i, out, p=p: seen.__setitem__(p, out.clone()))
               for p in paths]
    with torch.inference_mode(), torch.autocast("cpu", enabled=dtype is not None, dtype=dtype or torch.float32):
        seen["logits"] = model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("arch, expected", [("mobilenet_v2", 35), ("resnet18", 1), ("vgg11", 8)])
def test_fused_model_is_bit_identical(arch, expected, dtype):
    """MobileNet-V2: every conv before a ReLU6; ResNet-18: only the stem, since its blocks call
    one ReLU module twice (after a conv and after the sum); VGG: every conv before a ReLU."""
    model = folded(arch)
    fused = copy.deepcopy(model)
    assert fuse_conv_clamps(fused) == expected
    assert sum(isinstance(m, FusedConv) for m in fused.modules()) == expected
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    ref, ours = outputs(model, x, [], dtype), outputs(fused, x, [], dtype)
    assert ours["logits"].dtype == ref["logits"].dtype
    assert torch.equal(ours["logits"], ref["logits"])


def test_a_tapped_conv_or_folded_norm_keeps_its_own_output_and_a_tapped_block_is_unchanged():
    model = folded("mobilenet_v2")
    taps = ["features.13", "features.14.conv.0", "features.15.conv.0.0", "features.16.conv.1.1"]
    fused = copy.deepcopy(model)
    fuse_conv_clamps(fused, keep=taps)
    kinds = {path: type(fused.get_submodule(path)) for path in
             ("features.13.conv.0.0", "features.14.conv.0.0", "features.15.conv.0.0", "features.16.conv.1.0")}
    # inside a tapped block or a tapped conv-norm-clamp: its output is the same either way
    assert kinds["features.13.conv.0.0"] is FusedConv and kinds["features.14.conv.0.0"] is FusedConv
    # the conv itself, or the (folded) norm after it, would see the clamped tensor: left alone
    assert kinds["features.15.conv.0.0"] is nn.Conv2d and kinds["features.16.conv.1.0"] is nn.Conv2d
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    for dtype in (None, torch.bfloat16):
        ref, ours = outputs(model, x, taps, dtype), outputs(fused, x, taps, dtype)
        for tap in [*taps, "logits"]:
            assert torch.equal(ours[tap], ref[tap]), tap


def test_only_clamps_the_dtypes_hold_exactly_are_fused():
    """Clamping before or after rounding to bf16 agree only where the bounds are bf16 numbers;
    a smooth activation (SiLU) would be computed before rounding, differently."""
    assert clamp_of(nn.ReLU6()) == ("hardtanh", [0.0, 6.0]) and clamp_of(nn.ReLU()) == ("relu", [])
    assert clamp_of(nn.Hardtanh(-1.0, 1.0)) == ("hardtanh", [-1.0, 1.0])
    assert clamp_of(nn.Hardtanh(0.0, 6.1)) is None
    assert clamp_of(nn.SiLU()) is None and clamp_of(nn.Hardswish()) is None
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.SiLU(), nn.Conv2d(4, 4, 3), nn.Hardtanh(0.0, 6.1),
                          nn.Conv2d(4, 4, 3, padding_mode="reflect", padding=1), nn.ReLU(),
                          nn.Conv2d(4, 4, 3), nn.Identity(), nn.ReLU6()).eval()
    assert conv_clamp_chains(model) == [["6", "7", "8"]]


def test_a_conv_whose_output_is_used_twice_is_left_alone():
    class Branch(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.relu = nn.Conv2d(3, 4, 3), nn.ReLU()

        def forward(self, x):
            y = self.conv(x)
            return self.relu(y) + y

    model = Branch().eval()
    assert conv_clamp_chains(model) == []
    assert fuse_conv_clamps(copy.deepcopy(model)) == 0
