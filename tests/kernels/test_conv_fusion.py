"""Fusing each conv with its clamp, and keeping the other weights packed, leave every output
bit-identical, in fp32, bf16 and fp16; fusing never touches a module that is called twice or
tapped for its own output."""

import copy
import pickle

import pytest
import torch
import torchvision
from helpers import trained_like_batchnorms
from torch import nn

from featscope.kernels import conv_fusion
from featscope.kernels.batchnorm_folding import fold_batchnorm
from featscope.kernels.conv_fusion import (
    PACK_MAX_BATCH,
    AutocastLinear,
    FusedConv,
    clamp_of,
    conv_clamp_chains,
    fuse_conv_clamps,
    pack_weights,
)

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


PACKED_CASES = [  # (arch, convs packed, linear layers kept in the autocast dtype, taps)
    ("mobilenet_v2", 17, 1, ["features.2.conv.2", "features.13", "classifier.1"]),  # projection convs, classifier
    ("resnet18", 19, 1, ["layer1.0.conv1", "layer2.0.downsample.0", "fc"])]  # all but the stem (fused)
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("arch, convs, linears, taps, dtype", [
    *[pytest.param(*case, dtype, id=f"{case[0]}-{name}") for case in PACKED_CASES for name, dtype in DTYPES.items()],
    # every conv fused; fc6, fc7, fc8 (in bf16 only: 133M weights make it 5-9 s a dtype)
    pytest.param("vgg11", 0, 3, ["classifier.0", "classifier.3"], torch.bfloat16, id="vgg11-bf16")])
def test_packed_weights_leave_every_output_and_tap_bit_identical_at_any_input_shape(arch, convs, linears, taps, dtype):
    """Against the model with its clamps fused (the extraction model before this; in float32,
    fused and unfused differ on a batch of one, which PyTorch sends to its own kernels). The
    weights are packed for each small batch's shape, and left unpacked for a larger batch:
    the same numbers either way. A used model still copies."""
    model = folded(arch)
    fuse_conv_clamps(model)
    packed = copy.deepcopy(model)
    assert pack_weights(packed) == convs + linears
    assert sum(type(m) is FusedConv and m.attr == "none" for m in packed.modules()) == convs
    assert sum(isinstance(m, AutocastLinear) for m in packed.modules()) == linears
    for shape in [(1, 3, 64, 64), (3, 3, 64, 64), (2, 3, 80, 96), (PACK_MAX_BATCH + 1, 3, 64, 64)]:
        x = torch.randn(shape).contiguous(memory_format=torch.channels_last)
        ref, ours = outputs(model, x, taps, dtype), outputs(packed, x, taps, dtype)
        for tap in [*taps, "logits"]:
            assert ours[tap].dtype == ref[tap].dtype and torch.equal(ours[tap], ref[tap]), (shape, tap)
    again = pickle.loads(pickle.dumps(copy.deepcopy(packed)))  # oneDNN's packed tensors cannot be copied
    x = torch.randn(1, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    assert torch.equal(outputs(again, x, [], dtype)["logits"], outputs(model, x, [], dtype)["logits"])


def test_where_this_cpus_onednn_lacks_the_dtype_fused_and_packed_convs_run_as_the_model_did(monkeypatch):
    """oneDNN's fp16 convolution needs AVX512-FP16 or AVX-NE-CONVERT, which an AMD EPYC with
    AVX512-BF16 lacks: there `--precision fp16` on the CPU was a traceback from the first
    fused conv. Such a CPU is simulated here (oneDNN's own check says no, and its calls fail
    as they do there): each conv, then its clamp, the numbers of the model as it was."""
    def refuse(*_args, **_kwargs):
        raise RuntimeError("mkldnn_convolution: fp16 path needs the cpu support avx_ne_convert or avx512_fp16")

    model = folded("mobilenet_v2")
    ours = copy.deepcopy(model)
    fuse_conv_clamps(ours)
    pack_weights(ours)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(conv_fusion, "_ONEDNN_RUNS", {})
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_fp16_supported", lambda: False)
    monkeypatch.setattr(torch.ops.mkldnn, "_convolution_pointwise", refuse)
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_convolution_weight", refuse)
    ref, got = outputs(model, x, ["features.13"], torch.float16), outputs(ours, x, ["features.13"], torch.float16)
    for tap in ("features.13", "logits"):
        assert got[tap].dtype == ref[tap].dtype == torch.float16 and torch.equal(got[tap], ref[tap]), tap
    assert conv_fusion._ONEDNN_RUNS == {torch.float16: False}


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
