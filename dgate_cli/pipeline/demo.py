"""The built-in demo: procedurally generated shapes of varying difficulty and a small CNN.

Each image shows one of ten shapes. Its difficulty ``d`` in [0, 1] sets how much the class's colour
gives it away, the contrast, the noise and the clutter: easy images are separable from shallow
features (colour and coarse layout), hard ones need the whole network, so early exits matter.
Images are written as PNG files in ImageFolder layout, so the demo runs the real pipeline on them."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image

from .. import _io
from ..data.preprocess import Preprocess
from ..models.demo_cnn import demo_cnn

CLASSES = ["circle", "cross", "diamond", "dots", "hbars", "ring", "square", "triangle", "vbars", "x"]


SIZE = 32


_HUES = torch.tensor(
    [[0.9, 0.2, 0.2], [0.2, 0.8, 0.2], [0.2, 0.3, 0.9], [0.9, 0.8, 0.1], [0.8, 0.2, 0.8],
     [0.1, 0.8, 0.8], [0.9, 0.5, 0.1], [0.5, 0.9, 0.5], [0.5, 0.5, 0.9], [0.6, 0.3, 0.1]]
)  # fmt: skip


def _masks(cls: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """One binary shape mask (N, S, S) per class index, with random position and size."""
    n = cls.shape[0]
    yy, xx = torch.meshgrid(
        torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32), indexing="ij"
    )
    cx = 16 + (torch.rand(n, generator=g) - 0.5) * 10
    cy = 16 + (torch.rand(n, generator=g) - 0.5) * 10
    r = 6 + torch.rand(n, generator=g) * 5
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    R = r[:, None, None]
    dist = torch.sqrt(dx**2 + dy**2)
    shapes = [
        dist <= R,  # circle
        ((dx.abs() <= R / 4) & (dy.abs() <= R)) | ((dy.abs() <= R / 4) & (dx.abs() <= R)),  # cross
        (dx.abs() + dy.abs()) <= R,  # diamond
        ((torch.sin(xx[None] * 1.2) > 0.6) & (torch.sin(yy[None] * 1.2) > 0.6) & (dist <= R * 1.4)),  # dots
        ((torch.sin(yy[None] * 1.1) > 0) & (dx.abs() <= R) & (dy.abs() <= R)),  # hbars
        (dist <= R) & (dist >= R * 0.6),  # ring
        (dx.abs() <= R * 0.8) & (dy.abs() <= R * 0.8),  # square
        (dy <= R * 0.7) & (dy >= -R) & (dx.abs() <= (dy + R) * 0.6),  # triangle
        ((torch.sin(xx[None] * 1.1) > 0) & (dx.abs() <= R) & (dy.abs() <= R)),  # vbars
        (((dx - dy).abs() <= R / 3.5) | ((dx + dy).abs() <= R / 3.5)) & (dx.abs() <= R) & (dy.abs() <= R),  # x
    ]
    stack = torch.stack(shapes, 1)  # (N, C, S, S)
    return stack[torch.arange(n), cls].float()


def make_images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``n`` images ``(N, 3, 32, 32)`` uint8, their labels and difficulties (balanced classes).

    Example:
        >>> x, y, d = make_images(20, seed=1)
        >>> x.shape, x.dtype, int(y.max())
        (torch.Size([20, 3, 32, 32]), torch.uint8, 9)
    """
    g = torch.Generator().manual_seed(seed)
    cls = torch.arange(n) % len(CLASSES)
    cls = cls[torch.randperm(n, generator=g)]
    d = torch.rand(n, generator=g)
    mask = _masks(cls, g)
    # colour: the class hue for easy images, a random hue for hard ones
    rand_hue = torch.rand(n, 3, generator=g) * 0.8 + 0.1
    w = (1 - d).clamp(0, 1)[:, None] ** 1.5
    fg = w * _HUES[cls] + (1 - w) * rand_hue
    bg = torch.rand(n, 3, generator=g) * 0.3 + 0.35
    contrast = (1 - 0.55 * d)[:, None]
    fg = bg + contrast * (fg - bg)
    img = bg[:, :, None, None] * (1 - mask[:, None]) + fg[:, :, None, None] * mask[:, None]
    # clutter: a random other shape, faint, for hard images
    other = _masks(torch.randint(0, len(CLASSES), (n,), generator=g), g)
    img = img + (d[:, None, None, None] * 0.3) * other[:, None] * (torch.rand(n, 3, 1, 1, generator=g) - 0.5)
    noise = (0.02 + 0.1 * d)[:, None, None, None] * torch.randn(n, 3, SIZE, SIZE, generator=g)
    img = (img + noise).clamp(0, 1)
    return (img * 255).round().to(torch.uint8), cls, d


def write_dataset(root: str | Path, sizes: dict[str, int], seed: int = 0) -> dict[str, Path]:
    """Write the demo images as ImageFolder trees ``root/<split>/<class>/<i>.png``; reused if complete."""
    root = Path(root)
    out = {}
    for k, (split, n) in enumerate(sizes.items()):
        d = root / split
        marker = d / ".complete"
        out[split] = d
        split_seed = seed + 1000 * k
        if marker.is_file() and marker.read_text().strip() == f"{n} {split_seed}":
            continue
        x, y, _ = make_images(n, seed=split_seed)
        for i in range(n):
            folder = d / CLASSES[int(y[i])]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i].permute(1, 2, 0).numpy()).save(folder / f"{i:05d}.png")
        _io.write_text(marker, f"{n} {split_seed}\n")
    return out


@dataclass(frozen=True)
class TrainResult(_io.AsDict):
    path: Path
    epochs: int
    train_accuracy: float
    seconds: float
    reused: bool


def train(
    images: torch.Tensor,
    labels: torch.Tensor,
    out: str | Path,
    epochs: int = 12,
    batch_size: int = 128,
    seed: int = 0,
    progress: Callable[[str, int, int], None] | None = None,
    preprocess: Preprocess | None = None,
) -> TrainResult:
    """Train :class:`DemoCNN` on ``uint8`` images and save its weights as safetensors (atomically).
    ``preprocess``: the normalisation to train with (default: the CIFAR models', ImageNet mean/std)."""
    from ..models.backbone import CIFAR_PREPROCESS

    t0 = time.perf_counter()
    torch.manual_seed(seed)
    model = demo_cnn()
    x = (preprocess or CIFAR_PREPROCESS).normalize(images)
    n = x.shape[0]
    steps = epochs * math.ceil(n / batch_size)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4, nesterov=True)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=steps, pct_start=0.25)
    g = torch.Generator().manual_seed(seed)
    model.train()
    correct = 0
    for epoch in range(epochs):
        perm = torch.randperm(n, generator=g)
        correct = 0
        for i in range(0, n, batch_size):
            idx = perm[i : i + batch_size]
            xb = x[idx]
            if epoch < epochs - 1:  # flips: the shapes are symmetric enough
                flip = torch.rand(xb.shape[0], generator=g) < 0.5
                xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            logits = model(xb)
            loss = F.cross_entropy(logits, labels[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            correct += int((logits.argmax(1) == labels[idx]).sum())
        if progress:
            progress("train demo CNN", epoch + 1, epochs)
    model.eval()
    _io.save_tensors(out, model.state_dict())
    return TrainResult(Path(out), epochs, correct / n, time.perf_counter() - t0, reused=False)
