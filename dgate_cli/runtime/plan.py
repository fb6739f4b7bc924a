"""A gated model's execution plan: steps, each a module run on the surviving samples, and exit heads.

A plan is a list of :class:`Step`. Each step runs one module on the rows still in the batch; its
input is the previous step's output (``source="previous"``: the next stage of a network) or the
original input (``source="input"``: for instance the first stage of another network of a cascade).
A step may end in a :class:`Gate`, after which the samples it is sure about leave; the last step
gives everyone left the final answer. The runtime (:class:`~dgate_cli.runtime.model.GatedModel`)
runs every plan with the same loop, so a new kind of step is a new ``kind`` in the manifest and a
builder in :data:`STEP_KINDS` that turns its manifest entry into a :class:`Step`.

Example:
    >>> import torch
    >>> from torch import nn
    >>> from dgate_cli.gates.pooling import Pooling
    >>> gate = Gate(torch.zeros(3, 4), torch.tensor([1.0, 0.0, 0.0]), Pooling((1,)), "nchw")
    >>> gate(torch.ones(2, 4, 8, 8)).tolist()
    [[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..errors import ManifestError
from ..gates.policy import FEATURES_PER_EXIT, FEATURES_PER_MEMBER, exit_features
from ..gates.pooling import Pooling, pool

SOURCES = ("previous", "input")


class Gate(nn.Module):
    """An exit head: pool a stage output, then one linear layer on the pooled features.

    Args:
        weight: ``(K, D)`` on raw pooled features (a fitted gate's standardisation folded in).
        bias: ``(K,)``.
        pooling: how the stage output is pooled to ``D`` features.
        layout: the stage output's layout (``nchw``, ``nhwc``, ``nlc`` or ``nc``).

    Its outputs are float32 whatever the stage's dtype: run the stages in half precision with
    ``model.stages.half()`` and the gates stay exact.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, pooling: Pooling, layout: str):
        super().__init__()
        if weight.dim() != 2 or bias.shape != (weight.shape[0],):
            raise ValueError(
                f"a gate needs weights (K, D) and a bias (K,), got {tuple(weight.shape)} and {tuple(bias.shape)}"
            )
        self.register_buffer("weight", weight.detach().float().clone())
        self.register_buffer("bias", bias.detach().float().clone())
        self.pooling = pooling
        self.layout = layout

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """Gate outputs ``(N, K)`` float32 for stage output ``h``: signed distances or logits."""
        features = pool(h, self.pooling, self.layout).float()
        return torch.addmm(self.bias.float(), features, self.weight.float().t())

    def extra_repr(self) -> str:
        return f"features={self.weight.shape[1]}, classes={self.weight.shape[0]}, pooling={self.pooling}, layout={self.layout}"


class Policy(nn.Module):
    """A learned exit policy (:mod:`dgate_cli.gates.policy`): a linear score on the exit's features.

    Args:
        weight: ``(F,)`` on raw features (see :func:`~dgate_cli.gates.policy.exit_features`).
        bias: the score's offset.
    """

    def __init__(self, weight: torch.Tensor, bias: float):
        super().__init__()
        self.register_buffer("weight", weight.detach().float().reshape(-1).clone())
        self.bias = float(bias)

    @property
    def members_before(self) -> int:
        """How many earlier cascade members' answers the policy reads."""
        return (self.weight.shape[0] - FEATURES_PER_EXIT) // FEATURES_PER_MEMBER

    def forward(self, z: torch.Tensor, history: tuple[torch.Tensor, ...]) -> torch.Tensor:
        """``(N,)`` float32 scores for exit outputs ``z`` and the remembered answers ``history``."""
        return exit_features(z, history[: self.members_before]) @ self.weight + self.bias

    def extra_repr(self) -> str:
        return f"features={self.weight.shape[0]}"


@dataclass(frozen=True)
class Step:
    """One step of a plan.

    Attributes:
        kind: the manifest's name for this kind of step (``stage``: a piece of the backbone).
        name: what the step is called in reports (the gate position it ends at, or ``head``).
        source: ``previous`` (the previous step's output) or ``input`` (the original input rows).
        gate: the index of the gate that follows the step, or None (the last step answers).
        remember: keep the softmax of this step's output for the steps after it (a cascade
            member's answer, for members that combine answers and for exit policies).
        ensemble: answer with the average of this step's probabilities and those remembered
            before it (:func:`~dgate_cli.gates.scores.average_probabilities`), not its own output.
    """

    kind: str
    name: str
    source: str = "previous"
    gate: int | None = None
    remember: bool = False
    ensemble: bool = False

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ValueError(f"a step's source must be one of {', '.join(SOURCES)}, got {self.source!r}")

    def to_dict(self) -> dict[str, Any]:
        d = {"kind": self.kind, "name": self.name, "source": self.source, "gate": self.gate}
        if self.remember or self.ensemble:
            d.update(remember=self.remember, ensemble=self.ensemble)
        return d


def stage_step(entry: dict[str, Any]) -> Step:
    """A ``stage`` step from its manifest entry (the builder of the one kind dgate writes today)."""
    return Step(
        "stage",
        str(entry["name"]),
        str(entry.get("source", "previous")),
        entry.get("gate"),
        bool(entry.get("remember", False)),
        bool(entry.get("ensemble", False)),
    )


# manifest ``kind`` -> builder of the Step; a new kind of step registers here (see the module docstring)
STEP_KINDS: dict[str, Callable[[dict[str, Any]], Step]] = {"stage": stage_step}


def steps_from_manifest(entries: list[dict[str, Any]], source: str) -> list[Step]:
    """The plan a manifest's ``steps`` describe; a clear error for a kind this dgate does not know."""
    steps = []
    for i, entry in enumerate(entries):
        kind = entry.get("kind") if isinstance(entry, dict) else None
        if kind not in STEP_KINDS:
            raise ManifestError(
                f"{source}: steps[{i}] is of kind {kind!r}, which this dgate does not run "
                f"(it knows {', '.join(STEP_KINDS)}); upgrade dgate or re-export the model"
            )
        steps.append(STEP_KINDS[kind](entry))
    return steps


def linear_plan(gate_names: list[str]) -> list[Step]:
    """The plan of a single network with a gate after each of ``gate_names``, then its head."""
    return [Step("stage", n, gate=g) for g, n in enumerate(gate_names)] + [Step("stage", "head")]
