"""Fixtures shared by the kernel tests."""

import pytest
import torch
import torchvision

from featscope.kernels.transforms import PixelModel

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def pixel_resnet():
    """A seeded random-weights ResNet-18 over pixels in [0,1]."""
    torch.manual_seed(0)
    return PixelModel(torchvision.models.resnet18(weights=None).eval(), IMAGENET_MEAN, IMAGENET_STD)
