"""The data layer: walking ImageFolders (symlinks, cycles, duplicates), fingerprints, empty classes,
and one-line errors for bad paths, mixed sizes and undecodable images."""

from __future__ import annotations

import contextlib
import os
import pickle
import re
import signal
import struct
import zlib
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import write_image_folder
from torchvision.datasets.folder import IMG_EXTENSIONS, find_classes, make_dataset

from dgate_cli.data.datasets import Cifar10Dataset, DataSpec, FolderDataset, open_dataset
from dgate_cli.data.loader import _collate, iterate, make_loader
from dgate_cli.data.preprocess import Preprocess
from dgate_cli.errors import DataError, MissingFileError

needs_symlinks = pytest.mark.skipif(not hasattr(os, "symlink") or os.name == "nt", reason="needs POSIX symlinks")


class DeadlineExceeded(Exception):
    """Not an OSError (TimeoutError is one), so ``os.walk`` cannot swallow it."""


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging) if the block runs longer than ``seconds``."""

    def _timeout(signum, frame):
        raise DeadlineExceeded(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, _timeout)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def _open(root: Path, pre: Preprocess | None = None) -> FolderDataset:
    ds = open_dataset(str(root), pre or Preprocess())
    assert isinstance(ds, FolderDataset)
    return ds


def _rel(ds: FolderDataset) -> list[tuple[str, int]]:
    return [(os.path.relpath(p, ds.root), y) for p, y in ds.samples]


@pytest.fixture
def pets(tmp_path: Path) -> Path:
    """cat/ and dog/ with 3 images each."""
    return write_image_folder(tmp_path / "pets", ["cat", "dog"], 3)


# == the walk ===========================================================================================


def test_plain_folder_matches_torchvision(pets: Path):
    # a nested sub-folder, an upper-case extension and a non-image file: same list as torchvision's
    (pets / "cat" / "sub").mkdir()
    (pets / "cat" / "sub" / "9.PNG").write_bytes((pets / "cat" / "0001.png").read_bytes())
    (pets / "dog" / "notes.txt").write_text("not an image")
    (pets / ".hidden").mkdir()
    (pets / ".hidden" / "h.jpg").write_bytes(b"x")
    ds = _open(pets)
    classes, class_to_idx = find_classes(str(pets))
    assert ds.classes == classes == [".hidden", "cat", "dog"]
    assert ds.samples == make_dataset(str(pets), class_to_idx, extensions=IMG_EXTENSIONS)
    assert len(ds) == 8 and ds.empty_classes == [] and ds.broken_links == []


@needs_symlinks
def test_link_to_parent_in_a_class_folder_gives_exactly_the_real_files(pets: Path):
    before = _rel(_open(pets))
    os.symlink("..", pets / "cat" / "up")
    with deadline(20):
        ds = _open(pets)
    assert _rel(ds) == before
    assert len(ds) == 6 and ds.labels == [0, 0, 0, 1, 1, 1]


@needs_symlinks
def test_link_to_root_does_not_pull_other_classes_in(pets: Path):
    os.symlink("../..", pets / "cat" / "root")
    with deadline(20):
        ds = _open(pets)
    assert ds.labels == [0, 0, 0, 1, 1, 1]


@needs_symlinks
def test_two_cyclic_links_terminate(pets: Path):
    os.symlink("..", pets / "cat" / "up1")
    os.symlink("..", pets / "cat" / "up2")
    (pets / "dog" / "x").mkdir()
    (pets / "dog" / "y").mkdir()
    os.symlink("../y", pets / "dog" / "x" / "to_y")
    os.symlink("../x", pets / "dog" / "y" / "to_x")
    with deadline(20):
        ds = _open(pets)
    assert len(ds) == 6 and ds.labels == [0, 0, 0, 1, 1, 1]


@needs_symlinks
def test_file_symlink_counts_once(pets: Path, tmp_path: Path):
    outside = tmp_path / "outside.png"
    outside.write_bytes((pets / "dog" / "0000.png").read_bytes())
    os.symlink(outside, pets / "cat" / "linked.png")
    ds = _open(pets)
    assert len(ds) == 7
    names = ("0000.png", "0001.png", "0002.png", "linked.png")
    assert _rel(ds)[:4] == [(os.path.join("cat", n), 0) for n in names]
    img, label, _ = ds[3]
    assert label == 0 and torch.equal(img, Preprocess().load(str(outside)))


@needs_symlinks
def test_same_file_linked_twice_in_one_class_counts_once(pets: Path, tmp_path: Path):
    outside = tmp_path / "outside.png"
    outside.write_bytes((pets / "dog" / "0000.png").read_bytes())
    os.symlink(outside, pets / "cat" / "a.png")
    os.symlink(outside, pets / "cat" / "b.png")
    os.symlink("0000.png", pets / "cat" / "z-again.png")  # a second name for a file already counted
    os.link(pets / "cat" / "0001.png", pets / "cat" / "hardlink.png")
    ds = _open(pets)
    assert [r for r, y in _rel(ds) if y == 0] == [
        os.path.join("cat", n) for n in ("0000.png", "0001.png", "0002.png", "a.png")
    ]
    assert len(ds) == 7


@needs_symlinks
def test_directory_symlink_is_followed_in_order(pets: Path, tmp_path: Path):
    extra = write_image_folder(tmp_path / "extra", ["more"], 2) / "more"
    os.symlink(extra, pets / "cat" / "b-more")
    os.symlink(extra, pets / "cat" / "c-again")  # the same directory again adds nothing
    ds = _open(pets)
    names = ("0000.png", "0001.png", "0002.png", os.path.join("b-more", "0000.png"), os.path.join("b-more", "0001.png"))
    assert [r for r, y in _rel(ds) if y == 0] == [os.path.join("cat", n) for n in names]


@needs_symlinks
def test_the_same_file_in_two_classes_counts_in_each(pets: Path):
    os.symlink(pets / "dog" / "0000.png", pets / "cat" / "dog0.png")
    ds = _open(pets)
    assert ds.labels == [0, 0, 0, 0, 1, 1, 1]


@needs_symlinks
def test_broken_symlinks_are_skipped_and_reported(pets: Path):
    os.symlink(pets / "nowhere.png", pets / "cat" / "broken.png")
    os.symlink("loop.png", pets / "dog" / "loop.png")
    os.symlink(pets / "nowhere", pets / "dog" / "gone")
    os.symlink(pets / "nowhere", pets / "ghost-class")  # not a class: it leads nowhere
    ds = _open(pets)
    assert ds.classes == ["cat", "dog"] and len(ds) == 6
    assert ds.broken_links == [os.path.join(*p) for p in (("cat", "broken.png"), ("dog", "gone"), ("dog", "loop.png"))]
    ((images, labels, _),) = list(iterate(make_loader(ds, 6, workers=0)))
    assert images.shape == (6, 3, 32, 32) and labels.tolist() == [0, 0, 0, 1, 1, 1]


# == fingerprint ========================================================================================


def test_fingerprint_notices_a_new_modification_time(pets: Path):
    victim = pets / "dog" / "0001.png"
    st = victim.stat()
    fp = _open(pets).fingerprint()
    assert _open(pets).fingerprint() == fp  # same files, same fingerprint
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    touched = _open(pets).fingerprint()
    assert touched != fp
    os.utime(victim, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _open(pets).fingerprint() == fp


def test_fingerprint_reuses_the_walk_and_stats_nothing_again(pets: Path):
    ds = _open(pets)
    fp = ds.fingerprint()
    (pets / "cat" / "0002.png").unlink()
    assert ds.fingerprint() == fp
    assert _open(pets).fingerprint() != fp


def test_cifar10_fingerprint_covers_modification_times(tmp_path: Path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ("test_batch", "data_batch_1"):
        (folder / name).write_bytes(b"0123456789")
    ds = Cifar10Dataset.__new__(Cifar10Dataset)
    ds.spec = DataSpec("cifar10", str(tmp_path), "test")
    ds.base = SimpleNamespace(
        base_folder=folder.name, train_list=[["data_batch_1", ""]], test_list=[["test_batch", ""]]
    )
    fp = ds.fingerprint()
    assert ds.fingerprint() == fp
    st = (folder / "data_batch_1").stat()
    os.utime(folder / "data_batch_1", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # not in the test split
    assert ds.fingerprint() == fp
    st = (folder / "test_batch").stat()
    os.utime(folder / "test_batch", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert ds.fingerprint() != fp


# == empty classes ======================================================================================


def test_empty_class_folders_are_listed_not_refused(pets: Path):
    (pets / "bird").mkdir()
    (pets / "eel").mkdir()
    (pets / "eel" / "readme.txt").write_text("no images here")
    ds = _open(pets)
    assert ds.classes == ["bird", "cat", "dog", "eel"]
    assert ds.empty_classes == ["bird", "eel"]
    assert len(ds) == 6 and ds.labels == [1, 1, 1, 2, 2, 2]
    assert _open(write_image_folder(pets.parent / "full", ["a", "b"], 1)).empty_classes == []


def test_all_class_folders_empty_is_an_error(tmp_path: Path):
    for name in ("a", "b"):
        (tmp_path / "root" / name).mkdir(parents=True)
    with pytest.raises(DataError, match=r"has no images \(.jpg, .jpeg, .png, .ppm, ...\) in its class folders"):
        open_dataset(str(tmp_path / "root"), Preprocess())


# == messages ===========================================================================================


def test_a_file_as_data_folder_says_it_is_a_file(tmp_path: Path):
    f = tmp_path / "images.tar"
    f.write_bytes(b"not a directory")
    with pytest.raises(DataError, match=r"is a file, not a directory; pass an ImageFolder directory") as ei:
        open_dataset(str(f), Preprocess())
    msg = str(ei.value)
    assert not isinstance(ei.value, MissingFileError) and "does not exist" not in msg
    assert msg == (
        f"data path {f} is a file, not a directory; pass an ImageFolder directory (ROOT/<class>/<image>) "
        "or cifar10:ROOT:train|test"
    )
    with pytest.raises(MissingFileError, match="does not exist"):
        open_dataset(str(tmp_path / "nope"), Preprocess())


def _mixed(tmp_path: Path) -> FolderDataset:
    write_image_folder(tmp_path / "mixed", ["a"], 2, size=32)
    write_image_folder(tmp_path / "mixed", ["b"], 2, size=40, seed=1)
    return _open(tmp_path / "mixed")


def test_mixed_sizes_message_names_no_option_the_command_lacks(tmp_path: Path):
    ds = _mixed(tmp_path)
    with pytest.raises(DataError) as ei:
        list(iterate(make_loader(ds, 4, workers=0)))
    assert str(ei.value) == (
        "images of different sizes in one batch (32x32 and 40x40 pixels) and the preprocessing has no crop "
        "to make them one size; use images of one size, or extract with `dgate extract --resize N --crop N`"
    )
    assert "pass --resize" not in str(ei.value)
    hint = "use images of 32x32 pixels, as the model was calibrated on"
    with pytest.raises(DataError, match=rf"one size; {hint}$"):
        list(iterate(make_loader(ds, 4, workers=0, size_hint=hint)))
    with pytest.raises(DataError, match=r"\(32x32 and 40x40 pixels\).*; try again$"):
        _collate([ds[0], ds[3]], hint="try again")


# == decoding errors ====================================================================================


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG with a valid header that claims ``width`` x ``height`` RGB pixels and holds almost none."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_a_one_line_data_error(pets: Path):
    bomb = pets / "dog" / "bomb.png"
    bomb.write_bytes(_png_claiming(30000, 30000))
    assert bomb.stat().st_size < 300
    ds = _open(pets)
    i = [p for p, _ in ds.samples].index(str(bomb))
    start = rf"^cannot read image {re.escape(str(bomb))} \(DecompressionBombError: Image size \(900000000 pixels\)"
    with pytest.raises(DataError, match=start) as ei:
        ds[i]
    msg = str(ei.value)
    assert "\n" not in msg and msg.endswith("; it is too large to decode safely: downscale or remove the file")
    # the same line from a loader worker process
    with pytest.raises(DataError) as ew:
        list(iterate(make_loader(ds, 8, workers=1)))
    assert str(ew.value) == msg


def test_random_bytes_jpg_is_a_one_line_data_error(pets: Path):
    junk = pets / "cat" / "junk.jpg"
    junk.write_bytes(bytes(torch.randint(0, 256, (500,), generator=torch.Generator().manual_seed(0)).tolist()))
    ds = _open(pets)
    i = [p for p, _ in ds.samples].index(str(junk))
    line = rf"^cannot read image {re.escape(str(junk))} \(UnidentifiedImageError: .*\); fix or remove the file$"
    with pytest.raises(DataError, match=line) as ei:
        ds[i]
    assert "\n" not in str(ei.value)
    err = pickle.loads(pickle.dumps(ei.value))  # what a worker process sends back
    assert type(err) is DataError and str(err) == str(ei.value)


def test_truncated_png_is_a_one_line_data_error(pets: Path):
    victim = pets / "cat" / "0001.png"
    victim.write_bytes(victim.read_bytes()[:200])
    ds = _open(pets)
    line = rf"^cannot read image {re.escape(str(victim))} \(OSError: .*\); fix or remove the file$"
    with pytest.raises(DataError, match=line):
        ds[1]
