"""``dgate bench``: measured speed of a gated model against its own backbone, on the same images.

Both run on the same pre-loaded, normalised batches, both called as modules (the backbone is
:meth:`GatedModel.backbone`: the same stages chained, no gates), interleaved batch by batch (gated
and backbone alternate, and which goes first alternates too), after warm-up, with device
synchronisation around every timed call. The ideal speed-up is what the FLOPs promise: backbone
MACs / gated mean MACs on the images seen (gates included).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any

import torch

from .._device import describe, sync
from ..errors import SpecError
from ..runtime.backends.malloc import malloc_state
from ..runtime.model import GatedModel, GatedOutput

ProgressFn = Callable[[str, int, int], None]
_NEVER = float(torch.finfo(torch.float32).max)  # a threshold no finite float32 score passes


@dataclass(frozen=True)
class BenchRow:
    """Timing of one batch size.

    Attributes:
        backbone_ms, gated_ms: median latency per batch.
        backbone_p95_ms, gated_p95_ms: 95th percentile latency per batch.
        speedup: backbone time / gated time, over all timed batches.
        ideal_speedup: backbone MACs / gated mean MACs on these images (gates included).
        efficiency: speedup / ideal_speedup.
        accuracy, backbone_accuracy: on every image given, both run in batches of the row's size.
        mode: ``batch`` (each batch on its own, as :meth:`GatedModel.forward` runs it),
            ``stream`` (:meth:`GatedModel.stream`: survivors of several batches share a stage
            batch; latencies are then mean and worst time per input batch over the passes) or
            ``no-exit`` (batch mode with every open gate computed and nobody leaving: the gates'
            overhead, a speed-up below 1) or, for a cascade, ``member NAME`` (that member alone,
            without gates, against the reference: the last member).
    """

    batch_size: int
    batches: int
    images: int
    backbone_ms: float
    gated_ms: float
    backbone_p95_ms: float
    gated_p95_ms: float
    backbone_images_per_s: float
    gated_images_per_s: float
    speedup: float
    ideal_speedup: float
    efficiency: float
    flops_ratio: float
    exit_fractions: list[float]
    accuracy: float | None
    backbone_accuracy: float | None
    mode: str = "batch"


@dataclass
class BenchResult:
    device: str
    machine: str
    torch_version: str
    thresholds: list[float]
    exit_names: list[str]
    rows: list[BenchRow] = field(default_factory=list)
    backends: list[str] = field(default_factory=list)  # the model's decision backends (none: the reference)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "machine": self.machine,
            "torch": self.torch_version,
            "backends": list(self.backends),
            "thresholds": list(self.thresholds),
            "exit_names": list(self.exit_names),
            "rows": [asdict(r) for r in self.rows],
        }


def _pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    k = min(len(s) - 1, max(0, math.ceil(q * len(s)) - 1))
    return s[k]


def bench(
    model: GatedModel,
    images: torch.Tensor,
    labels: torch.Tensor | None = None,
    batch_sizes: Sequence[int] = (1, 32),
    warmup: int = 1,
    repeats: int = 1,
    min_batches: int = 5,
    progress: ProgressFn | None = None,
    stream: bool = False,
    no_exits: bool = False,
) -> BenchResult:
    """Time ``model`` and its backbone on normalised ``images`` (already on the model's device).

    Args:
        model: a gated model (its thresholds as set).
        images: ``(N, C, H, W)`` inputs.
        labels: ``(N,)`` labels, for accuracy (optional).
        batch_sizes: batch sizes to time; each uses every whole batch of ``images`` (at least
            ``min_batches``, cycling through the images if there are too few).
        warmup: untimed passes over the batches first, per model and batch size. One pass makes
            every survivor batch size the timed pass meets warm (oneDNN builds a kernel per shape).
        repeats: timed passes over the batches (more passes, less noise on a shared machine).
        stream: also time throughput mode (:meth:`GatedModel.stream`) per batch size above 1
            (at 1 it is the batch mode): one more row each, ``mode="stream"``, whole passes over
            the batches interleaved with the backbone's.
        no_exits: also time each batch size with every open gate computed but none letting a
            sample out (thresholds at float32's largest number: only a score of +inf passes, as
            the margin rule gives with one class): the worst case, what the gates cost when
            nothing is easy. One more row each, ``mode="no-exit"``, with the exits and the
            accuracy measured as in the batch row.

    Example:
        >>> r = bench(load("models/r56-gated"), x, y, batch_sizes=[1, 32])  # doctest: +SKIP
        >>> r.rows[0].speedup, r.rows[0].ideal_speedup  # doctest: +SKIP
    """
    if stream and "members" in model.manifest:
        raise SpecError("--stream times single networks; leave it out for a cascade")
    device = images.device
    model.eval()
    result = BenchResult(
        describe(device),
        _machine(device),
        torch.__version__,
        list(model.thresholds),
        [*model.gate_names, "backbone"],
        backends=[b.name for b in model.backends],
    )
    n = images.shape[0]

    def gated(x: torch.Tensor) -> torch.Tensor:
        return model(x).pred

    def backbone(x: torch.Tensor) -> torch.Tensor:
        return model.backbone_forward(x).argmax(1)

    for b in batch_sizes:
        # both accuracies at the row's own batch size: kernels, and so rounding and decisions, may
        # differ by batch size
        bb_acc = _accuracy(backbone, images, labels, b) if labels is not None else None
        nb = max(min_batches, n // b)
        starts = [(i * b) % max(1, n - b + 1) for i in range(nb)] if n >= b else [0] * nb
        batches = [images[s : s + b] if n >= b else images.repeat(math.ceil(b / n), 1, 1, 1)[:b] for s in starts]
        t_bb, t_g, exits = _time_batches(model, batches, warmup, repeats, f"batch size {b}", progress)
        acc = _accuracy(gated, images, labels, b) if labels is not None else None
        result.rows.append(_row(model, b, len(t_g), len(t_g) * b, t_bb, t_g, _latencies(t_bb, t_g), exits, acc, bb_acc))
        if stream and b > 1:  # a pass over every image once, as offline scoring would
            result.rows.append(_stream_row(model, list(images.split(b)), labels, bb_acc, b, warmup, repeats, progress))
        if no_exits:
            kept = list(model.thresholds)
            acc = None
            try:
                model.set_thresholds([t if t == math.inf else _NEVER for t in kept])
                t_bb, t_g, exits = _time_batches(model, batches, warmup, repeats, f"batch size {b}, no exits", progress)
                if labels is not None:  # the backbone's, unless a score of +inf got out
                    acc = _accuracy(gated, images, labels, b)
            finally:
                model.set_thresholds(kept)
            lat = _latencies(t_bb, t_g)
            result.rows.append(_row(model, b, len(t_g), len(t_g) * b, t_bb, t_g, lat, exits, acc, bb_acc, "no-exit"))
        if "members" in model.manifest:  # a cascade: each member alone against the reference too
            for k, entry in enumerate(model.manifest["members"][:-1]):
                result.rows.append(
                    _member_row(model, k, entry, batches, images, labels, bb_acc, b, warmup, repeats, progress)
                )
    return result


def _member_row(
    model: GatedModel,
    k: int,
    entry: dict[str, Any],
    batches: list[torch.Tensor],
    images: torch.Tensor,
    labels: torch.Tensor | None,
    bb_acc: float | None,
    b: int,
    warmup: int,
    repeats: int,
    progress: ProgressFn | None,
) -> BenchRow:
    """Cascade member ``k`` alone (no gates) against the reference, as a row of mode ``member NAME``:
    its speed-up and the one its MACs promise (its normalisation included)."""
    member, reference = model.member(k), model.backbone()
    with torch.inference_mode():
        for _ in range(warmup):
            for xb in batches:
                member(xb)
                reference(xb)
        pairs = [(partial(member, x), partial(reference, x)) for x in batches * max(1, repeats)]
        t_bb, t_g, _ = _interleaved(pairs, batches[0].device, f"batch size {b}, {entry['name']} alone", progress)
    lat = _latencies(t_bb, t_g)
    acc = _accuracy(lambda x: member(x).argmax(1), images, labels, b) if labels is not None else None
    cost = float(entry["macs"]) + 3 * model.manifest["input_size"] ** 2  # as the cascade counts it
    ratio = cost / model.cost.backbone  # type: ignore[union-attr]
    return _timed_row(b, len(t_g), len(t_g) * b, t_bb, t_g, lat, ratio, [], acc, bb_acc, f"member {entry['name']}")


def _time_batches(
    model: GatedModel,
    batches: list[torch.Tensor],
    warmup: int,
    repeats: int,
    label: str,
    progress: ProgressFn | None,
) -> tuple[list[float], list[float], torch.Tensor]:
    """Backbone and gated times (seconds) per batch over ``repeats`` passes, interleaved batch by
    batch (which goes first alternates), and the exit of every image of the first pass."""
    backbone = model.backbone()  # a module, called as the gated model is
    with torch.inference_mode():
        for _ in range(warmup):  # every survivor batch size the timed run meets is then warm
            for xb in batches:
                model(xb)
                backbone(xb)
        pairs = [(partial(model, x), partial(backbone, x)) for x in batches * max(1, repeats)]
        t_bb, t_g, outs = _interleaved(pairs, batches[0].device, label, progress)
    return t_bb, t_g, torch.cat([out.exit.cpu() for out in outs[: len(batches)]])


def _interleaved(
    pairs: list[tuple[Callable[[], Any], Callable[[], Any]]],
    device: torch.device,
    label: str,
    progress: ProgressFn | None,
) -> tuple[list[float], list[float], list[Any]]:
    """Time each ``(gated, backbone)`` pair of calls, which goes first alternating, synchronised
    around every call: (backbone seconds, gated seconds, what the gated calls returned)."""
    t_bb: list[float] = []
    t_g: list[float] = []
    outs: list[Any] = []
    sync(device)
    for i, (gated, backbone) in enumerate(pairs):
        for call in (gated, backbone) if i % 2 == 0 else (backbone, gated):
            sync(device)
            t0 = time.perf_counter()
            result = call()
            sync(device)
            elapsed = time.perf_counter() - t0
            if call is gated:
                t_g.append(elapsed)
                outs.append(result)
            else:
                t_bb.append(elapsed)
        if progress:
            progress(label, i + 1, len(pairs))
    return t_bb, t_g, outs


def _latencies(t_bb: list[float], t_g: list[float]) -> tuple[float, float, float, float]:
    """Median and p95 per batch: backbone, gated, backbone p95, gated p95."""
    return statistics.median(t_bb), statistics.median(t_g), _pct(t_bb, 0.95), _pct(t_g, 0.95)


def _stream_row(
    model: GatedModel,
    batches: list[torch.Tensor],
    labels: torch.Tensor | None,
    backbone_accuracy: float | None,
    b: int,
    warmup: int,
    repeats: int,
    progress: ProgressFn | None,
) -> BenchRow:
    """Whole passes of :meth:`GatedModel.stream` over ``batches`` (all images, in order) against
    the backbone's passes; accuracy on the same images as the batch rows'."""
    n = sum(x.shape[0] for x in batches)
    module = model.backbone()

    def gated() -> list[tuple[torch.Tensor, GatedOutput]]:
        return list(model.stream(batches, batch_size=b))  # bookkeeping after the clock stops

    def backbone() -> None:
        for x in batches:
            module(x)

    with torch.inference_mode():
        for _ in range(warmup):
            gated()
            backbone()
        pairs = [(gated, backbone)] * max(1, repeats)
        t_bb, t_g, outs = _interleaved(pairs, batches[0].device, f"batch size {b}, stream", progress)
    exit_ = torch.empty(n, dtype=torch.long)
    pred = torch.empty(n, dtype=torch.long)
    for index, out in outs[-1]:
        exit_[index.cpu()] = out.exit.cpu()
        pred[index.cpu()] = out.pred.cpu()
    acc = float((pred == labels[:n].cpu()).double().mean()) if labels is not None else None
    nb = len(batches)  # latencies: mean and worst pass, per input batch
    lat = (statistics.mean(t_bb) / nb, statistics.mean(t_g) / nb, max(t_bb) / nb, max(t_g) / nb)
    return _row(model, b, nb * len(t_g), n * len(t_g), t_bb, t_g, lat, exit_, acc, backbone_accuracy, "stream")


def _row(
    model: GatedModel,
    b: int,
    batches: int,
    images: int,
    t_bb: list[float],
    t_g: list[float],
    lat: tuple[float, float, float, float],
    exits: torch.Tensor,
    acc: float | None,
    bb_acc: float | None,
    mode: str = "batch",
) -> BenchRow:
    """A :class:`BenchRow` from the timings (seconds), the latencies to report (backbone, gated,
    then their p95 or worst) and the exit index of each image seen."""
    cost = model.cost
    if cost is None:
        raise ValueError("bench needs a model with a cost table (an export carries one)")
    ratio = cost.mean_cost(exits, model.thresholds) / cost.backbone
    fractions = (torch.bincount(exits, minlength=model.num_gates + 1).double() / exits.numel()).tolist()
    return _timed_row(b, batches, images, t_bb, t_g, lat, ratio, fractions, acc, bb_acc, mode)


def _timed_row(
    b: int,
    batches: int,
    images: int,
    t_bb: list[float],
    t_g: list[float],
    lat: tuple[float, float, float, float],
    flops_ratio: float,
    exit_fractions: list[float],
    acc: float | None,
    bb_acc: float | None,
    mode: str,
) -> BenchRow:
    """A :class:`BenchRow` from the timings (seconds) of the model timed and of the reference, the
    latencies to report and the model's cost as a fraction of the reference's."""
    speedup = sum(t_bb) / sum(t_g)
    return BenchRow(
        batch_size=b,
        batches=batches,
        images=images,
        backbone_ms=1e3 * lat[0],
        gated_ms=1e3 * lat[1],
        backbone_p95_ms=1e3 * lat[2],
        gated_p95_ms=1e3 * lat[3],
        backbone_images_per_s=images / sum(t_bb),
        gated_images_per_s=images / sum(t_g),
        speedup=speedup,
        ideal_speedup=1 / flops_ratio,
        efficiency=speedup * flops_ratio,
        flops_ratio=flops_ratio,
        exit_fractions=exit_fractions,
        accuracy=acc,
        backbone_accuracy=bb_acc,
        mode=mode,
    )


def _accuracy(
    classes: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, labels: torch.Tensor, b: int
) -> float:
    """Accuracy of ``classes(x)`` on ``images``, run in batches of ``b``."""
    correct = 0
    step = b
    with torch.inference_mode():
        for s in range(0, images.shape[0], step):
            x = images[s : s + step]
            correct += int((classes(x) == labels[s : s + step].to(x.device)).sum())
    return correct / images.shape[0]


def _machine(device: torch.device) -> str:
    import platform

    return f"{platform.node()} {platform.machine()}, {describe(torch.device('cpu'))}, malloc {malloc_state()}"
