"""Shared fixtures: where the real data lives, and tiny data for fast tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DGATE_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR = SHARED / "cifar10-jpeg"
CHECKPOINTS = SHARED / "checkpoints" / "cifar-resnet"
# the demo CNN's default gate positions: every block but the last (stage1.1 and stage2.1 end their stages)
DEMO_GATES = ["stage1.0", "stage1", "stage2.0", "stage2", "stage3.0"]
# ResNet-20's default gate positions: the end of each third of every stage (every block but the last)
R20_GATES = ["layer1.0", "layer1.1", "layer1", "layer2.0", "layer2.1", "layer2", "layer3.0", "layer3.1"]
R20 = CHECKPOINTS / "resnet20-12fca82f.th"
R56 = CHECKPOINTS / "resnet56-4bfd9763.th"

needs_shared = pytest.mark.skipif(
    not (CIFAR.is_dir() and R20.is_file() and R56.is_file()),
    reason=f"real data not found at {SHARED} (CIFAR-10 JPEG + CIFAR ResNet checkpoints); set DGATE_SHARED_DATA",
)


def test_threads(module) -> int:
    """Intra-op threads for a test module: 2, or its ``TORCH_THREADS`` (modules of many tiny tensor ops
    set 1: two threads spin-wait badly on a busy two-core machine). Module-scoped fixtures that compute
    reference outputs compared bit for bit must use the same count (kernels differ by thread count)."""
    return getattr(module, "TORCH_THREADS", min(2, os.cpu_count() or 1))


test_threads.__test__ = False  # a helper, not a test


@pytest.fixture(autouse=True)
def _threads(request):
    """Each test runs with :func:`test_threads` threads; the previous setting is restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(test_threads(request.module))
    yield
    torch.set_num_threads(before)


def write_image_folder(root: Path, classes: list[str], per_class: int, size: int = 32, seed: int = 0) -> Path:
    """Write a tiny ImageFolder of random PNGs: root/<class>/<i>.png."""
    g = torch.Generator().manual_seed(seed)
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = torch.full((size, size, 3), (25 * c) % 200, dtype=torch.uint8)
            noise = torch.randint(0, 60, (size, size, 3), generator=g, dtype=torch.uint8)
            Image.fromarray((base + noise).numpy()).save(d / f"{i:04d}.png")
    return root


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    """An ImageFolder with 10 classes x 6 random 32x32 images."""
    return write_image_folder(tmp_path / "imgs", [f"c{i}" for i in range(10)], 6)
