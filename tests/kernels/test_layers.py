import pytest
import torch
import torchvision

from featscope.kernels.errors import FeatscopeError
from featscope.kernels.layers import LayerTap, layer_aliases, resolve_layer


def skeleton(arch):
    with torch.device("meta"):
        return torchvision.models.get_model(arch, weights=None)


@pytest.mark.parametrize(
    "arch, alias, path",
    [
        ("alexnet", "conv1", "features.1"),
        ("alexnet", "conv5", "features.11"),
        ("alexnet", "fc6", "classifier.2"),
        ("alexnet", "fc7", "classifier.5"),
        ("vgg16", "conv1_1", "features.1"),
        ("vgg16", "conv3_3", "features.15"),
        ("vgg16", "conv5_3", "features.29"),
        ("vgg16", "fc7", "classifier.4"),
        ("resnet18", "layer4", "layer4"),
        ("resnet50", "pool", "avgpool"),
        ("mobilenet_v2", "block0", "features.0"),
        ("mobilenet_v2", "block18", "features.18"),
        ("mobilenet_v2", "pool", "classifier.0"),
    ],
)
def test_aliases_name_the_modules_of_the_papers(arch, alias, path):
    assert resolve_layer(arch, skeleton(arch), alias).module_path == path


def test_conv_aliases_point_at_relus_so_outputs_are_post_activation():
    model = skeleton("vgg16")
    modules = dict(model.named_modules())
    for name, (path, kind) in layer_aliases("vgg16", model).items():
        if kind == "conv":
            assert isinstance(modules[path], torch.nn.ReLU), name
    assert len([n for n in layer_aliases("vgg16", model) if n.startswith("conv")]) == 13


def test_raw_module_paths_resolve_and_unknown_names_list_the_aliases():
    model = skeleton("alexnet")
    assert resolve_layer("alexnet", model, "classifier.4").module_path == "classifier.4"
    with pytest.raises(FeatscopeError, match=r"unknown layer 'fc9' for alexnet: use one of conv1, .*fc7"):
        resolve_layer("alexnet", model, "fc9")


def test_a_conv_layer_with_a_grid_suffix_is_a_pooled_vector_of_that_module():
    model = skeleton("mobilenet_v2")
    spec = resolve_layer("mobilenet_v2", model, "block13@2x2")
    assert (spec.module_path, spec.kind, spec.grid) == ("features.13", "vector", (2, 2))
    assert resolve_layer("mobilenet_v2", model, "features.7@3x1").grid == (3, 1)
    with pytest.raises(FeatscopeError, match=r"only conv layers have a spatial grid to pool, 'pool' is a vector"):
        resolve_layer("mobilenet_v2", model, "pool@2x2")
    for bad in ("block13@", "block13@0x2", "block13@2"):
        with pytest.raises(FeatscopeError, match=r"a pooled layer is written <conv layer>@<rows>x<cols>"):
            resolve_layer("mobilenet_v2", model, bad)
    with pytest.raises(FeatscopeError, match=r"unknown layer 'block99'"):
        resolve_layer("mobilenet_v2", model, "block99@2x2")


def test_alexnet_fc7_is_the_4096d_output_after_relu():
    model = torchvision.models.alexnet().eval()
    spec = resolve_layer("alexnet", model, "fc7")
    seen = {}
    with LayerTap(model, [spec], lambda s, out: seen.setdefault(s.name, out.clone())):
        model(torch.randn(2, 3, 224, 224))
    assert seen["fc7"].shape == (2, 4096) and seen["fc7"].min() >= 0


def test_layer_tap_removes_its_hooks_even_when_the_forward_fails():
    model = torchvision.models.resnet18().eval()
    spec = resolve_layer("resnet18", model, "layer1")

    def explode(_spec, _out):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with LayerTap(model, [spec], explode):
            model(torch.randn(1, 3, 64, 64))
    assert not model.layer1._forward_hooks
    model(torch.randn(1, 3, 64, 64))  # still usable
