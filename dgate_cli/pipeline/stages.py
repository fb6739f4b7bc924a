"""``dgate stages``: the candidate gate positions of a model, with output shapes, costs and defaults."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Any

import torch

from .._io import AsDict
from ..data.datasets import open_dataset
from ..errors import DataError
from ..models.backbone import Backbone, build_backbone
from ..models.flops import UNIT, stage_costs
from ..models.staging import Cut, run_stages

SIZE_SOURCES = {
    "--input-size": "from --input-size",
    "--data": "from --data",
    "model default": "model default",
    "assumed": "assumed: pass --input-size or --data",
}
"""Where a report's input size came from -> how ``dgate stages`` says so."""


@dataclass(frozen=True)
class StageRow(AsDict):
    """One candidate gate position.

    Attributes:
        name: canonical module name (use it with ``--gates``).
        aliases: other module names for the same position.
        shape: output shape of one sample.
        macs: MACs of the stage ending here (since the previous listed position).
        cumulative_macs: MACs from the input to here.
        fraction: ``cumulative_macs`` / the whole model's MACs.
        default: whether the position is one of the default gates.
        why: why it is a default gate, e.g. ``"nearest cut to 2/9 of the MACs (19.5%)"`` or
            ``"family default (resnet)"`` ("" for other positions).
    """

    name: str
    aliases: list[str]
    shape: list[int]
    macs: int
    cumulative_macs: int
    fraction: float
    default: bool
    why: str = ""


@dataclass(frozen=True)
class StagesReport:
    """What ``dgate stages`` shows.

    Attributes:
        model: the model spec.
        family: the model's family (``generic``: none declared; defaults chosen by cost).
        input_size: the square input size the shapes and costs are for.
        input_size_source: where it came from: ``--input-size``, ``--data``, ``model default``, or
            ``assumed`` (a user model with no size of its own: 224).
        total_macs: MACs of the whole model per sample.
        rows: the positions listed, in execution order.
        unit: the cost unit.
    """

    model: str
    family: str
    input_size: int
    input_size_source: str
    total_macs: int
    rows: list[StageRow]
    unit: str = UNIT

    @property
    def input_note(self) -> str:
        """E.g. ``"32x32 input (from --data)"``."""
        s = self.input_size
        return f"{s}x{s} input ({SIZE_SOURCES.get(self.input_size_source, self.input_size_source)})"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows": [r.to_dict() for r in self.rows]}


def data_input_size(data: str | os.PathLike[str], backbone: Backbone) -> int:
    """The input size ``data`` gives ``backbone``: the side of its first image after the backbone's preprocessing.

    Raises:
        DataError: the data cannot be opened, or its first image is not square.

    Example:
        >>> data_input_size("cifar10:../shared/data:test", build_backbone("cifar_resnet20"))  # doctest: +SKIP
        32
    """
    image = open_dataset(str(data), backbone.preprocess)[0][0]
    h, w = int(image.shape[-2]), int(image.shape[-1])
    if h != w:
        raise DataError(
            f"the first image of {data} is {w}x{h} after preprocessing, not square; pass --input-size N for the size "
            "the model sees"
        )
    return h


def _size_source(backbone: Backbone, input_size: int | None, data: Any) -> str:
    if input_size:
        return "--input-size"
    if data is not None:
        return "--data"
    if backbone.spec.source in ("cifar_resnet", "demo") or backbone.preprocess.input_size(fallback=0):
        return "model default"
    return "assumed"


def list_stages(
    model: str,
    weights: str | None = None,
    model_kwargs: dict | str | None = None,
    input_size: int | None = None,
    all_cuts: bool = False,
    data: str | os.PathLike[str] | None = None,
    *,
    factory: Any = None,
) -> StagesReport:
    """List candidate gate positions (``all_cuts``: every stage boundary) with shapes, cumulative MACs and defaults.

    The input size is ``input_size``, else that of ``data``'s first image after the model's
    preprocessing, else the model's own (224 assumed for a user model that has none). A model
    without declared defaults also lists the positions chosen for it by cost, with why.

    Args:
        model: a model spec.
        weights: a checkpoint, or ``torchvision:TAG``.
        model_kwargs: constructor keyword arguments (dict or JSON).
        input_size: the square input size.
        all_cuts: list every stage boundary, not only the candidates.
        data: an ImageFolder directory or ``cifar10:ROOT:split`` whose images give the input size.
        factory: the factory itself for a ``package.module:factory`` spec (nothing is imported).

    Example:
        >>> r = list_stages("cifar_resnet20")
        >>> [row.name for row in r.rows if row.default][:3], r.input_note
        (['layer1.0', 'layer1.1', 'layer1'], '32x32 input (model default)')
    """
    bb = build_backbone(model, weights=weights, model_kwargs=model_kwargs, input_size=input_size, factory=factory)
    source = _size_source(bb, input_size, data)
    if data is not None and source == "--data":
        bb.input_size = data_input_size(data, bb)
    reasons = bb.default_reasons()
    listed = bb.graph.cuts if all_cuts else (bb.candidate_cuts() or bb.graph.cuts)
    if not bb.family.defaults(bb.module):
        return _report_by_cost(bb, listed, reasons, source)
    stages = bb.graph.split(listed)
    x = torch.zeros(1, 3, bb.input_size, bb.input_size)
    with torch.inference_mode():
        outs = run_stages(stages, x)
    costs = stage_costs(stages, x)
    total = sum(c.macs for c in costs)
    rows, cum = [], 0
    for cut, o, c in zip(listed, outs[: len(listed)], costs[: len(listed)], strict=True):
        cum += c.macs
        rows.append(
            StageRow(
                cut.name,
                list(cut.aliases[1:]),
                list(o.shape[1:]),
                c.macs,
                cum,
                cum / total,
                cut.name in reasons,
                reasons.get(cut.name, ""),
            )
        )
    return StagesReport(str(bb.spec), bb.family.name, bb.input_size, source, total, rows)


def _report_by_cost(bb: Backbone, listed: list[Cut], reasons: dict[str, str], source: str) -> StagesReport:
    """Rows from the per-cut costs the defaults were chosen by (so the table and the reasons agree)."""
    profile = bb.cut_costs()
    names = {c.name for c in listed} | set(reasons)
    aliases = {c.name: list(c.aliases[1:]) for c in bb.graph.cuts}
    rows, prev = [], 0
    for c in profile.cuts:
        if c.name not in names:
            continue
        rows.append(
            StageRow(
                c.name,
                aliases[c.name],
                list(c.shape),
                c.cumulative_macs - prev,
                c.cumulative_macs,
                c.fraction,
                c.name in reasons,
                reasons.get(c.name, ""),
            )
        )
        prev = c.cumulative_macs
    return StagesReport(str(bb.spec), bb.family.name, bb.input_size, source, profile.total_macs, rows)
