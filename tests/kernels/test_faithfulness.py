"""Deletion and insertion curves against Quantus's pixel flipping, and a map whose right
answer is known (the model's score depends on one region) against the random baseline."""

import numpy as np
import pytest
import torch
from torch import nn

from featscope.kernels import baselines
from featscope.kernels.faithfulness import (
    area_under_curve,
    centre_map,
    cutoffs,
    perturbation_curves,
    random_map,
    ranks,
)
from featscope.kernels.saliency import attribute

SIDE, STEPS = 24, 12  # 576 pixels, 48 per step (Quantus wants steps that divide H*W three times over)


def small_cnn(seed: int = 0, grid: int = 2) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Conv2d(8, 16, 3, padding=1),
                         nn.ReLU(), nn.AdaptiveAvgPool2d(grid), nn.Flatten(), nn.Linear(16 * grid * grid, 10)).eval()


class RegionModel(nn.Module):
    """Class 0's logit is 5x the mean of the top-left 8x8 square (all channels); class 1's its
    negative. The perfect map for class 0 is that square."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x[:, :, :8, :8].mean(dim=(1, 2, 3)) * 5
        return torch.stack([s, -s], dim=1)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(3))


def test_ranks_break_ties_by_pixel_order_and_cutoffs_end_at_every_pixel():
    maps = torch.tensor([[[0.5, 1.0], [0.5, 0.0]]])
    assert ranks(maps).tolist() == [[1, 0, 2, 3]]
    assert cutoffs(10, 4).tolist() == [0, 3, 5, 8, 10]  # round(k * 10 / 4)


@pytest.mark.parametrize("runner", ["pytorch", "onnxruntime"])
def test_deletion_curve_equals_quantus_pixel_flipping(images, monkeypatch, runner):
    """Quantus runs the PyTorch model; featscope runs it too, or (as `saliency evaluate` does in
    float32 on a CPU) its ONNX Runtime export."""
    from featscope.pipelines.core.onnx_forward import OnnxForward, fast_forward

    quantus = pytest.importorskip("quantus")
    model = small_cnn() if runner == "pytorch" else small_cnn(grid=1)  # a 2x2 pool grid does not export
    with torch.no_grad():
        target = model(images).argmax(1)
    maps = attribute(model, images, target, "gradient")
    flat = maps.flatten(1)
    assert all(len(torch.unique(row)) == row.numel() for row in flat)  # Quantus sorts unstably: no ties
    net = model if runner == "pytorch" else fast_forward(model, images[:1])
    assert isinstance(net, OnnxForward) == (runner == "onnxruntime")
    ours = perturbation_curves(net, images, maps, target, mode="deletion", steps=STEPS, replacement=0.0,
                               score="probability", batch=7)
    colour = maps[:, None].expand_as(images).numpy()  # one value per pixel, on each channel
    metric = quantus.PixelFlipping(features_in_step=3 * SIDE * SIDE // STEPS, perturb_baseline=0.0,
                                   normalise=False, abs=False, disable_warnings=True)
    theirs = np.array(metric(model=model, x_batch=images.numpy(), y_batch=target.numpy(),
                             a_batch=colour, softmax=True, device="cpu"))
    assert theirs.shape == (3, STEPS)
    np.testing.assert_allclose(ours[:, 1:].numpy(), theirs, atol=1e-5)
    # Quantus's AUC: the trapezoid over its STEPS points, spaced 1 apart, by np.trapz (NumPy 2.4
    # removed it; np.trapezoid is the same function renamed)
    monkeypatch.setattr(np, "trapz", np.trapezoid, raising=False)
    auc = quantus.PixelFlipping(features_in_step=3 * SIDE * SIDE // STEPS, perturb_baseline=0.0, normalise=False,
                                abs=False, return_auc_per_sample=True, disable_warnings=True)
    theirs_auc = auc(model=model, x_batch=images.numpy(), y_batch=target.numpy(), a_batch=colour,
                     softmax=True, device="cpu")
    np.testing.assert_allclose(torch.trapezoid(ours[:, 1:], dx=1.0, dim=1).numpy(), theirs_auc, rtol=1e-5)
    # and featscope's own AUC is the same curve's area on the fraction axis, from the unperturbed point
    expected = np.trapezoid(ours.numpy(), dx=1 / STEPS, axis=1)
    np.testing.assert_allclose(area_under_curve(ours).numpy(), expected, rtol=1e-6)


def test_curves_do_not_depend_on_the_batch_size(images):
    model = small_cnn()
    target = torch.tensor([1, 2, 3])
    maps = torch.rand(3, SIDE, SIDE, generator=torch.Generator().manual_seed(0))
    for mode in ("deletion", "insertion"):
        one = perturbation_curves(model, images, maps, target, mode=mode, steps=8, replacement="blur", batch=1)
        many = perturbation_curves(model, images, maps, target, mode=mode, steps=8, replacement="blur", batch=64)
        torch.testing.assert_close(one, many, atol=1e-6, rtol=1e-5)


def test_endpoints_are_the_image_and_the_reference(images):
    model = small_cnn()
    target = torch.tensor([0, 1, 2])
    maps = torch.rand(3, SIDE, SIDE)
    deletion = perturbation_curves(model, images, maps, target, mode="deletion", steps=4, replacement="mean",
                                   score="logit")
    insertion = perturbation_curves(model, images, maps, target, mode="insertion", steps=4, replacement="mean",
                                    score="logit")
    with torch.no_grad():
        full = model(images)[torch.arange(3), target]
        empty = model(images.mean(dim=(2, 3), keepdim=True).expand_as(images))[torch.arange(3), target]
    torch.testing.assert_close(deletion[:, 0], full)
    torch.testing.assert_close(deletion[:, -1], empty)
    torch.testing.assert_close(insertion[:, 0], empty)
    torch.testing.assert_close(insertion[:, -1], full)


def test_a_perfect_map_beats_random_and_an_inverted_map_loses_to_it():
    images = torch.rand(4, 3, SIDE, SIDE, generator=torch.Generator().manual_seed(5)) + 0.5  # class 0 evidence > 0
    target = torch.zeros(4, dtype=torch.long)
    perfect = torch.zeros(4, SIDE, SIDE)
    perfect[:, :8, :8] = 1 + torch.rand(4, 8, 8)
    inverted = -perfect
    chance = torch.stack([random_map((SIDE, SIDE), seed) for seed in range(4)])
    model = RegionModel()

    def auc(maps, mode):
        curves = perturbation_curves(model, images, maps, target, mode=mode, steps=STEPS, replacement="zeros")
        return area_under_curve(curves).mean().item()

    assert auc(perfect, "deletion") < auc(chance, "deletion") < auc(inverted, "deletion")
    assert auc(perfect, "insertion") > auc(chance, "insertion") > auc(inverted, "insertion")


def test_baseline_maps():
    assert torch.equal(random_map((5, 7), 1), random_map((5, 7), 1))
    assert not torch.equal(random_map((5, 7), 1), random_map((5, 7), 2))
    centre = centre_map((9, 9))
    assert centre.argmax().item() == 40 and torch.allclose(centre, centre.flip(0)) and torch.allclose(centre, centre.T)


def test_an_images_maps_share_the_unperturbed_and_fully_perturbed_passes(images):
    """Several maps of one image (as `saliency evaluate` sends them) and a constant reference:
    the first and last steps are the same input for every map and run once, and every curve
    equals the curve of its map computed alone."""
    model = small_cnn()
    passes = []
    model.register_forward_hook(lambda module, args, out: passes.append(args[0].shape[0]))
    maps = torch.rand(4, SIDE, SIDE, generator=torch.Generator().manual_seed(5))
    target = torch.tensor([1, 2, 2, 5])
    one_image = images[:1].expand(4, -1, -1, -1)
    for mode in ("deletion", "insertion"):
        passes.clear()
        together = perturbation_curves(model, one_image, maps, target, mode=mode, steps=6, replacement="zeros")
        assert sum(passes) == 4 * 5 + 2  # 7 steps each, the two shared ones once
        for b in range(4):
            alone = perturbation_curves(model, images[:1], maps[b:b + 1], target[b:b + 1], mode=mode, steps=6,
                                        replacement="zeros")
            torch.testing.assert_close(together[b:b + 1], alone, atol=1e-6, rtol=1e-5)
    passes.clear()  # different images, one reference (zeros): only the fully perturbed step is shared
    perturbation_curves(model, images, maps[:3], target[:3], mode="deletion", steps=6, replacement="zeros")
    assert sum(passes) == 3 * 6 + 1
    passes.clear()  # a reference of each image's own (its blur): nothing is shared
    perturbation_curves(model, images, maps[:3], target[:3], mode="deletion", steps=6, replacement="blur")
    assert sum(passes) == 3 * 7


def test_the_reference_of_one_image_expanded_is_computed_once(images):
    """`saliency evaluate` sends an image once per map, as one expanded tensor: its blur (14 ms
    an image here) is computed for the image, not for every map, and equals the reference of
    the copies."""
    one_image = images[:1].expand(4, -1, -1, -1)
    for kind in ("zeros", "mean", "blur", 0.5):
        expanded, copies = baselines.reference(one_image, kind), baselines.reference(one_image.contiguous(), kind)
        assert expanded.stride(0) == 0 and torch.equal(expanded, copies), kind
