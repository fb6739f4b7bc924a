"""Cost of each stage and each gate, in MACs (multiply-accumulates) per sample.

Stages are counted twice: with ``thop`` (module hooks; counts convolutions, linear layers, norms,
pooling) and with :class:`torch.utils.flop_counter.FlopCounterMode` (aten level: convolutions and
matrix products only, FLOPs / 2 = MACs). thop misses work done outside leaf modules, such as
attention through ``F.linear`` in ViT, and the aten count misses elementwise work, so each stage
costs the larger of the two. Both are recorded. A gate costs its pooling (one read of the stage
output per pooled view) plus its linear layer (features x classes MACs plus a bias per class).
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

UNIT = "MACs"


@dataclass(frozen=True)
class StageCost:
    """MACs per sample of one stage.

    Attributes:
        thop: thop's count.
        aten: the aten-level count (convolutions and matrix products).
        macs: the cost used, ``max(thop, aten)``.
    """

    thop: int
    aten: int
    macs: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


@contextlib.contextmanager
def _no_mha_fastpath():
    setter = getattr(torch.backends.mha, "set_fastpath_enabled", None)
    getter = getattr(torch.backends.mha, "get_fastpath_enabled", None)
    old = getter() if getter else None
    if setter:
        setter(False)  # the fused kernel hides its matrix products from the counter
    try:
        yield
    finally:
        if setter and old is not None:
            setter(old)


def count_thop(module: nn.Module, x: torch.Tensor) -> int:
    """MACs per sample by thop, profiling a deep copy (thop leaves buffers in what it profiles)."""
    clone = copy.deepcopy(module)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), torch.no_grad():
        warnings.simplefilter("ignore")
        import thop  # here: it imports distutils, warns and prints on import in some versions

        macs, _params = thop.profile(clone, inputs=(x,), verbose=False)
    return int(round(float(macs) / x.shape[0]))


def count_aten(module: nn.Module, x: torch.Tensor) -> int:
    """MACs per sample at the aten level (FLOPs / 2)."""
    with _no_mha_fastpath(), FlopCounterMode(display=False) as counter, torch.no_grad():
        module(x)
    return int(counter.get_total_flops() // 2 // x.shape[0])


def stage_costs(stages: Sequence[nn.Module], example: torch.Tensor) -> list[StageCost]:
    """Cost of each stage, counted on the output of the previous one (batch of one sample).

    Example:
        >>> import torchvision
        >>> from dgate_cli.models.staging import StageGraph
        >>> g = StageGraph(torchvision.models.resnet18(), "resnet18")
        >>> costs = stage_costs(g.split(g.resolve(["layer2"])), torch.zeros(1, 3, 224, 224))
        >>> round(sum(c.aten for c in costs) / 1e9, 3)  # torchvision's published 1.814 GMACs
        1.814
    """
    costs = []
    x = example[:1]
    for stage in stages:
        t, a = count_thop(stage, x), count_aten(stage, x)
        costs.append(StageCost(thop=t, aten=a, macs=max(t, a)))
        with torch.no_grad():
            x = stage(x)
    return costs


def gate_macs(pooled_input_macs: int, features: int, classes: int) -> int:
    """MACs per sample of one gate: its pooling, ``features x classes`` products and the bias."""
    return int(pooled_input_macs + features * classes + classes)


def human(macs: float) -> str:
    """Format a MAC count: ``125.5 M``, ``4.09 G``."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(float(f"{macs:.4g}")) >= scale:
            return f"{macs / scale:.4g} {unit}"
    return f"{macs:.0f} "
