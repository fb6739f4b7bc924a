"""Data specs -> datasets of ``uint8`` images, with a fingerprint of the files they read.

A data spec is either a path to an ImageFolder directory (``ROOT/<class>/<image>``), or
``cifar10:ROOT:train`` / ``cifar10:ROOT:test`` for torchvision's CIFAR-10 files already on disk
(``ROOT/cifar-10-batches-py``). Samples are returned in a fixed order (sorted by class, then
relative path), so sample ``i`` is the same image in every run."""

from __future__ import annotations

import hashlib
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision.datasets.folder import IMG_EXTENSIONS

from ..errors import DataError, MissingFileError
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

    def listing(self) -> str:  # pragma: no cover - abstract
        """sha256 of which files the dataset holds (names, labels, sizes), without modification
        times: equal for two copies of the same files (what a cascade's members must share)."""
        raise NotImplementedError

    @property
    def labels(self) -> list[int]:  # pragma: no cover - abstract
        raise NotImplementedError


def _is_dir(entry: os.DirEntry[str]) -> bool:
    try:
        return entry.is_dir()  # follows symlinks; False for a broken one
    except OSError:
        return False


def _scandir(path: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as exc:
        raise DataError(
            f"cannot list directory {path} ({type(exc).__name__}: {exc.strerror or exc}); check that it is readable"
        ) from exc


def _identity(path: str, st: os.stat_result) -> tuple[int, int] | str:
    """What makes a file or directory the same one under any name: ``(st_dev, st_ino)``."""
    if st.st_ino == 0:  # Windows fills no inode in os.DirEntry.stat(); ask the file itself
        st = os.stat(path)
    return (st.st_dev, st.st_ino) if st.st_ino else os.path.realpath(path)


@dataclass
class _Walk:
    """What walking one ImageFolder found."""

    samples: list[tuple[str, int]]
    stats: list[tuple[int, int]]  # (st_size, st_mtime_ns) per sample
    broken_links: list[str]


def _walk_folder(root: Path, classes: list[str]) -> _Walk:
    """List the images under each class folder: symlinks followed, each directory walked once and each
    file counted once per class, broken symlinks skipped; sorted by class, then relative path."""
    found = _Walk([], [], [])
    top = str(root)
    top_id = _identity(top, os.stat(top))
    for label, name in enumerate(classes):
        class_dir = os.path.join(top, name)
        # ROOT and the class folder are on the path: a link to either (``ln -s .. ROOT/cat/up``) is a cycle
        seen_dirs = {top_id, _identity(class_dir, os.stat(class_dir))}
        seen_files: set[tuple[int, int] | str] = set()
        stack = [iter(_scandir(class_dir))]  # depth first, entries in name order: sorted by relative path
        while stack:
            entry = next(stack[-1], None)
            if entry is None:
                stack.pop()
                continue
            try:
                st = entry.stat()  # follows symlinks
            except OSError:  # a broken symlink, a link loop, or a file removed meanwhile
                if entry.is_symlink():
                    found.broken_links.append(os.path.relpath(entry.path, top))
                continue
            if stat.S_ISDIR(st.st_mode):
                key = _identity(entry.path, st)
                if key not in seen_dirs:
                    seen_dirs.add(key)
                    stack.append(iter(_scandir(entry.path)))
            elif stat.S_ISREG(st.st_mode) and entry.name.lower().endswith(IMG_EXTENSIONS):
                key = _identity(entry.path, st)
                if key not in seen_files:
                    seen_files.add(key)
                    found.samples.append((entry.path, label))
                    found.stats.append((st.st_size, st.st_mtime_ns))
    return found


class FolderDataset(ImageDataset):
    """An ImageFolder directory: one sub-directory per class, sorted class names give the labels.

    Class folders are the immediate sub-directories of ROOT (hidden ones included, as torchvision's
    ``find_classes``); images are the files with one of torchvision's ``IMG_EXTENSIONS`` (any case)
    anywhere below them. Symlinks to files and directories are followed, but a directory is walked
    once per class (so a link to ``..`` adds nothing) and a file reached under several names counts
    once per class.

    Attributes:
        classes: the class names, sorted.
        samples: ``(path, label)`` per image, sorted by class, then relative path.
        empty_classes: the classes that have no images (they keep their label).
        broken_links: paths (relative to ROOT) of symlinks that lead nowhere; they are skipped.
    """

    def __init__(self, spec: DataSpec, preprocess: Preprocess):
        root = Path(spec.root)
        if not root.is_dir():
            if root.exists():
                raise DataError(
                    f"data path {root} is a file, not a directory; pass an ImageFolder directory "
                    "(ROOT/<class>/<image>) or cifar10:ROOT:train|test"
                )
            raise MissingFileError(
                f"data directory {root} does not exist; pass an ImageFolder directory (ROOT/<class>/<image>)"
            )
        classes = [e.name for e in _scandir(str(root)) if _is_dir(e)]
        if not classes:
            raise DataError(f"{root} has no class sub-directories; lay images out as {root}/<class>/<image>")
        found = _walk_folder(root, classes)
        if not found.samples:
            raise DataError(
                f"{root} has no images ({', '.join(IMG_EXTENSIONS[:4])}, ...) in its class folders; check the path"
            )
        self.spec = spec
        self.root = root
        self.classes = classes
        self.samples: list[tuple[str, int]] = found.samples
        self._stats = found.stats
        present = {y for _, y in found.samples}
        self.empty_classes: list[str] = [c for i, c in enumerate(classes) if i not in present]
        self.broken_links: list[str] = found.broken_links
        self.preprocess = preprocess

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> list[int]:
        return [y for _, y in self.samples]

    def __getitem__(self, i: int) -> Sample:
        path, label = self.samples[i]
        return self.preprocess.load(path), label, i

    def fingerprint(self) -> str:
        """sha256 over the relative paths, labels, sizes and modification times (``st_mtime_ns``).

        The sizes and times are those seen when the dataset was opened (no file is read or stat-ed
        again). An image whose content changes while its size and modification time stay the same
        (a tool that restores timestamps) is not noticed: ``touch`` it, or rebuild the cache with
        ``dgate extract RUN_DIR --overwrite``.
        """
        h = hashlib.sha256()
        for (path, label), (size, mtime_ns) in zip(self.samples, self._stats, strict=True):
            rel = os.path.relpath(path, self.root)
            h.update(f"{rel}\t{label}\t{size}\t{mtime_ns}\n".encode())
        return h.hexdigest()

    def listing(self) -> str:
        h = hashlib.sha256()
        for (path, label), (size, _) in zip(self.samples, self._stats, strict=True):
            h.update(f"{os.path.relpath(path, self.root)}\t{label}\t{size}\n".encode())
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
        """sha256 over the batch files' names, sizes and modification times (``st_mtime_ns``)."""
        folder = Path(self.spec.root) / self.base.base_folder
        files = self.base.train_list if self.spec.split == "train" else self.base.test_list
        h = hashlib.sha256()
        for name, _md5 in files:
            st = (folder / name).stat()
            h.update(f"{name}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
        return h.hexdigest()

    def listing(self) -> str:
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
