"""Folding batch norms leaves every output that matters as it was."""

import copy

import pytest
import torch
import torchvision
from helpers import trained_like_batchnorms
from torch import nn

from featscope.kernels.batchnorm_folding import conv_bn_pairs, fold_batchnorm


def trained_like(arch: str) -> nn.Module:
    """Random weights with non-trivial BN statistics and affine parameters, in eval mode."""
    torch.manual_seed(0)
    return trained_like_batchnorms(torchvision.models.get_model(arch, weights=None).eval())


def outputs(model: nn.Module, x: torch.Tensor, paths: list[str]) -> dict[str, torch.Tensor]:
    seen = {}
    handles = [model.get_submodule(p).register_forward_hook(lambda _m, _i, out, p=p: seen.__setitem__(p, out.clone()))
               for p in paths]
    with torch.no_grad():
        seen["logits"] = model(x)
    for h in handles:
        h.remove()
    return seen


@pytest.mark.parametrize("arch, expected", [("resnet18", 20), ("mobilenet_v2", 52), ("alexnet", 0)])
def test_folded_model_computes_the_same_function(arch, expected):
    model = trained_like(arch)
    folded = copy.deepcopy(model)
    pairs = fold_batchnorm(folded)
    assert len(pairs) == expected
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()) or arch == "alexnet"
    x = torch.randn(2, 3, 96, 96)
    ref, ours = outputs(model, x, []), outputs(folded, x, [])
    torch.testing.assert_close(ours["logits"], ref["logits"], rtol=1e-4, atol=1e-4 * ref["logits"].abs().max().item())


def test_pairs_come_from_the_dataflow_not_from_names():
    pairs = dict(conv_bn_pairs(trained_like("resnet18")))
    assert pairs["conv1"] == "bn1"
    assert pairs["layer2.0.downsample.0"] == "layer2.0.downsample.1"
    assert pairs["layer4.1.conv2"] == "layer4.1.bn2"


def test_a_tapped_conv_or_bn_keeps_its_own_output():
    model = trained_like("resnet18")
    taps = ["layer1.0.conv1", "layer2.0.bn2", "layer3"]
    folded = copy.deepcopy(model)
    pairs = fold_batchnorm(folded, keep=taps)
    assert ("layer1.0.conv1", "layer1.0.bn1") not in pairs
    assert ("layer2.0.conv2", "layer2.0.bn2") not in pairs
    assert ("layer3.0.conv1", "layer3.0.bn1") in pairs  # inside a tapped block: its output is unchanged
    x = torch.randn(2, 3, 64, 64)
    ref, ours = outputs(model, x, taps), outputs(folded, x, taps)
    for tap in taps:
        torch.testing.assert_close(ours[tap], ref[tap], rtol=1e-4, atol=1e-4 * ref[tap].abs().max().item())


def test_a_module_holding_the_conv_but_not_its_bn_is_respected():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3)), nn.BatchNorm2d(4)).eval()
    model[1].running_mean.fill_(3.0)
    assert conv_bn_pairs(model) == [("0.0", "1")]
    assert fold_batchnorm(copy.deepcopy(model), keep=["0"]) == []
    assert fold_batchnorm(copy.deepcopy(model), keep=[]) == [("0.0", "1")]


class Untraceable(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

    def forward(self, x):
        if x.sum() > 0:  # data-dependent control flow: torch.fx cannot trace it
            x = -x
        return self.bn(self.conv(x))


def test_an_untraceable_model_is_left_alone_and_training_mode_is_refused():
    model = Untraceable().eval()
    assert fold_batchnorm(model) == []
    assert isinstance(model.bn, nn.BatchNorm2d)
    with pytest.raises(ValueError, match="eval mode"):
        fold_batchnorm(Untraceable().train())
