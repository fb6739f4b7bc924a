"""Default gates for models whose family declares none, chosen by cost.

:func:`profile_cuts` counts the MACs up to every cut point and the features a gate there would
read; :func:`spread_by_cost` picks about one cut every ``1/9`` of the MACs from that profile.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from ..errors import DgateError, SpecError
from ..gates.pooling import DEFAULT_BUDGET, PoolingPolicy, layout_of, pool
from .flops import count_aten, count_thop
from .staging import StageGraph

SPREAD = 9
"""Default gates aim at every ``1/SPREAD`` of the MACs, as the CIFAR ResNet-56 defaults do (9 gates
spread over its 27 blocks)."""
END_FRACTION = 1 - 1 / (2 * SPREAD)
"""Cuts above this cumulative fraction of the MACs (17/18, 94.4%) are never default gates: they are
nearer the end of the network (9/9) than the last target (8/9), and a gate there saves at most 5.6%."""


@dataclass(frozen=True)
class CutCost:
    """Where one cut point sits in a model's cost, and what a gate there would read.

    Attributes:
        name: the cut's canonical module name.
        order: the cut's position in execution order.
        shape: the stage output's shape for one sample.
        macs: MACs from the previous cut point to this one.
        cumulative_macs: MACs from the input to here.
        fraction: ``cumulative_macs`` / the whole model's MACs.
        features: the gate's feature length under ``auto`` pooling at the default budget (None: the
            output cannot be pooled).
        unpoolable: why the output cannot be pooled ("" when it can).
    """

    name: str
    order: int
    shape: tuple[int, ...]
    macs: int
    cumulative_macs: int
    fraction: float
    features: int | None
    unpoolable: str = ""


@dataclass(frozen=True)
class CostProfile:
    """Every cut point of a model with its cost, at one input size.

    Attributes:
        cuts: one :class:`CutCost` per cut point, in execution order.
        total_macs: MACs of the whole model (the head after the last cut included).
        input_size: the square input size counted at.
    """

    cuts: list[CutCost]
    total_macs: int
    input_size: int


@dataclass(frozen=True)
class DefaultGate:
    """A default gate position and why it was chosen.

    Attributes:
        name: the cut's canonical module name.
        reason: one line, e.g. ``"nearest cut to 2/9 of the MACs (19.5%)"`` or ``"family default (resnet)"``.
        targets: for a position chosen by cost, the ``k`` of each ``k/9`` target it is nearest to.
        fraction: for a position chosen by cost, its cumulative fraction of the MACs.
    """

    name: str
    reason: str
    targets: tuple[int, ...] = ()
    fraction: float | None = None


def _features(x: torch.Tensor, channels_last: bool, budget: int) -> tuple[int | None, str]:
    layout = layout_of(x, channels_last)
    if layout == "unsupported":
        return None, f"its {x.dim()}-d output cannot be pooled"
    try:
        feats = pool(x, PoolingPolicy(budget=budget).for_stage(tuple(x.shape[1:]), layout), layout)
    except DgateError:
        return None, f"its {'x'.join(map(str, x.shape[1:]))} output cannot be pooled automatically"
    return int(feats.shape[1]), ""


def profile_cuts(
    graph: StageGraph, example: torch.Tensor, channels_last: bool = False, budget: int = DEFAULT_BUDGET
) -> CostProfile:
    """Count the cost up to every cut point of ``graph``, and the gate features each would give.

    The model is split at every cut and each stage counted as :func:`dgate_cli.flops.stage_costs`
    counts it (the larger of thop's and the aten-level count), on one sample of ``example``'s size,
    with two passes over the model in all (thop's, and the aten count's, which also gives each output).

    Raises:
        SpecError: the model cannot run on ``example``.

    Example:
        >>> import torchvision
        >>> g = StageGraph(torchvision.models.resnet18(), "resnet18")
        >>> p = profile_cuts(g, torch.zeros(1, 3, 64, 64))
        >>> p.cuts[-1].name, p.cuts[-1].features, round(p.cuts[-1].fraction, 3)
        ('avgpool', 512, 0.997)
    """
    x = example[:1]
    rows: list[CutCost] = []
    cum = 0
    for cut, stage in zip([*graph.cuts, None], graph.split(graph.cuts), strict=True):
        outs: list[torch.Tensor] = []
        hook = stage.register_forward_hook(lambda _m, _i, out, outs=outs: outs.append(out))
        try:
            aten = count_aten(stage, x)  # its forward also gives the stage output (the hook)
        except Exception as exc:  # whatever the user's model raises on an input of the wrong size
            size = "x".join(map(str, example.shape[1:]))
            detail = " ".join(str(exc).split())[:200]
            raise SpecError(
                f"{graph.model_name} cannot run on a {size} input to count its cost ({type(exc).__name__}: {detail}); "
                "give the input size it expects (--input-size or --data), or name the gates with --gates"
            ) from exc
        finally:
            hook.remove()
        macs = max(count_thop(stage, x), aten)
        cum += macs
        x = outs[0]
        if cut is not None:  # pooled now: the next stage may change x in place
            feats, why = _features(x, channels_last, budget)
            rows.append(CutCost(cut.name, cut.order, tuple(x.shape[1:]), macs, cum, 0.0, feats, why))
    total = cum
    rows = [replace(r, fraction=r.cumulative_macs / max(1, total)) for r in rows]
    return CostProfile(rows, total, int(example.shape[-1]))


def excluded_because(cut: CutCost, budget: int = DEFAULT_BUDGET, end: float = END_FRACTION) -> str:
    """Why ``cut`` cannot be a default gate ("" when it can): unpoolable, over ``budget``, no MACs
    before it, or later than ``end`` (a cumulative fraction of the MACs)."""
    if cut.features is None:
        return cut.unpoolable or "its output cannot be pooled"
    if cut.features > budget:
        return f"its {cut.features} features exceed the {budget}-feature budget"
    if cut.cumulative_macs == 0:
        return "no MACs before it: a gate there reads the input"
    if cut.fraction > end:
        return f"at {cut.fraction:.1%} of the MACs a gate saves at most {1 - cut.fraction:.1%}"
    return ""


def _ninths(ks: Sequence[int], parts: int) -> str:
    """``[1, 2, 3, 5]`` -> ``"1/9-3/9 and 5/9"``: runs of three or more targets as a range."""
    runs: list[list[int]] = []
    for k in ks:
        if runs and k == runs[-1][-1] + 1:
            runs[-1].append(k)
        else:
            runs.append([k])
    names: list[str] = []
    for run in runs:
        if len(run) >= 3:
            names.append(f"{run[0]}/{parts}-{run[-1]}/{parts}")
        else:
            names += [f"{k}/{parts}" for k in run]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def spread_by_cost(cuts: Sequence[CutCost], parts: int = SPREAD, budget: int = DEFAULT_BUDGET) -> list[DefaultGate]:
    """Default gates spread over a network by cost: about one every ``1/parts`` of its MACs.

    The rule: for each target ``k/parts`` of the MACs (``k = 1 .. parts-1``), the eligible cut whose
    cumulative fraction is nearest to it (ties: the later cut, after free operations such as a
    ReLU); a cut nearest to several targets is one gate. A cut is eligible when its output pools (``auto``) to at most ``budget`` features,
    at least one MAC comes before it, and its cumulative fraction is at most ``1 - 1/(2 parts)``
    (17/18 = 94.4% for ninths: nearer the last target than the end, where a gate saves nothing).
    Two gates closer than a quarter step (``1/(4 parts)``, 1/36 = 2.8% of the MACs: a convolution
    and its norm layer) are one: the one nearer its own target stays. So a model gets at most
    ``parts - 1`` gates; one with few cut points fewer, one with no eligible cut none.

    Example:
        >>> cuts = [CutCost(f"c{i}", i, (8, 4, 4), 10, 10 * (i + 1), (i + 1) / 10, 128) for i in range(10)]
        >>> [(g.name, g.targets) for g in spread_by_cost(cuts)][:3]
        [('c0', (1,)), ('c1', (2,)), ('c2', (3,))]
        >>> spread_by_cost(cuts)[-1].reason
        'nearest cut to 8/9 of the MACs (90.0%)'
    """
    step = 1 / parts
    end = 1 - step / 2
    ok = [c for c in cuts if not excluded_because(c, budget, end)]
    if not ok:
        return []
    ok_names = {c.name for c in ok}
    # cuts left out for their output only: named in the reason when nearer a target than the cut taken
    left_out = [c for c in cuts if c.cumulative_macs > 0 and c.fraction <= end and c.name not in ok_names]
    # ties: the later cut (equal cost, so what ran in between was free: a ReLU after its convolution)
    nearest = {k: min(ok, key=lambda c, t=k / parts: (abs(c.fraction - t), -c.order)) for k in range(1, parts)}
    groups: dict[str, tuple[CutCost, list[int], list[str]]] = {}  # cut name -> (cut, its targets, notes)
    for k, cut in nearest.items():
        _, ks, notes = groups.setdefault(cut.name, (cut, [], []))
        ks.append(k)
        for c in sorted(left_out, key=lambda c: (abs(c.fraction - k / parts), c.order))[:1]:
            note = f"not the nearer {c.name}: {excluded_because(c, budget, end)}"
            if abs(c.fraction - k / parts) < abs(cut.fraction - k / parts) and note not in notes:
                notes.append(note)

    def miss(gate: tuple[CutCost, list[int], list[str]]) -> float:
        return min(abs(gate[0].fraction - k / parts) for k in gate[1])

    gates: list[tuple[CutCost, list[int], list[str]]] = []
    for gate in sorted(groups.values(), key=lambda g: g[0].order):
        if gates and gate[0].fraction - gates[-1][0].fraction < step / 4:  # one gate: the nearer its target stays
            keep, drop = (gate, gates[-1]) if miss(gate) < miss(gates[-1]) else (gates[-1], gate)
            keep[2].append(
                f"{_ninths(drop[1], parts)}'s nearest cut, {drop[0].name} ({drop[0].fraction:.1%}), "
                f"is within 1/{4 * parts} of it"
            )
            gates[-1] = keep
        else:
            gates.append(gate)
    out = []
    for cut, ks, notes in gates:
        reason = "; ".join([f"nearest cut to {_ninths(ks, parts)} of the MACs ({cut.fraction:.1%})", *notes])
        out.append(DefaultGate(cut.name, reason, tuple(ks), cut.fraction))
    return out
