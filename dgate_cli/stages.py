"""``dgate stages``: the candidate gate positions of a model, with output shapes and costs."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch

from .flops import UNIT, stage_costs
from .models import build_backbone
from .models.staging import run_stages


@dataclass(frozen=True)
class StageRow:
    """One candidate gate position.

    Attributes:
        name: canonical module name (use it with ``--gates``).
        aliases: other module names for the same position.
        shape: output shape of one sample.
        macs: MACs of the stage ending here (since the previous listed position).
        cumulative_macs: MACs from the input to here.
        fraction: ``cumulative_macs`` / the whole model's MACs.
        default: whether the position is one of the family's default gates.
    """

    name: str
    aliases: list[str]
    shape: list[int]
    macs: int
    cumulative_macs: int
    fraction: float
    default: bool


@dataclass(frozen=True)
class StagesReport:
    model: str
    family: str
    input_size: int
    total_macs: int
    rows: list[StageRow]
    unit: str = UNIT

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "rows": [asdict(r) for r in self.rows]}


def list_stages(
    model: str,
    weights: str | None = None,
    model_kwargs: dict | str | None = None,
    input_size: int | None = None,
    all_cuts: bool = False,
) -> StagesReport:
    """List candidate gate positions (``all_cuts``: every stage boundary) with shapes and cumulative MACs.

    Example:
        >>> r = list_stages("cifar_resnet20")
        >>> [row.name for row in r.rows if row.default]
        ['layer1', 'layer2']
    """
    bb = build_backbone(model, weights=weights, model_kwargs=model_kwargs, input_size=input_size)
    cuts = bb.graph.cuts if all_cuts else (bb.candidate_cuts() or bb.graph.cuts)
    defaults = set(bb.default_gates())
    stages = bb.graph.split(cuts)
    x = torch.zeros(1, 3, bb.input_size, bb.input_size)
    with torch.inference_mode():
        outs = run_stages(stages, x)
    costs = stage_costs(stages, x)
    total = sum(c.macs for c in costs)
    rows, cum = [], 0
    for cut, o, c in zip(cuts, outs[: len(cuts)], costs[: len(cuts)], strict=True):
        cum += c.macs
        rows.append(
            StageRow(cut.name, list(cut.aliases[1:]), list(o.shape[1:]), c.macs, cum, cum / total, cut.name in defaults)
        )
    return StagesReport(str(bb.spec), bb.family.name, bb.input_size, total, rows)
