"""Batching a dataset (:mod:`.datasets`) in its fixed sample order: :func:`make_loader` yields
``(uint8 images, labels, index)``, :func:`spread` picks an even subset, and :func:`iterate` turns
errors from worker processes back into one-line dgate errors."""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import DataError, DgateError
from .datasets import ImageDataset, Sample

SIZE_HINT = "use images of one size, or extract with `dgate extract --resize N --crop N`"


def _collate(batch: Sequence[Sample], hint: str = SIZE_HINT) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    shapes = {tuple(img.shape) for img, _, _ in batch}
    if len(shapes) > 1:
        a, b = (f"{h}x{w}" for _, h, w in sorted(shapes)[:2])
        raise DataError(
            f"images of different sizes in one batch ({a} and {b} pixels) and the preprocessing has no crop "
            f"to make them one size; {hint}"
        )
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
    size_hint: str | None = None,
) -> DataLoader:
    """A DataLoader over samples ``start:stop`` (or ``indices``) in order, yielding ``(uint8 images, labels, index)``.

    ``size_hint`` replaces the advice (default :data:`SIZE_HINT`) of the error raised when one batch
    holds images of different sizes, so a command can name its own options.
    """
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
        collate_fn=_collate if size_hint is None else functools.partial(_collate, hint=size_hint),
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
