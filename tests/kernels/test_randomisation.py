"""Cascading randomisation against Quantus's model parameter randomisation test, and the two
map similarities against scipy and scikit-image."""

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from torch import nn

from featscope.kernels.map_similarity import spearman, spearman_abs, ssim, unit_range
from featscope.kernels.randomisation import cascading_randomisation, layer_groups, merge_groups
from featscope.kernels.saliency import attribute


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(),
                         nn.Linear(64, 10)).eval()


def test_spearman_equals_scipy_with_ties():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (3, 40), generator=g).float()  # many ties
    b = torch.randn(3, 40, generator=g)
    for i in range(3):
        assert spearman(a, b)[i].item() == pytest.approx(spearmanr(a[i], b[i])[0], abs=1e-12)
    assert spearman_abs(-b, b).tolist() == pytest.approx([1.0] * 3)


def test_ssim_equals_scikit_image():
    metrics = pytest.importorskip("skimage.metrics")
    g = torch.Generator().manual_seed(1)
    a = torch.rand(2, 30, 25, generator=g)
    b = (a + 0.3 * torch.rand(2, 30, 25, generator=g)).clamp(0, 1)
    ours = ssim(a, b, data_range=1.0)
    for i in range(2):
        theirs = metrics.structural_similarity(a[i].numpy().astype(np.float64), b[i].numpy().astype(np.float64),
                                               data_range=1.0)
        assert ours[i].item() == pytest.approx(theirs, abs=1e-9)
    assert ssim(a, a).tolist() == pytest.approx([1.0, 1.0])
    assert unit_range(-a).amax().item() == pytest.approx(1.0)


def test_groups_run_top_down_and_blocks_hold_their_modules():
    model = small_cnn()
    modules = layer_groups(model, "module")
    assert [name for name, _ in modules] == ["8", "4", "1", "0"]
    import torchvision

    resnet = torchvision.models.resnet18(weights=None)
    blocks = layer_groups(resnet, "block")
    assert blocks[0][0] == "fc" and blocks[1][0] == "layer4.1" and blocks[-1][0] == "conv1"
    assert sorted(p for _, paths in blocks for p in paths) == sorted(p for _, [p] in layer_groups(resnet, "module"))


def test_merged_steps_keep_every_module_in_order():
    import torchvision

    blocks = layer_groups(torchvision.models.mobilenet_v2(weights=None), "block")
    merged = merge_groups(blocks, 6)
    assert len(blocks) == 20 and len(merged) == 6
    assert [p for _, paths in merged for p in paths] == [p for _, paths in blocks for p in paths]
    assert merged[0][0] == "classifier.1 – features.17" and merge_groups(blocks, 0) == blocks  # 3, 4, 3, 3, 4, 3


def test_randomisation_leaves_the_model_and_the_random_state_alone():
    model = small_cnn()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    steps = list(cascading_randomisation(model, layer_groups(model, "module")))
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not torch.equal(steps[-1][1][0].weight, model[0].weight)


def test_cascade_correlations_equal_quantus_mprt():
    quantus = pytest.importorskip("quantus")
    model = small_cnn()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        y = model(x).argmax(1)

    def explain(model, inputs, targets, **_):
        maps = attribute(model, torch.as_tensor(inputs), torch.as_tensor(targets), "gradient")
        return maps[:, None].detach().numpy()

    original = attribute(model, x, y, "gradient")
    ours = {name: spearman_abs(original, attribute(randomised, x, y, "gradient")).numpy()
            for name, randomised in cascading_randomisation(model, layer_groups(model, "module"), seed=42)}
    metric = quantus.MPRT(layer_order="top_down", seed=42, similarity_func=quantus.similarity_func.correlation_spearman,
                          abs=True, normalise=False, disable_warnings=True)
    theirs = metric(model=model, x_batch=x.numpy(), y_batch=y.numpy(), a_batch=original[:, None].numpy(),
                    explain_func=explain, device="cpu")
    assert list(theirs) == ["original", *ours]
    for name, values in ours.items():
        np.testing.assert_allclose(values, theirs[name], atol=1e-9)
