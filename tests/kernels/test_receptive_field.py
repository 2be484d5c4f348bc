"""Receptive-field arithmetic against published sizes and against gradients."""

import pytest
import torch
import torchvision

from featscope.kernels.architectures import profile_for
from featscope.kernels.layers import resolve_layer
from featscope.kernels.receptive_field import receptive_field


def skeleton(arch):
    with torch.device("meta"):
        return torchvision.models.get_model(arch, weights=None)


@pytest.mark.parametrize(
    "arch, layer, size, jump",
    [  # Araujo et al., Distill 2019, and the torchvision architectures' arithmetic
        ("alexnet", "conv1", 11, 4), ("alexnet", "conv5", 163, 16),
        ("vgg16", "conv1_1", 3, 1), ("vgg16", "conv5_3", 196, 16),
        ("resnet18", "layer4", 435, 32), ("resnet50", "layer4", 427, 32),
        ("mobilenet_v2", "block18", 491, 32),
    ],
)
def test_sizes_match_published_values(arch, layer, size, jump):
    model = skeleton(arch)
    rf = receptive_field(model, resolve_layer(arch, model, layer).module_path)
    assert rf.size == (size, size) and rf.jump == (jump, jump)


class _Stop(Exception):
    pass


def gradient_support(model, module_path, side=224):
    """Bounding box (x0, y0, x1, y1) of the input pixels with a non-zero gradient for the most
    active unit at the centre cell (a unit cut off by its ReLU has no gradient), and that cell."""
    model.eval()
    x = torch.randn(1, 3, side, side, dtype=torch.float64, requires_grad=True)
    captured = {}

    def hook(_m, _i, out):
        captured["out"] = out
        raise _Stop

    handle = dict(model.named_modules())[module_path].register_forward_hook(hook)
    try:
        model(x)
    except _Stop:
        pass
    finally:
        handle.remove()
    out = captured["out"]
    fy, fx = out.shape[2] // 2, out.shape[3] // 2
    channel = int(out[0, :, fy, fx].argmax())
    out[0, channel, fy, fx].backward()
    ys, xs = (x.grad[0].abs().sum(0) > 0).nonzero(as_tuple=True)
    return (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max())), (fy, fx)


@pytest.mark.slow
@pytest.mark.parametrize(
    "arch, layers",
    [
        ("alexnet", ["conv1", "conv2", "conv5"]),
        ("vgg16", ["conv1_2", "conv2_2", "conv3_3", "conv4_1"]),
        ("resnet18", ["stem", "layer1", "layer2", "layer3.0.conv1", "layer3"]),
        ("mobilenet_v2", ["block1", "block3", "block6", "block13"]),
        # Families added by a profile alone: inception branches concatenate; ConvNeXt's 7x7
        # depthwise convs are followed by per-position LayerNorm and linear layers.
        ("googlenet", ["conv1", "conv3", "inception3a", "inception3b"]),
        ("convnext_tiny", ["stem", "stage1", "features.1.0", "stage2"]),
    ],
)
def test_computed_boxes_contain_every_pixel_with_gradient_and_are_no_larger_than_the_field(arch, layers):
    torch.manual_seed(0)
    model = torchvision.models.get_model(arch, weights=None, **profile_for(arch).build_options).double()
    for layer in layers:
        path = resolve_layer(arch, model, layer).module_path
        support, (fy, fx) = gradient_support(model, path)
        rf = receptive_field(model, path)
        x0, y0, x1, y1 = rf.box(torch.tensor([fy]), torch.tensor([fx]), 224, 224)[0].tolist()
        assert x0 <= support[0] and y0 <= support[1] and support[2] <= x1 and support[3] <= y1, (layer, support)
        assert x1 - x0 + 1 <= rf.size[1] and y1 - y0 + 1 <= rf.size[0]
        if rf.size[0] <= 101:  # a field inside the image is filled by the gradient, edge to edge
            assert (x0, y0, x1, y1) == support, (layer, support)


def test_boxes_are_clipped_to_the_input_and_global_fields_cover_it():
    model = skeleton("alexnet")
    rf = receptive_field(model, "features.11")
    box = rf.box(torch.tensor([0, 12]), torch.tensor([0, 12]), 224, 224)
    assert box[0].tolist() == [0, 0, 96, 96] and box[1].tolist() == [126, 126, 223, 223]
    fc = receptive_field(model, "classifier.5")
    assert fc.is_global and fc.box(torch.tensor([0]), torch.tensor([0]), 10, 20)[0].tolist() == [0, 0, 19, 9]
