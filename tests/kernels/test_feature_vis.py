"""Feature visualisation: the Fourier parameterisation against NumPy's FFT with Lucid's
constants, the unit objectives against direct indexing, transformation robustness, and
rendering many units in one batch gives each the image it gets alone."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from featscope.kernels.image_param import COLOUR_CORRELATION_SQRT, FourierImage
from featscope.kernels.objectives import layer_outputs
from featscope.kernels.render import feature_visualisations
from featscope.kernels.transforms import PixelModel, robustness, stretch
from featscope.kernels.unit_objectives import channels, directions, diversity, neurons


def test_fourier_image_equals_lucids_formula_in_numpy():
    image = FourierImage(2, 16, generator=torch.Generator().manual_seed(0))
    spectrum = image.spectrum.detach().numpy()
    fy = np.fft.fftfreq(16)[:, None]
    fx = np.fft.fftfreq(16)[: 16 // 2 + 1]
    scale = 1.0 / np.maximum(np.sqrt(fx * fx + fy * fy), 1.0 / 16)
    coefficients = scale[None, None] * (spectrum[..., 0] + 1j * spectrum[..., 1])
    pixels = np.fft.irfftn(coefficients, s=(16, 16), norm="ortho", axes=(2, 3)) / 4.0
    mix = COLOUR_CORRELATION_SQRT.numpy() / np.max(np.linalg.norm(COLOUR_CORRELATION_SQRT.numpy(), axis=0))
    mixed = np.einsum("bchw,dc->bdhw", pixels, mix)
    expected = 1 / (1 + np.exp(-mixed))
    np.testing.assert_allclose(image().detach().numpy(), expected, atol=1e-6)


def test_robustness_keeps_the_batch_and_repeats_with_its_seed():
    x = torch.rand(3, 3, 32, 32)
    a = robustness(x, torch.Generator().manual_seed(4))
    b = robustness(x, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and a.shape[:2] == (3, 3) and a.shape[2] >= 50  # padded by 12 a side, scaled
    assert float(a.min()) >= 0 and float(a.max()) <= 1


@pytest.mark.parametrize("source, target", [((152, 152), (224, 224)), ((152, 152), (137, 137)), ((152, 160), (168, 99)),
                                            ((1, 5), (3, 7))])
def test_stretch_is_bilinear_interpolation_with_aligned_corners_and_so_is_its_gradient(source, target):
    x = torch.rand(2, 3, *source, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 3, *target, dtype=torch.float64)
    ours = stretch(x, target)
    theirs = F.interpolate(x, size=target, mode="bilinear", align_corners=True)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad((ours * weights).sum(), x)[0],
                               torch.autograd.grad((theirs * weights).sum(), x)[0], rtol=0, atol=1e-12)


def test_unit_objectives_read_what_they_say():
    layer = nn.Identity()
    a = torch.randn(3, 5, 4, 6)
    outputs = {layer: a}
    units = torch.tensor([4, 0, 2])
    torch.testing.assert_close(channels(layer, units)(outputs), torch.stack([a[b, u].mean() for b, u in
                                                                             enumerate(units)]))
    torch.testing.assert_close(neurons(layer, units)(outputs), torch.stack([a[b, u, 2, 3] for b, u in
                                                                            enumerate(units)]))
    v = torch.randn(3, 5)
    expected = torch.stack([torch.nn.functional.cosine_similarity(a[b], v[b][:, None, None], dim=0).mean()
                            for b in range(3)])
    torch.testing.assert_close(directions(layer, v)(outputs), expected)
    both = channels(layer, units) + 2.0 * neurons(layer, units)
    torch.testing.assert_close(both(outputs), channels(layer, units)(outputs) + 2 * neurons(layer, units)(outputs))
    same = {layer: a[:1].expand(3, -1, -1, -1)}
    torch.testing.assert_close(diversity(layer)(same), torch.full((3,), -1.0))


def small_cnn():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return PixelModel(net, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def test_a_batch_of_units_renders_each_as_alone_and_raises_its_objective():
    model = small_cnn()
    layer = model.model[2]  # the conv before its ReLU: every unit has a gradient
    units = torch.tensor([3, 7, 11])
    images, trajectory = feature_visualisations(model, channels(layer, units), units.tolist(), size=24, steps=12,
                                                model_size=32)
    alone, _ = feature_visualisations(model, channels(layer, units[1:2]), [7], size=24, steps=12, model_size=32)
    torch.testing.assert_close(images[1:2], alone, atol=1e-5, rtol=1e-4)
    assert images.shape == (3, 3, 24, 24) and trajectory.shape == (12, 3)
    objective = channels(layer, units)

    def measured(x):  # the objective on the image itself, no transforms
        x = torch.nn.functional.interpolate(x, size=(32, 32), mode="bilinear", align_corners=True)
        return objective({layer: layer_outputs(model, x, [layer])[0]})

    start = FourierImage(3, 24, seeds=units.tolist())().detach()
    assert bool((measured(images) > measured(start)).all())
