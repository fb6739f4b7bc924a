"""``GatedModel``: a frozen backbone with exit gates, run step by step with per-sample exits.

The model runs its plan (:mod:`.plan`): each step's module on the samples still in the batch, then,
where the step ends in an open gate, the gate's decision (:mod:`.decisions`); the samples that leave
are set aside and the others are indexed out, so no later step runs for them. Results are put back
in input order at the end. Closed gates (threshold ``inf``) cost nothing.

:meth:`GatedModel.forward` and the throughput mode :meth:`GatedModel.stream` run the same step
function, :meth:`GatedModel._advance`: one exit loop. What a run returns is in :mod:`.outputs`,
the stream's queues in :mod:`.streaming`, choosing thresholds in :mod:`.operating_point`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from dgate_cli.gates.pooling import Pooling
    >>> stages = [nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))]
    >>> model = GatedModel(stages, [torch.zeros(2, 4)], [torch.tensor([1.0, 0.0])], ["nchw"], Pooling(), [0.5])
    >>> model(torch.randn(3, 3, 8, 8)).exit.tolist()  # a margin of 1.0 >= 0.5: everyone leaves at gate 0
    [0, 0, 0]
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from ..data.preprocess import Preprocess
from ..gates.pooling import Pooling
from ..gates.scores import average_probabilities
from ..thresholds.cost import CostModel
from ..thresholds.outcomes import OperatingPoint
from .decisions import Backend, Decision, decide
from .operating_point import parse_thresholds, pick_point
from .outputs import GatedOutput, Left, assemble
from .plan import Gate, Policy, Step, linear_plan
from .streaming import StepQueues

__all__ = ["Chain", "GatedModel", "GatedOutput"]


class _Scheduled(NamedTuple):
    """One step as a forward pass runs it: its module, its gate (None: the last step) and threshold."""

    module: nn.Module
    gate: int | None
    threshold: float
    source: str
    remember: bool = False
    ensemble: bool = False


class GatedModel(nn.Module):
    """A frozen backbone with decision gates that stop easy samples early.

    Args:
        stages: ``len(gates) + 1`` modules chaining to the backbone's ``model(x)``.
        weights, biases: per gate ``(K, D)`` and ``(K,)`` on raw pooled features.
        layouts: per gate, the stage output layout (``nchw``, ``nhwc``, ``nlc``, ``nc``).
        pooling: how each gate pools its stage output (one for all gates, or one per gate).
        thresholds: per gate; ``inf`` closes a gate.
        score: the exit rule (``max``, ``margin``, ``softmax``, ``entropy``), or one per gate.
        gate_names: position names, for display.
        reach_costs, gate_costs: MACs to reach each gate (then the whole backbone) and of each gate.
        frontier: stored operating points to switch to at run time.
        channels_last: run 4-d inputs in channels-last memory format.
        manifest: the exported manifest (classes, preprocessing, calibration report).
        plan: the steps (default: each stage after the previous one, gate ``g`` after stage ``g``).
        preprocess: how images become inputs (:attr:`preprocess`).
        policies: per gate, a learned exit policy whose score replaces the rule's (None: the rule).
        reference_cost: what cost ratios are against (a cascade: its last member alone).

    Build one from an export with :func:`dgate_cli.load`.
    """

    def __init__(
        self,
        stages: Sequence[nn.Module],
        weights: Sequence[torch.Tensor],
        biases: Sequence[torch.Tensor],
        layouts: Sequence[str],
        pooling: Pooling | Sequence[Pooling],
        thresholds: Sequence[float | str | None],
        score: str | Sequence[str] = "max",
        gate_names: Sequence[str] | None = None,
        reach_costs: Sequence[float] | None = None,
        gate_costs: Sequence[float] | None = None,
        frontier: Sequence[OperatingPoint] = (),
        channels_last: bool = False,
        manifest: dict[str, Any] | None = None,
        plan: Sequence[Step] | None = None,
        preprocess: Preprocess | None = None,
        policies: Sequence[Policy | None] | None = None,
        reference_cost: float | None = None,
    ):
        super().__init__()
        poolings = [pooling] * len(layouts) if isinstance(pooling, Pooling) else list(pooling)
        if not (len(stages) == len(weights) + 1 == len(biases) + 1 == len(layouts) + 1 == len(poolings) + 1):
            raise ValueError(
                "GatedModel needs one more stage than gates, and one weight, bias, layout and pooling per gate"
            )
        self.stages = nn.ModuleList(stages)
        self.gates = nn.ModuleList(
            Gate(w, b, p, lay) for w, b, p, lay in zip(weights, biases, poolings, layouts, strict=True)
        )
        self.gate_names = list(gate_names or [f"gate{i}" for i in range(len(weights))])
        self.plan = list(plan) if plan is not None else linear_plan(self.gate_names)
        self.rules = [score] * len(self.gates) if isinstance(score, str) else list(score)
        self.score = score if isinstance(score, str) else (self.rules[0] if self.rules else "max")
        self.policies = nn.ModuleList(
            p if p is not None else nn.Identity() for p in (policies or [None] * len(self.gates))
        )
        if len(self.rules) != len(self.gates) or len(self.policies) != len(self.gates):
            raise ValueError("GatedModel needs one exit rule and one policy (or None) per gate")
        self.cost = (
            CostModel(reach_costs, gate_costs, reference=reference_cost)
            if reach_costs is not None and gate_costs is not None
            else None
        )
        self.frontier = list(frontier)
        self.channels_last = channels_last
        self.manifest = manifest or {}
        self.preprocess = preprocess or Preprocess.from_dict(self.manifest.get("preprocess", {}))
        self.backends: list[Backend] = []  # faster decisions where they apply (see load())
        self._thresholds: list[float] = []
        self.thresholds = thresholds  # type: ignore[assignment]
        self.eval()

    # -- what the model is ---------------------------------------------------------------------------
    @property
    def num_gates(self) -> int:
        return len(self.gates)

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("classes", []))

    @property
    def reach_costs(self) -> list[float] | None:
        return list(self.cost.reach) if self.cost else None

    @property
    def gate_costs(self) -> list[float] | None:
        return list(self.cost.gates) if self.cost else None

    def transforms(self) -> Preprocess:
        """The model's preprocessing, as torchvision's ``weights.transforms()``: call it on a PIL
        image or a ``uint8`` tensor to get the normalised input."""
        return self.preprocess

    # -- operating point -----------------------------------------------------------------------------
    def set_thresholds(self, thresholds: Sequence[float | str | None]) -> GatedModel:
        """Set the gates' thresholds (``inf``, ``"inf"`` or None closes a gate). Returns ``self``.

        Example:
            >>> model.set_thresholds([2.0, float("inf")])  # doctest: +SKIP
        """
        self.thresholds = thresholds  # type: ignore[assignment]
        return self

    @property
    def thresholds(self) -> list[float]:
        """Per gate, the threshold its exit score must reach (``inf``: closed). A copy: change
        them with :meth:`set_thresholds` or by assigning a whole list (both are checked, and
        rounded to float32, in which the runtime compares)."""
        return list(self._thresholds)

    @thresholds.setter
    def thresholds(self, values: Sequence[float | str | None]) -> None:
        self._thresholds = parse_thresholds(values, self.num_gates)

    def use_operating_point(self, max_drop: float | None = None, index: int | None = None) -> OperatingPoint:
        """Switch to a stored frontier point: the cheapest whose promised accuracy (its calibration
        target) is within ``max_drop`` of the backbone's, or the point at ``index``. Returns it.

        Example:
            >>> model.use_operating_point(max_drop=0.005).cost_ratio  # doctest: +SKIP
            0.81
        """
        point = pick_point(self.frontier, self.manifest.get("calibration", {}), self.cost, max_drop, index)
        self.set_thresholds(list(point.thresholds))
        return point

    def exit_costs(self) -> list[float]:
        """Cost of leaving at each exit under the current thresholds (closed gates cost nothing)."""
        if self.cost is None:
            raise ValueError("this model carries no cost table")
        return self.cost.exit_costs(self.cost.open_for(self._thresholds)).tolist()

    # -- inference -----------------------------------------------------------------------------------
    def gate_outputs(self, g: int, h: torch.Tensor) -> torch.Tensor:
        """Gate ``g``'s outputs ``(N, K)`` (float32) for stage output ``h``."""
        return self.gates[g](h)

    def forward(self, x: torch.Tensor) -> GatedOutput:
        """Run the gated network on a batch; samples leave at the first gate confident enough."""
        if not torch.is_inference_mode_enabled():
            with torch.inference_mode():
                return self.forward(x)
        x = self._prepare(x)
        left: list[Left] = []
        h: torch.Tensor | None = x
        rows = None  # every input row, in order, until the first sample leaves
        memory: tuple[torch.Tensor, ...] = ()
        for step in self._schedule():
            h, rows, memory, done = self._advance(step, h, rows, x, memory)  # type: ignore[arg-type]
            left += done
            if h is None:
                break
        return assemble(x.shape[0], left, x.device)

    def _schedule(self) -> list[_Scheduled]:
        """The plan with each step's module and its gate's current threshold (``inf``: closed)."""
        return [
            _Scheduled(
                stage,
                step.gate,
                math.inf if step.gate is None else self._thresholds[step.gate],
                step.source,
                step.remember,
                step.ensemble,
            )
            for stage, step in zip(self.stages, self.plan, strict=True)
        ]

    def _advance(
        self,
        step: _Scheduled,
        h: torch.Tensor,
        rows: torch.Tensor | None,
        x: torch.Tensor | None,
        memory: tuple[torch.Tensor, ...] = (),
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, tuple[torch.Tensor, ...], list[Left]]:
        """Run one step on ``rows`` (None: every row of the input, in order; ``h``: the previous
        step's output for them; ``x``: the original input, for steps that start from it;
        ``memory``: the answers earlier steps remembered for them, as softmax probabilities).
        Returns what goes on (outputs, or None when nobody does, their rows and their memory)
        and who left."""
        if step.source == "input":
            h = x if rows is None else x[rows]  # type: ignore[index,assignment]
        h = step.module(h)
        before = memory
        if step.remember or step.ensemble:
            p = torch.softmax(h.float(), 1)
            if step.ensemble:
                h = average_probabilities((*memory, p))
            if step.remember:
                memory = (*memory, p)
        if step.gate is None:  # the last step answers for everyone left
            out = h.float()
            return None, None, (), [Left(self.num_gates, rows, out, out.argmax(1))]
        if step.threshold == math.inf:  # closed
            return h, rows, memory, []
        d = self._decide(step.gate, h, step.threshold, before)
        n = h.shape[0]
        if d.count == 0:
            return h, rows, memory, []
        if d.count == n:
            return None, None, (), [Left(step.gate, rows, d.outputs, d.pred)]
        gone = torch.nonzero(d.leave).squeeze(1)  # the one host synchronisation per open gate
        if not gone.numel():
            return h, rows, memory, []
        if gone.numel() == n:
            return None, None, (), [Left(step.gate, rows, d.outputs, d.pred)]
        if rows is None:
            rows = torch.arange(n, device=h.device)
        stay = torch.nonzero(~d.leave).squeeze(1)
        done = [Left(step.gate, rows[gone], d.outputs[gone], d.pred[gone])]  # type: ignore[index]
        # indexing keeps a channels-last output channels-last
        return h[stay], rows[stay], tuple(m[stay] for m in memory), done

    def _decide(self, g: int, h: torch.Tensor, threshold: float, memory: tuple[torch.Tensor, ...] = ()) -> Decision:
        policy = self.policies[g]
        if isinstance(policy, Policy):  # a learned policy's score, on the gate's outputs and the memory
            z = self.gates[g](h)
            return Decision(z, policy(z, memory) >= threshold, z.argmax(1))
        for backend in self.backends:
            d = backend.decide(g, self.gates[g], h, threshold, self.rules[g])
            if d is not None:
                return d
        return decide(self.gates[g], h, threshold, self.rules[g])

    def _prepare(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last and x.dim() == 4:
            return x.contiguous(memory_format=torch.channels_last)
        return x

    @torch.inference_mode()
    def stream(
        self, batches: Iterable[torch.Tensor], batch_size: int | None = None
    ) -> Iterator[tuple[torch.Tensor, GatedOutput]]:
        """Run a stream of input batches with every step's batch kept full (throughput mode).

        In :meth:`forward` the later stages run on what is left of one batch. Here the survivors
        of each gate wait until ``batch_size`` of them (default: the first input batch's size) are
        there, from as many input batches as it takes; the rest is flushed when the inputs run out.
        Decisions are those of :meth:`forward` up to float rounding. For offline scoring: a sample's
        result may come several input batches later.

        Yields:
            ``(index, output)`` as samples finish: ``index`` ``(n,)`` are positions in the stream
            (0 is the first sample of the first batch), in no particular order.

        Example:
            >>> for index, out in model.stream(loader_batches):  # doctest: +SKIP
            ...     preds[index] = out.pred
        """
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be a positive number of samples, got {batch_size}")
        if any(step.source == "input" or step.remember or step.ensemble for step in self.plan[1:]):
            raise ValueError("stream() runs single networks (no cascades); use forward()")
        queues = StepQueues(len(self.plan))
        offset = 0
        for x in batches:
            if x.shape[0] == 0:
                continue
            caller = x.untyped_storage().data_ptr()
            x = self._prepare(x)
            batch_size = batch_size or x.shape[0]
            queues.put(0, x, torch.arange(offset, offset + x.shape[0], device=x.device))
            offset += x.shape[0]
            yield from self._drain(queues, batch_size, flush=False)
            # inputs still waiting are copied: the caller may refill its buffer for the next batch
            queues.copy_inputs_in(caller)
        yield from self._drain(queues, batch_size or 1, flush=True)

    def _drain(self, queues: StepQueues, size: int, flush: bool) -> Iterator[tuple[torch.Tensor, GatedOutput]]:
        """Drain ``queues``, each step run by :meth:`_advance` at the current thresholds."""
        schedule = self._schedule()

        def advance(k: int, h: torch.Tensor, index: torch.Tensor) -> Any:
            h, index, _, done = self._advance(schedule[k], h, index, None)
            return h, index, done

        return queues.drain(advance, size, flush)

    def backbone_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's logits without gates: the same stages, chained."""
        return self.backbone()(x)

    def backbone(self) -> Chain:
        """The backbone without gates as a module sharing these stages: ``model.backbone()(x)``
        gives its logits. The baseline of ``dgate bench``, called as the gated model is. In a
        cascade, the reference: its last network alone (the steps from the last that starts from
        the input)."""
        return self.member(len(self.members()) - 1)

    def members(self) -> list[tuple[int, int]]:
        """The networks the plan runs, as ``(first, end)`` step ranges: one for a single network,
        one per member for a cascade (each starts from the input)."""
        starts = [0] + [i for i, step in enumerate(self.plan) if i and step.source == "input"]
        return list(zip(starts, [*starts[1:], len(self.plan)], strict=True))

    def exit_members(self) -> list[int]:
        """Per exit (each gate, then the end), the network of the plan it is in (see :meth:`members`)."""
        owner = [k for k, (first, end) in enumerate(self.members()) for _ in range(first, end)]
        out = [0] * (self.num_gates + 1)
        for i, step in enumerate(self.plan):
            out[self.num_gates if step.gate is None else step.gate] = owner[i]
        return out

    def member(self, k: int) -> Chain:
        """Network ``k`` of the plan alone (see :meth:`members`), without gates, as a module."""
        first, end = self.members()[k]
        stages = self.stages if (first, end) == (0, len(self.plan)) else nn.ModuleList(self.stages[first:end])
        return Chain(stages, self.channels_last)

    def extra_repr(self) -> str:
        gates = ", ".join(f"{n}@{t:.4g}" for n, t in zip(self.gate_names, self._thresholds, strict=True))
        return f"gates=[{gates}], score={self.score}"


class Chain(nn.Module):
    """Stages chained without gates (see :meth:`GatedModel.backbone`); returns float32 logits."""

    def __init__(self, stages: nn.ModuleList, channels_last: bool = False):
        super().__init__()
        self.stages = stages
        self.channels_last = channels_last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_inference_mode_enabled():
            with torch.inference_mode():
                return self.forward(x)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        for stage in self.stages:
            x = stage(x)
        return x.float()
