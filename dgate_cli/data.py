"""Data specs -> datasets of ``uint8`` images, with a fingerprint of the files they read.

A data spec is either a path to an ImageFolder directory (``ROOT/<class>/<image>``), or
``cifar10:ROOT:train`` / ``cifar10:ROOT:test`` for torchvision's CIFAR-10 files already on disk
(``ROOT/cifar-10-batches-py``). Samples are returned in a fixed order (sorted by class, then file
name), so sample ``i`` is the same image in every run.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from .errors import DataError, DgateError, MissingFileError
from .preprocess import Preprocess

Sample = tuple[torch.Tensor, int, int]


@dataclass(frozen=True)
class DataSpec:
    """A parsed data spec.

    Attributes:
        kind: ``folder`` or ``cifar10``.
        root: the directory.
        split: for ``cifar10``, ``train`` or ``test``.
    """

    kind: str
    root: str
    split: str | None = None

    def __str__(self) -> str:
        return f"cifar10:{self.root}:{self.split}" if self.kind == "cifar10" else self.root


def parse_data_spec(spec: str | os.PathLike[str]) -> DataSpec:
    """Parse a data spec.

    Example:
        >>> parse_data_spec("cifar10:/data:test")
        DataSpec(kind='cifar10', root='/data', split='test')
        >>> parse_data_spec("images/val").kind
        'folder'
    """
    s = str(spec)
    if s.startswith("cifar10:"):
        root, _, split = s[len("cifar10:") :].rpartition(":")
        if split not in ("train", "test") or not root:
            raise DataError(f"data spec '{s}' must look like cifar10:ROOT:train or cifar10:ROOT:test")
        return DataSpec("cifar10", root, split)
    return DataSpec("folder", s)


class ImageDataset(Dataset[Sample]):
    """Labelled images decoded to ``uint8`` CHW tensors; items are ``(image, label, index)``."""

    classes: list[str]
    spec: DataSpec

    def fingerprint(self) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def labels(self) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError


class FolderDataset(ImageDataset):
    """An ImageFolder directory: one sub-directory per class, sorted class names give the labels."""

    def __init__(self, spec: DataSpec, preprocess: Preprocess):
        root = Path(spec.root)
        if not root.is_dir():
            raise MissingFileError(
                f"data directory {root} does not exist; pass an ImageFolder directory (ROOT/<class>/<image>)"
            )
        try:
            classes, class_to_idx = find_classes(str(root))
        except FileNotFoundError as exc:
            raise DataError(f"{root} has no class sub-directories; lay images out as {root}/<class>/<image>") from exc
        samples = make_dataset(str(root), class_to_idx, extensions=IMG_EXTENSIONS, allow_empty=True)
        if not samples:
            raise DataError(
                f"{root} has no images ({', '.join(IMG_EXTENSIONS[:4])}, ...) in its class folders; check the path"
            )
        self.spec = spec
        self.root = root
        self.classes = classes
        self.samples: list[tuple[str, int]] = samples
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [y for _, y in self.samples]

    def __getitem__(self, i: int) -> Sample:
        path, label = self.samples[i]
        try:
            return self.preprocess.load(path), label, i
        except (OSError, ValueError) as exc:
            raise DataError(f"cannot read image {path} ({type(exc).__name__}: {exc}); fix or remove the file") from exc

    def fingerprint(self) -> str:
        """sha256 over the sorted relative paths, labels and file sizes."""
        h = hashlib.sha256()
        for path, label in self.samples:
            rel = os.path.relpath(path, self.root)
            h.update(f"{rel}\t{label}\t{os.path.getsize(path)}\n".encode())
        return h.hexdigest()


class Cifar10Dataset(ImageDataset):
    """torchvision's CIFAR-10 python files already on disk (never downloaded)."""

    def __init__(self, spec: DataSpec, preprocess: Preprocess):
        from torchvision.datasets import CIFAR10

        try:
            self.base = CIFAR10(spec.root, train=spec.split == "train", download=False)
        except RuntimeError as exc:
            raise MissingFileError(
                f"no CIFAR-10 python files under {spec.root} (expected {spec.root}/cifar-10-batches-py); "
                "dgate never downloads data: fetch them on a machine with network access, or pass an ImageFolder path"
            ) from exc
        self.spec = spec
        self.classes = list(self.base.classes)
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.base)

    @property
    def labels(self) -> list[int]:
        return [int(t) for t in self.base.targets]

    def __getitem__(self, i: int) -> Sample:
        img, label = self.base[i]
        return self.preprocess.from_pil(img), int(label), i

    def fingerprint(self) -> str:
        folder = Path(self.spec.root) / self.base.base_folder
        files = self.base.train_list if self.spec.split == "train" else self.base.test_list
        h = hashlib.sha256()
        for name, _md5 in files:
            h.update(f"{name}\t{(folder / name).stat().st_size}\n".encode())
        return h.hexdigest()


