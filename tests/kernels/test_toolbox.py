"""The visualisation toolbox's kernels: each optimisation moves its objective the right way,
the TV prior equals its formula, and the grids have the documented shape and range."""

import math

import pytest
import torch
import torch.nn.functional as F

from featscope.kernels.adversarial import fgsm, pgd
from featscope.kernels.filters import activation_grid, filter_grid
from featscope.kernels.objectives import layer_energy, layer_outputs, total_variation
from featscope.kernels.render import class_models, deepdream, invert, layer_features


@pytest.fixture(scope="module")
def model(pixel_resnet):
    return pixel_resnet


@pytest.fixture(scope="module")
def photos():
    """Two real photos (scikit-image) at 64x64 in [0,1], on the 8-bit grid."""
    from skimage import data

    pictures = [torch.from_numpy(img).permute(2, 0, 1)[None].float() for img in (data.chelsea(), data.coffee())]
    small = [F.interpolate(p, size=(64, 64), mode="area") for p in pictures]
    return torch.cat(small).round() / 255


@pytest.mark.parametrize("beta", [2.0, 1.0, 1.5])
def test_total_variation_equals_the_direct_sum(beta):
    x = torch.rand(2, 3, 7, 9, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    expected = torch.zeros(2, dtype=torch.float64)
    for b in range(2):
        for c in range(3):
            for i in range(6):
                for j in range(8):
                    d = (x[b, c, i, j + 1] - x[b, c, i, j]) ** 2 + (x[b, c, i + 1, j] - x[b, c, i, j]) ** 2
                    expected[b] += d ** (beta / 2)
    torch.testing.assert_close(total_variation(x, beta, eps=0.0), expected)


def test_first_layer_filters_are_rgb_tiles_scaled_per_filter():
    w = torch.randn(64, 3, 11, 11)
    grid = filter_grid(w)
    assert grid.shape == (3, 8 * 12 + 1, 8 * 12 + 1)
    tile = grid[:, 1:12, 13:24]  # filter 1
    assert tile.min() == 0 and tile.max() == 1
    torch.testing.assert_close(tile, (w[1] - w[1].min()) / (w[1].max() - w[1].min()))
    assert torch.isnan(grid[:, 0]).all() and torch.isnan(grid[:, :, 12]).all()  # gaps


def test_deeper_filters_are_grayscale_one_row_per_filter():
    w = torch.randn(20, 16, 7, 7)
    grid = filter_grid(w, zoom=2)
    assert grid.shape == (1, 20 * 15 + 1, 16 * 15 + 1)
    values = grid[~torch.isnan(grid)]
    assert values.min() >= 0 and values.max() <= 1
    row3_channel5 = grid[0, 1 + 3 * 15:1 + 3 * 15 + 14:2, 1 + 5 * 15:1 + 5 * 15 + 14:2]
    torch.testing.assert_close(row3_channel5, (w[3, 5] / w[3].abs().max() + 1) / 2)


def test_activation_grid_scales_per_layer_with_zero_black():
    a = torch.relu(torch.randn(256, 13, 13))
    grid = activation_grid(a)
    assert grid.shape == (1, 16 * 14 + 1, 16 * 14 + 1)
    values = grid[~torch.isnan(grid)]
    assert values.min() == 0 and values.max() == 1
    torch.testing.assert_close(grid[0, 1:14, 15:28], a[1] / a.max())


def test_class_models_raise_their_class_scores_together(model):
    classes = torch.tensor([3, 500])
    # priors milder than the defaults (tuned for ImageNet weights): this random network's logits are ~0.01
    images, scores = class_models(model, classes, size=64, steps=40, lr=0.05, octaves=2, noise=0.05, l2=1e-4,
                                  clip_percentile=10, jitter_pixels=8, blur_sigma=0.5)
    assert images.shape == (2, 3, 64, 64) and images.min() >= 0 and images.max() <= 1
    with torch.no_grad():
        logits = model(images)
    final = logits.gather(1, classes.view(-1, 1))[:, 0]
    assert (final > scores[0] + 0.15).all(), (scores[0], final)
    # each image is a model of its own class: it scores higher on it than the other image does
    assert logits[0, 3] > logits[1, 3] and logits[1, 500] > logits[0, 500]


def test_deepdream_raises_the_energy_of_each_images_layer(model, photos):
    layers = [model.model.layer1, model.model.layer3]
    dreamed, energies = deepdream(model, photos, layers, octaves=2, steps=8, lr=0.02, jitter_pixels=4)
    with torch.no_grad():
        before = [layer_energy(o[i:i + 1])[0] for i, o in enumerate(layer_outputs(model, photos, layers))]
        after = [layer_energy(o[i:i + 1])[0] for i, o in enumerate(layer_outputs(model, dreamed, layers))]
    for b, a in zip(before, after):
        assert a > 1.5 * b
    assert energies.shape == (16, 2)


def test_feature_inversion_lowers_the_feature_error_tenfold(model, photos):
    layers = [model.model.layer1, model.model.layer2]
    reference = layer_features(model, photos, layers)
    images, errors = invert(model, reference, layers, (64, 64), steps=80, lr=0.05, tv=0.05)
    assert (errors[-1] < errors[0] / 10).all(), errors[[0, -1]]
    assert images.shape == photos.shape and images.min() >= 0 and images.max() <= 1


def test_targeted_pgd_flips_the_label_within_the_budget_on_the_8bit_grid(model, photos):
    target = torch.tensor([7, 7])
    adv, probability = pgd(model, photos, epsilon=16, target=target, steps=30, step=2)
    assert (adv - photos).abs().max() <= 16 / 255 + 1e-6
    assert torch.equal(adv * 255, (adv * 255).round())
    with torch.no_grad():
        assert model(adv).argmax(1).tolist() == [7, 7]
        assert model(photos).argmax(1).ne(7).all()
    assert (probability[-1] > probability[0]).all()


def test_fgsm_takes_one_full_step_and_raises_the_loss(model, photos):
    with torch.no_grad():
        labels = model(photos).argmax(1)
    adv = fgsm(model, photos, labels, epsilon=4)
    changed = (adv - photos).abs() * 255
    inside = (photos > 4 / 255) & (photos < 1 - 4 / 255)
    assert torch.allclose(changed[inside], torch.full_like(changed[inside], 4.0), atol=1e-3)
    with torch.no_grad():
        assert F.cross_entropy(model(adv), labels) > F.cross_entropy(model(photos), labels)
    assert math.isclose(float(changed.max()), 4.0, abs_tol=1e-3)
