"""Data specs -> datasets of uint8 images, the loader, and preprocessing."""

from __future__ import annotations

from .datasets import (
    Cifar10Dataset,
    DataSpec,
    FolderDataset,
    ImageDataset,
    open_dataset,
    parse_data_spec,
)
from .loader import (
    SIZE_HINT,
    default_workers,
    iterate,
    make_loader,
    spread,
)
from .preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    Preprocess,
    from_torchvision_weights,
)

__all__ = [
    "Cifar10Dataset",
    "DataSpec",
    "FolderDataset",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "ImageDataset",
    "Preprocess",
    "SIZE_HINT",
    "default_workers",
    "from_torchvision_weights",
    "iterate",
    "make_loader",
    "open_dataset",
    "parse_data_spec",
    "spread",
]
