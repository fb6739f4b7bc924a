"""``GatedModel``: stage-by-stage execution where each sample leaves the batch at its own gate.

After each stage the open gate scores the surviving samples; those at or above the gate's threshold
are written to the output and removed from the batch (``index_select`` of the survivors), so no
later stage runs for them. Closed gates (threshold ``inf``) are skipped entirely, at no cost. The
only host synchronisation is one per open gate, to learn how many samples remain.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from .features import Pooling, pool
from .gates import gate_scores
from .thresholds import OperatingPoint, decode_threshold


def fuse_batchnorm(stage: nn.Module) -> nn.Module:
    """A copy of ``stage`` with each BatchNorm folded into the convolution before it (eval only).

    Fewer passes over memory; the outputs match the unfused stage to float rounding (about 1e-6).
    """
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(stage.eval())
    except Exception:  # a stage torch.fx cannot re-trace stays as it is
        return stage


class GatedOutput(NamedTuple):
    """Per-sample results of a :class:`GatedModel` forward pass.

    Attributes:
        logits: ``(N, K)``: the gate's outputs (distances or logits) for samples that left at a
            gate, the backbone's logits for the others.
        pred: ``(N,)`` predicted class.
        exit: ``(N,)`` exit index: ``g`` for gate ``g``, ``len(gates)`` for the backbone's head.
    """

    logits: torch.Tensor
    pred: torch.Tensor
    exit: torch.Tensor


class GatedModel(nn.Module):
    """A frozen backbone with decision gates that stop easy samples early.

    Args:
        stages: ``len(gates) + 1`` modules chaining to the backbone's ``model(x)``.
        weights, biases: per gate ``(K, D)`` and ``(K,)`` on raw pooled features.
        layouts: per gate, the stage output layout (``nchw``, ``nhwc``, ``nlc``, ``nc``).
        pooling: how each gate pools its stage output (one for all gates, or one per gate).
        thresholds: per gate; ``inf`` closes a gate.
        score: the exit rule (``max``, ``margin``, ``softmax``, ``entropy``).
        gate_names: position names, for display.
        reach_costs, gate_costs: MACs to reach each gate (then the whole backbone) and of each gate.
        frontier: stored operating points to switch to at run time.
        channels_last: run 4-d inputs in channels-last memory format.
        manifest: the exported manifest (classes, preprocessing, calibration report).

    Build one with :func:`dgate_cli.load`.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        weights: Sequence[torch.Tensor],
        biases: Sequence[torch.Tensor],
        layouts: Sequence[str],
        pooling: Pooling | Sequence[Pooling],
        thresholds: Sequence[float],
        score: str = "max",
        gate_names: Sequence[str] | None = None,
        reach_costs: Sequence[float] | None = None,
        gate_costs: Sequence[float] | None = None,
        frontier: Sequence[OperatingPoint] = (),
        channels_last: bool = False,
        manifest: dict[str, Any] | None = None,
    ):
        super().__init__()
        if not (len(stages) == len(weights) + 1 == len(biases) + 1 == len(layouts) + 1 == len(thresholds) + 1):
            raise ValueError(
                "GatedModel needs one more stage than gates, and one weight, bias, layout and threshold per gate"
            )
        self.stages = nn.ModuleList(stages)
        for i, (w, b) in enumerate(zip(weights, biases, strict=True)):
            self.register_buffer(f"gate{i}_weight", w.detach().float().clone())
            self.register_buffer(f"gate{i}_bias", b.detach().float().clone())
        self.layouts = list(layouts)
        self.poolings = [pooling] * len(layouts) if isinstance(pooling, Pooling) else list(pooling)
        if len(self.poolings) != len(layouts):
            raise ValueError("GatedModel needs one pooling per gate")
        self.score = score
        self.gate_names = list(gate_names or [f"gate{i}" for i in range(len(weights))])
        self.reach_costs = list(reach_costs) if reach_costs is not None else None
        self.gate_costs = list(gate_costs) if gate_costs is not None else None
        self.frontier = list(frontier)
        self.channels_last = channels_last
        self.manifest = manifest or {}
        self.thresholds: list[float] = []
        self.set_thresholds(thresholds)
        self.eval()

    @property
    def num_gates(self) -> int:
        return len(self.layouts)

    def gate_weight(self, i: int) -> torch.Tensor:
        return getattr(self, f"gate{i}_weight")

    def gate_bias(self, i: int) -> torch.Tensor:
        return getattr(self, f"gate{i}_bias")

    # -- operating point --------------------------------------------------------------------------
    def set_thresholds(self, thresholds: Sequence[float | str | None]) -> GatedModel:
        """Set the gates' thresholds (``inf`` or None closes a gate). Returns ``self``.

        Example:
            >>> model.set_thresholds([2.0, float("inf")])  # doctest: +SKIP
        """
        if len(thresholds) != self.num_gates:
            raise ValueError(f"expected {self.num_gates} thresholds (one per gate), got {len(thresholds)}")
        values = [decode_threshold(t) if not isinstance(t, float) else t for t in thresholds]
        if any(math.isnan(v) for v in values):
            raise ValueError("thresholds must be numbers or inf, not NaN")
        self.thresholds = values
        return self

    def use_operating_point(self, max_drop: float | None = None, index: int | None = None) -> OperatingPoint:
        """Switch to a stored frontier point: the cheapest whose promised accuracy (its calibration
        target) is within ``max_drop`` of the backbone's, or the point at ``index``. Returns it.

        Example:
            >>> model.use_operating_point(max_drop=0.005).cost_ratio  # doctest: +SKIP
            0.81
        """
        if not self.frontier:
            raise ValueError("this model has no stored frontier; set thresholds with set_thresholds()")
        if (max_drop is None) == (index is None):
            raise ValueError("give exactly one of max_drop and index")
        if index is not None:
            point = self.frontier[index]
        else:
            # promised accuracy (the point's target, else what it reached) within max_drop of the backbone's
            base = self.manifest.get("calibration", {}).get("backbone_accuracy")
            promise = [p.target if p.target is not None else p.accuracy for p in self.frontier]
            top = base if base is not None else max(promise)
            ok = [p for p, a in zip(self.frontier, promise, strict=True) if a >= top - max_drop - 1e-12]  # type: ignore[operator]
            if not ok:
                ok = [self.frontier[max(range(len(promise)), key=promise.__getitem__)]]
            point = min(ok, key=lambda p: p.mean_cost)
        self.set_thresholds(list(point.thresholds))
        return point

    def exit_costs(self) -> list[float]:
        """MACs of leaving at each exit under the current thresholds (closed gates cost nothing)."""
        if self.reach_costs is None or self.gate_costs is None:
            raise ValueError("this model carries no cost table")
        spent, out = 0.0, []
        for g in range(self.num_gates):
            if self.thresholds[g] < math.inf:
                spent += self.gate_costs[g]
            out.append(self.reach_costs[g] + spent)
        out.append(self.reach_costs[-1] + spent)
        return out

    # -- inference --------------------------------------------------------------------------------
    def gate_outputs(self, g: int, h: torch.Tensor) -> torch.Tensor:
        """Gate ``g``'s outputs ``(N, K)`` for stage output ``h``."""
        f = pool(h, self.poolings[g], self.layouts[g]).float()
        return torch.addmm(self.gate_bias(g), f, self.gate_weight(g).t())

    @torch.inference_mode()
    def forward(self, x: torch.Tensor) -> GatedOutput:
        """Run the gated network on a batch; samples leave at the first gate confident enough."""
        n = x.shape[0]
        device = x.device
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        logits: torch.Tensor | None = None
        pred = torch.empty(n, dtype=torch.long, device=device)
        exit_ = torch.full((n,), self.num_gates, dtype=torch.long, device=device)
        alive = torch.arange(n, device=device)
        h = x
        for g in range(self.num_gates):
            h = self.stages[g](h)
            t = self.thresholds[g]
            if t == math.inf:
                continue
            z = self.gate_outputs(g, h)
            if logits is None:
                logits = torch.empty(n, z.shape[1], dtype=z.dtype, device=device)
            s, p = gate_scores(z, self.score)
            leave = s >= t
            n_leave = int(leave.sum())  # the one host sync per open gate
            if n_leave == 0:
                continue
            gone = alive[leave]
            logits.index_copy_(0, gone, z[leave])
            pred.index_copy_(0, gone, p[leave])
            exit_.index_fill_(0, gone, g)
            if n_leave == alive.numel():
                return GatedOutput(logits, pred, exit_)
            stay = torch.nonzero(~leave).squeeze(1)
            alive = alive.index_select(0, stay)
            h = h.index_select(0, stay)
        out = self.stages[-1](h).float()
        if logits is None:
            logits = torch.empty(n, out.shape[1], dtype=out.dtype, device=device)
        logits.index_copy_(0, alive, out)
        pred.index_copy_(0, alive, out.argmax(1))
        return GatedOutput(logits, pred, exit_)

    @torch.inference_mode()
    def backbone_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's logits without gates: the same stages, chained (the baseline of ``dgate bench``)."""
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        for stage in self.stages:
            x = stage(x)
        return x.float()

    def extra_repr(self) -> str:
        gates = ", ".join(f"{n}@{t:.4g}" for n, t in zip(self.gate_names, self.thresholds, strict=True))
        pools = ", ".join(map(str, self.poolings))
        return f"gates=[{gates}], score={self.score}, pooling=[{pools}]"

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("classes", []))
