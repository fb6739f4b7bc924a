"""Model families: where gates may go and where they go by default.

A family is declared data: the module types it covers, the candidate gate positions (module names,
in execution order) and the default gates. Any module name that is a stage boundary works with
``--gates``; the candidates are the positions ``dgate stages`` lists (whole blocks, not every ReLU).
Models of no known family fall back to the generic rule: their top-level modules are the candidates,
and the default gates are chosen among *all* cut points by cost (:func:`spread_by_cost`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torchvision.models as tvm
from torch import nn

from ..errors import DgateError, SpecError
from ..gates.pooling import DEFAULT_BUDGET, PoolingPolicy, layout_of, pool
from .cifar_resnet import CifarResNet
from .flops import count_aten, count_thop
from .staging import StageGraph


@dataclass(frozen=True)
class Family:
    """What dgate knows about a family of models.

    Attributes:
        name: short family name, e.g. ``"resnet"``.
        types: the ``nn.Module`` classes of the family.
        candidates: model -> candidate gate positions (module names) in execution order.
        defaults: model -> default gate positions.
        channels_last: 4-d stage outputs are ``(N, H, W, C)`` (Swin) rather than ``(N, C, H, W)``.
    """

    name: str
    types: tuple[type, ...]
    candidates: Callable[[nn.Module], list[str]]
    defaults: Callable[[nn.Module], list[str]]
    channels_last: bool = False


def _children(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{n}" for n, _ in module.named_children()]


def _resnet_blocks(model: nn.Module, stages: list[str]) -> list[str]:
    return [name for s in stages for name in _children(getattr(model, s), s)]


def _cifar_resnet_candidates(m: nn.Module) -> list[str]:
    return _resnet_blocks(m, ["layer1", "layer2", "layer3"])[:-1]


def _thirds(m: nn.Module, stages: list[str]) -> list[str]:
    """The blocks ending each third of every stage; in the last stage the block before its end.

    CIFAR ResNet-56 (9 blocks a stage): layer1.2, layer1.5, layer1.8, ..., layer3.5, layer3.7. Gates
    inside stages, not only between them, let samples leave as soon as they are easy enough
    (measured in benchmarks/RESULTS.md).
    """
    names: list[str] = []
    for s_i, s in enumerate(stages):
        n = len(getattr(m, s))
        last = n - 2 if s_i == len(stages) - 1 else n - 1
        for idx in sorted({min(last, max(0, round(n * k / 3) - 1)) for k in (1, 2, 3)}):
            names.append(f"{s}.{idx}")
    return names


def _resnet_candidates(m: nn.Module) -> list[str]:
    return _resnet_blocks(m, ["layer1", "layer2", "layer3", "layer4"])[:-1]


def _densenet_candidates(m: nn.Module) -> list[str]:
    names = [f"features.{n}" for n, _ in m.features.named_children() if n.startswith(("denseblock", "transition"))]
    return names[:-1]


def _densenet_defaults(m: nn.Module) -> list[str]:
    return [n for n in _densenet_candidates(m) if ".denseblock" in n][:3]


def _before_downsampling(m: nn.Module) -> list[str]:
    """MobileNet-style: stage ends are the blocks before each block marked ``_is_cn`` (stride 2)."""
    feats = list(m.features.children())
    ends = [i - 1 for i, b in enumerate(feats) if getattr(b, "_is_cn", False) and i >= 2]
    return [f"features.{i}" for i in ends[-3:]]


def _mobilenet_candidates(m: nn.Module) -> list[str]:
    return [f"features.{i}" for i in range(1, len(m.features) - 1)]


def _efficientnet_defaults(m: nn.Module) -> list[str]:
    return ["features.2", "features.3", "features.5"]


def _efficientnet_candidates(m: nn.Module) -> list[str]:
    return [name for i in range(1, len(m.features) - 1) for name in _children(m.features[i], f"features.{i}")]


def _pairs_defaults(m: nn.Module) -> list[str]:
    return ["features.1", "features.3", "features.5"]


def _features_candidates(m: nn.Module) -> list[str]:
    return [f"features.{i}" for i in range(len(m.features) - 1)]


def _regnet_candidates(m: nn.Module) -> list[str]:
    blocks = list(m.trunk_output.named_children())
    return [f"trunk_output.{s}.{b}" for s, stage in blocks for b, _ in stage.named_children()][:-1]


def _regnet_defaults(m: nn.Module) -> list[str]:
    return [f"trunk_output.{s}" for s, _ in m.trunk_output.named_children()][:3]


def _vgg_candidates(m: nn.Module) -> list[str]:
    return [f"features.{i}" for i, layer in enumerate(m.features) if isinstance(layer, nn.MaxPool2d)][:-1]


def _vgg_defaults(m: nn.Module) -> list[str]:
    return _vgg_candidates(m)[1:4]


def _vit_candidates(m: nn.Module) -> list[str]:
    return [f"encoder.layers.{n}" for n, _ in m.encoder.layers.named_children()][:-1]


def _vit_defaults(m: nn.Module) -> list[str]:
    layers = [f"encoder.layers.{n}" for n, _ in m.encoder.layers.named_children()]
    q = len(layers) // 4
    return [layers[q - 1], layers[2 * q - 1], layers[3 * q - 1]] if q else layers[:1]


FAMILIES: list[Family] = []


def register(family: Family) -> Family:
    """Add a family to the registry (later registrations take precedence for overlapping types)."""
    if any(f.name == family.name for f in FAMILIES):
        raise ValueError(f"family {family.name!r} is already registered")
    if not family.types:
        raise ValueError(f"family {family.name!r} declares no module types")
    FAMILIES.insert(0, family)
    return family


def _fixed(names: list[str]) -> Callable[[nn.Module], list[str]]:
    return lambda m: list(names)


register(
    Family(
        "cifar_resnet", (CifarResNet,), _cifar_resnet_candidates, lambda m: _thirds(m, ["layer1", "layer2", "layer3"])
    )
)
register(Family("resnet", (tvm.ResNet,), _resnet_candidates, _fixed(["layer1", "layer2", "layer3"])))
register(Family("densenet", (tvm.DenseNet,), _densenet_candidates, _densenet_defaults))
register(Family("mobilenet", (tvm.MobileNetV2, tvm.MobileNetV3), _mobilenet_candidates, _before_downsampling))
register(Family("efficientnet", (tvm.EfficientNet,), _efficientnet_candidates, _efficientnet_defaults))
register(Family("regnet", (tvm.RegNet,), _regnet_candidates, _regnet_defaults))
register(Family("convnext", (tvm.ConvNeXt,), _features_candidates, _pairs_defaults))
register(Family("swin", (tvm.SwinTransformer,), _features_candidates, _pairs_defaults, channels_last=True))
register(Family("vgg", (tvm.VGG,), _vgg_candidates, _vgg_defaults))
register(Family("vit", (tvm.VisionTransformer,), _vit_candidates, _vit_defaults))


def _demo_candidates(m: nn.Module) -> list[str]:
    return [name for s in ("stage1", "stage2", "stage3") for name in _children(getattr(m, s), s)][:-1]


def _register_demo() -> None:
    from .demo_cnn import DemoCNN

    register(Family("demo_cnn", (DemoCNN,), _demo_candidates, _demo_candidates))


_register_demo()

GENERIC = Family("generic", (nn.Module,), lambda m: [n for n, _ in m.named_children()][:-1], lambda m: [])


def family_of(model: nn.Module) -> Family:
    """Return the registered family of ``model`` (its exact or a parent class), else the generic one."""
    for family in FAMILIES:
        if isinstance(model, family.types):
            return family
    return GENERIC


# -- models without declared defaults: gates spread over the network by cost -------------------------

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