def open_dataset(spec: str | DataSpec, preprocess: Preprocess) -> ImageDataset:
    """Open a data spec as a dataset that applies ``preprocess`` to each image.

    Example:
        >>> ds = open_dataset("../shared/data/cifar10-jpeg/val", Preprocess())  # doctest: +SKIP
        >>> len(ds), ds.classes[:2]  # doctest: +SKIP
        (5000, ['airplane', 'automobile'])
    """
    ds = spec if isinstance(spec, DataSpec) else parse_data_spec(spec)
    if ds.kind == "cifar10":
        return Cifar10Dataset(ds, preprocess)
    return FolderDataset(ds, preprocess)


def _collate(batch: Sequence[Sample]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shapes = {tuple(img.shape) for img, _, _ in batch}
    if len(shapes) > 1:
        a, b = sorted(shapes)[:2]
        raise DataError(f"images of different sizes in one batch ({a} and {b}); pass --resize N --crop N so all match")
    images = torch.stack([img for img, _, _ in batch])
    labels = torch.tensor([y for _, y, _ in batch], dtype=torch.long)
    index = torch.tensor([i for _, _, i in batch], dtype=torch.long)
    return images, labels, index


def default_workers() -> int:
    """Loader worker processes: the CPU count, at most 8."""
    return min(8, os.cpu_count() or 1)


def make_loader(
    dataset: ImageDataset,
    batch_size: int,
    workers: int | None = None,
    pin_memory: bool = False,
    start: int = 0,
    stop: int | None = None,
    indices: Sequence[int] | None = None,
) -> DataLoader:
    """A DataLoader over samples ``start:stop`` (or ``indices``) in order, yielding ``(uint8 images, labels, index)``."""
    if batch_size < 1:
        raise DataError(f"batch size must be at least 1, got {batch_size}")
    stop = len(dataset) if stop is None else stop
    if indices is not None:
        subset: Dataset[Sample] = Subset(dataset, list(indices))
    else:
        subset = dataset if (start, stop) == (0, len(dataset)) else Subset(dataset, range(start, stop))
    workers = default_workers() if workers is None else workers
    return DataLoader(
        subset,
        batch_size=batch_size,
        shuffle=False,
        num_workers=workers,
        pin_memory=pin_memory,
        collate_fn=_collate,
        prefetch_factor=4 if workers > 0 else None,
        persistent_workers=False,
    )


def spread(n: int, k: int | None) -> list[int] | None:
    """``k`` indices evenly spaced over ``range(n)`` (None: all), so a subset covers every class.

    Example:
        >>> spread(10, 3)
        [0, 4, 9]
    """
    if k is None or k >= n:
        return None
    return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)}) if k > 1 else [0]


def iterate(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Iterate a loader, turning errors raised in worker processes back into one-line dgate errors."""
    try:
        yield from loader
    except DgateError as exc:
        text = str(exc).strip()
        if "Original Traceback" in text:
            last = text.splitlines()[-1]
            last = re.sub(rf"^(?:[\w.]+\.)?{type(exc).__name__}: ", "", last)
            raise type(exc)(last) from None
        raise
