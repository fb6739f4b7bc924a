"""``dgate evaluate``: run an exported gated model on labelled images; accuracy, cost, exits."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._device import describe, resolve_device
from ..data.datasets import open_dataset
from ..data.loader import iterate, make_loader, spread
from ..errors import DataError
from ..pipeline.extract_setup import class_difference
from ..runtime.loading import load
from ..runtime.model import GatedModel
from ..runtime.operating_point import select as select_operating_point

ProgressFn = Callable[[str, int, int], None]


@dataclass
class EvaluateResult:
    """Accuracy and cost of a gated model and of its own backbone on the same images.

    Attributes:
        per_class_exits: ``classes x (gates + 1)`` counts of where each class's images left.
        samples: per-image ``index``, ``label``, ``pred``, ``exit``, ``backbone_pred`` tensors.
    """

    data: str
    images: int
    accuracy: float
    backbone_accuracy: float
    agreement: float
    mean_cost: float
    backbone_cost: float
    unit: str
    exit_fractions: list[float]
    exit_names: list[str]
    classes: list[str]
    per_class_exits: list[list[int]]
    thresholds: list[float]
    device: str
    seconds: float
    samples: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    members: list[dict[str, Any]] | None = None

    @property
    def flops_ratio(self) -> float:
        """Mean cost per image (gates included) / the backbone's cost."""
        return self.mean_cost / self.backbone_cost

    def to_dict(self) -> dict[str, Any]:
        return {
            "data": self.data,
            "images": self.images,
            "accuracy": self.accuracy,
            "backbone_accuracy": self.backbone_accuracy,
            "accuracy_drop": self.backbone_accuracy - self.accuracy,
            "agreement": self.agreement,
            "mean_cost": self.mean_cost,
            "backbone_cost": self.backbone_cost,
            "cost_unit": self.unit,
            "flops_ratio": self.flops_ratio,
            "flops_reduction": 1 - self.flops_ratio,
            "exit_fractions": dict(zip(self.exit_names, self.exit_fractions, strict=True)),
            "per_class_exits": {
                c: dict(zip(self.exit_names, row, strict=True))
                for c, row in zip(self.classes, self.per_class_exits, strict=True)
            },
            "thresholds": [t if t != float("inf") else "inf" for t in self.thresholds],
            "device": self.device,
            "seconds": round(self.seconds, 3),
            **({"members": self.members} if self.members is not None else {}),
        }


def evaluate(
    directory: str | Path,
    data: str,
    *,
    device: str = "auto",
    batch_size: int = 256,
    workers: int | None = None,
    images: int | None = None,
    max_drop: float | None = None,
    thresholds: Sequence[float] | None = None,
    verify: bool = True,
    progress: ProgressFn | None = None,
    trust_code: bool = False,
) -> EvaluateResult:
    """Run the exported model and its backbone on ``data``; compare accuracy and cost.

    Args:
        images: use this many images, evenly spaced over ``data`` (default: all).
        max_drop: first switch to the cheapest stored operating point within this accuracy drop
            (:meth:`GatedModel.use_operating_point`).
        thresholds: or use these thresholds, one per gate (``inf`` closes a gate).
        verify: check the files against the sha256s the export recorded.

    Example:
        >>> r = evaluate("models/r56-gated", "cifar10-jpeg/test")  # doctest: +SKIP
        >>> r.accuracy, r.flops_ratio  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    dev = resolve_device(device)
    model = load(directory, device=dev, verify=verify, trust_code=trust_code)
    select_operating_point(model, max_drop, thresholds)
    pre = model.preprocess
    ds = open_dataset(data, pre)
    classes = model.classes
    if ds.classes != classes:
        raise DataError(
            f"{class_difference(str(data), ds.classes, 'the model', classes)}; pass images of the model's classes"
        )
    subset = spread(len(ds), images)
    n = len(ds) if subset is None else len(subset)
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("index", "label", "pred", "exit", "backbone_pred")}
    done = 0
    for batch, labels, index in iterate(
        make_loader(ds, batch_size, workers, pin_memory=dev.type == "cuda", indices=subset)
    ):
        x = pre.normalize(batch.to(dev, non_blocking=True))
        out = model(x)
        parts["backbone_pred"].append(model.backbone_forward(x).argmax(1).cpu())
        parts["pred"].append(out.pred.cpu())
        parts["exit"].append(out.exit.cpu())
        parts["label"].append(labels)
        parts["index"].append(index)
        done += labels.shape[0]
        if progress:
            progress("evaluate", done, n)
    s = {k: torch.cat(v) for k, v in parts.items()}
    G = model.num_gates
    counts = torch.bincount(s["exit"], minlength=G + 1)
    per_class = torch.zeros(len(classes), G + 1, dtype=torch.long)
    per_class.index_put_((s["label"], s["exit"]), torch.ones_like(s["label"]), accumulate=True)
    return EvaluateResult(
        data=str(data),
        images=n,
        accuracy=float((s["pred"] == s["label"]).double().mean()),
        backbone_accuracy=float((s["backbone_pred"] == s["label"]).double().mean()),
        agreement=float((s["pred"] == s["backbone_pred"]).double().mean()),
        mean_cost=model.cost.mean_cost(s["exit"], model.thresholds),  # type: ignore[union-attr]
        backbone_cost=model.cost.backbone,  # type: ignore[union-attr]
        unit=model.manifest["costs"]["unit"],
        exit_fractions=(counts.double() / n).tolist(),
        exit_names=[*model.gate_names, "backbone"],
        classes=classes,
        per_class_exits=per_class.tolist(),
        thresholds=list(model.thresholds),
        device=describe(dev),
        seconds=time.perf_counter() - t0,
        samples=s,
        members=member_shares(model, counts) if "members" in model.manifest else None,
    )


def member_shares(model: GatedModel, counts: torch.Tensor) -> list[dict[str, Any]]:
    """Per cascade member: the fraction of images that ran it and the fraction it answered (that
    left at one of its exits)."""
    owner = torch.tensor(model.exit_members())
    n = float(counts.sum())
    return [
        {"name": m["name"], "ran": float(counts[owner >= k].sum()) / n, "answered": float(counts[owner == k].sum()) / n}
        for k, m in enumerate(model.manifest["members"])
    ]
