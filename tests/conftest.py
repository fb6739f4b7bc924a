"""Shared fixtures: where the real data lives, and tiny data for fast tests."""

from __future__ import annotations

import math
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


# -- thresholds that float rounding cannot move a sample across ---------------------------------------
#
# Two float paths (the feature cache and the runtime, a batch and a single sample, fused and plain
# convolutions, the gate kernel and PyTorch) give the same gate scores only up to rounding: about 1e-6
# of the logits' scale, more or less on another CPU or library build. A sample whose score lies that
# close to its threshold may leave on one path and not on the other. Tests that compare two paths
# exactly therefore either choose thresholds a margin away from every score that matters (built from
# the batch under test) or compare only the samples a margin away from fixed (calibrated) thresholds.

SCORE_RTOL = 1e-4  # the margin: this share of max(|threshold|, 1), some 40x what two paths differ by


def score_margin(threshold: float) -> float:
    """How far a score must be from ``threshold`` for every float path to decide it the same way."""
    return SCORE_RTOL * max(abs(threshold), 1.0)


def robust_cut(scores: torch.Tensor, q: float, window: float = 0.15) -> float:
    """A threshold near the ``q`` quantile of ``scores`` that splits them with a margin: the middle of
    the widest gap between neighbouring sorted scores within ``q +- window``, so that at least one
    score lies on each side and none within :func:`score_margin` of it. NaN and infinite scores
    (which never or always leave) are ignored. Skips the test where no such gap exists (a degenerate batch)."""
    v = scores.detach().double().flatten().cpu()
    v = v[v.isfinite()].sort().values
    n = len(v)
    if n < 2:
        pytest.skip(f"cannot split {n} gate score(s) with a threshold")
    lo = min(max(int((q - window) * (n - 1)), 0), n - 2)
    hi = min(max(int(math.ceil((q + window) * (n - 1))), lo + 1), n - 1)
    gaps = v[lo + 1 : hi + 1] - v[lo:hi]
    i = lo + int(gaps.argmax())
    t = float((v[i] + v[i + 1]) / 2)
    if not float(gaps.max()) / 2 > score_margin(t):
        pytest.skip(f"no gap wider than the rounding margin between the gate scores near quantile {q}")
    return t


def cascade_thresholds(scores: torch.Tensor, stay: float | list[float] = 0.6) -> list[float]:
    """Thresholds for ``(N, G)`` gate scores under which some samples leave at every gate and some
    reach the backbone, a margin away from the score of every sample at every gate it reaches: gate
    ``g``'s threshold is cut (:func:`robust_cut`) from the scores of the samples that no earlier gate
    took, about a ``stay`` share of them staying."""
    n, G = scores.shape
    shares = [stay] * G if isinstance(stay, float) else list(stay)
    alive = torch.ones(n, dtype=torch.bool)
    out = []
    for g in range(G):
        s = scores[:, g].detach().double().cpu()
        t = robust_cut(s[alive], shares[g])
        out.append(t)
        alive &= ~(s >= t)
    return out


def near_tie(outputs: torch.Tensor) -> torch.Tensor:
    """``(N,)`` samples whose two largest outputs (``(N, K)`` logits or gate outputs) lie within
    :func:`score_margin` of each other: another float path may predict either class for them."""
    if outputs.shape[1] < 2:
        return torch.zeros(outputs.shape[0], dtype=torch.bool)
    top = outputs.detach().double().cpu().topk(2, 1).values
    return (top[:, 0] - top[:, 1]) <= SCORE_RTOL * top[:, 0].abs().clamp(min=1.0)


def near_threshold(scores: torch.Tensor, thresholds, exits: torch.Tensor, ties: torch.Tensor | None = None):
    """``(N,)`` the samples that another float path may decide otherwise: whose score at some open
    gate they reach (gates ``0 .. exits[i]``, as decided from ``scores``) lies within
    :func:`score_margin` of its threshold, or (given ``ties``, ``(N, G + 1)``: :func:`near_tie` of
    each gate's outputs, then of the backbone's logits) whose outputs at their exit nearly tie."""
    s = scores.detach().double().cpu()
    e = exits.cpu()
    t = torch.as_tensor([float(v) for v in thresholds], dtype=torch.float64)
    tol = torch.tensor([score_margin(v) if math.isfinite(v) else 0.0 for v in t.tolist()], dtype=torch.float64)
    near = ((s - t).abs() <= tol) & torch.isfinite(t)
    reached = torch.arange(s.shape[1])[None, :] <= e[:, None]
    out = (near & reached).any(1)
    if ties is not None:
        out |= ties.cpu().gather(1, e[:, None]).squeeze(1)
    return out


def gate_scores_of(model, x: torch.Tensor) -> torch.Tensor:
    """``(N, G)`` every sample's exit score at every gate of a ``GatedModel``, all samples run through
    every stage (none leaves), as the model scores them."""
    from dgate_cli.gates.scores import gate_scores

    with torch.inference_mode():
        h = x.contiguous(memory_format=torch.channels_last) if model.channels_last and x.dim() == 4 else x
        out = []
        for g in range(model.num_gates):
            h = model.stages[g](h)
            out.append(gate_scores(model.gate_outputs(g, h), model.score)[0])
    return torch.stack(out, 1)


def assert_same_decisions(a, b) -> None:
    """Two runs (``GatedOutput``) of one model on the same inputs over two float paths, under
    thresholds a margin away from every score that decides (:func:`cascade_thresholds`,
    :func:`robust_cut`): the same exit for every sample, and the same class for every sample whose
    outputs at its exit do not nearly tie (:func:`near_tie`; those may go either way)."""
    assert torch.equal(a.exit, b.exit)
    sure = ~near_tie(a.logits.float())
    assert 2 * int(sure.sum()) >= len(sure), f"{int((~sure).sum())} of {len(sure)} samples nearly tie"
    assert torch.equal(a.pred[sure], b.pred[sure])
