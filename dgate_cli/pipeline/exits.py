"""A cascade's exits on a cached split: what every sample would answer at every exit, and its cost.

The exits of a cascade, in the order a sample meets them: member 0's gates, member 0's answer
(its head), member 1's gates, ..., the last member's gates; the last member's answer is the final
one. A member's answer may be its own logits or, with ``ensemble``, the average of its
probabilities and those of the members before it. :class:`ExitTable` holds each exit's outputs as
the runtime computes them (:func:`~dgate_cli.gates.scores.average_probabilities`,
:func:`~dgate_cli.gates.policy.exit_features`), so that thresholds chosen on it mean the same in
the exported model.

Costs: a sample leaving at an exit of member ``m`` pays every member before ``m`` in full, member
``m`` up to the exit, the normalisation of each member's input (one multiply-add per input value)
and every open exit it passed (a member's answer as an exit: ``K x K``, the identity gate it runs).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import cache
from ..errors import CacheMismatchError
from ..gates.policy import exit_features, num_features
from ..gates.scores import average_probabilities, gate_scores
from ..thresholds.cost import CostModel
from ..thresholds.outcomes import GateOutcomes
from .cascade import Member

HEAD = "head"


class Exit(NamedTuple):
    """One exit: its name (``member/position``), member index, kind (``gate`` or ``head``) and rule."""

    name: str
    member: int
    kind: str
    rule: str


@dataclass(frozen=True)
class MemberOutputs:
    """One member's cached outputs on a split: each used gate's outputs and the logits."""

    gates: dict[str, torch.Tensor]
    logits: torch.Tensor
    labels: torch.Tensor


def outputs_of(member: Member, data: cache.SplitFeatures) -> MemberOutputs:
    """A member's gate outputs and logits on a split already read (``data``)."""
    gates = {g: member.fitted.outputs(g, data.features[g]) for g in member.gates}
    return MemberOutputs(gates, data.logits.float(), data.labels)


def load_outputs(members: Sequence[Member], split: str) -> list[MemberOutputs]:
    """Every member's gate outputs and logits on ``split`` (one read of each member's cache)."""
    out = []
    for m in members:
        out.append(outputs_of(m, cache.load_split(m.run_dir, split, gates=m.gates)))
        if not torch.equal(out[-1].labels, out[0].labels):
            raise CacheMismatchError(
                f"the '{split}' samples of {m.run_dir} and {members[0].run_dir} differ (labels or order); "
                f"extract both from the same --{split} directory"
            )
    return out


@dataclass(frozen=True)
class ExitTable:
    """A cascade's exits on one split.

    Attributes:
        exits: the exits, in order (not the final answer).
        outputs: per exit, ``(N, K)`` float32 outputs (gate scores, a member's logits or the log
            of averaged probabilities).
        members_before: per exit, how many earlier members' answers a policy there may read.
        probs: per member, ``(N, K)`` softmax of its own logits (what the runtime remembers).
        final: ``(N, K)`` the final answer's outputs.
        labels: ``(N,)``.
        reference_correct: ``(N,)`` whether the last member alone is right.
        reach, gate_costs, reference_cost: costs (see the module docstring).
        ensemble: per member, whether its answer averages the members' probabilities.
    """

    exits: list[Exit]
    outputs: list[torch.Tensor]
    members_before: list[int]
    probs: list[torch.Tensor]
    final: torch.Tensor
    labels: torch.Tensor
    reference_correct: torch.Tensor
    reach: torch.Tensor
    gate_costs: torch.Tensor
    reference_cost: float
    ensemble: tuple[bool, ...]

    @property
    def names(self) -> list[str]:
        return [e.name for e in self.exits]

    def features(self, g: int) -> torch.Tensor:
        """The features a learned policy at exit ``g`` reads (as the runtime computes them)."""
        return exit_features(self.outputs[g], self.probs[: self.members_before[g]])

    def outcomes(self, scores: torch.Tensor | None = None) -> GateOutcomes:
        """The calibration outcomes: with the exits' rules, or with ``scores`` ``(N, G)`` of
        learned policies (each policy's features priced as MACs on top of its exit)."""
        preds = [o.argmax(1) for o in self.outputs]
        gate_costs = self.gate_costs
        if scores is None:
            cols = [gate_scores(o, e.rule)[0] for o, e in zip(self.outputs, self.exits, strict=True)]
            scores = torch.stack(cols, 1) if cols else torch.empty(len(self.labels), 0)
        else:
            extra = [float(num_features(b)) for b in self.members_before]
            gate_costs = gate_costs + torch.tensor(extra, dtype=torch.float64)
        pred = torch.stack(preds, 1) if preds else torch.empty(len(self.labels), 0, dtype=torch.long)
        return GateOutcomes(
            scores=scores.float(),
            correct=pred == self.labels[:, None],
            final_correct=self.final.argmax(1) == self.labels,
            reach_costs=self.reach,
            gate_costs=gate_costs,
            reference_correct=self.reference_correct,
            reference_cost=self.reference_cost,
        )

    def exit_costs(self) -> torch.Tensor:
        """``(G + 1,)`` cost of leaving at each exit with every exit open, as fractions of the reference."""
        cost = CostModel(tuple(self.reach.tolist()), tuple(self.gate_costs.tolist()), reference=self.reference_cost)
        return cost.exit_costs() / self.reference_cost


def table(members: Sequence[Member], outputs: Sequence[MemberOutputs], ensemble: Sequence[bool]) -> ExitTable:
    """The exit table of ``members`` whose answers combine as ``ensemble`` says (one flag per
    member; the first member's is ignored: it has nobody to combine with)."""
    ensemble = tuple(bool(e) and k > 0 for k, e in enumerate(ensemble))
    probs = [torch.softmax(o.logits, 1) for o in outputs]
    exits: list[Exit] = []
    zs: list[torch.Tensor] = []
    before: list[int] = []
    reach: list[float] = []
    gate_costs: list[float] = []
    spent = 0.0  # every member before this one, in full
    final = outputs[-1].logits
    for k, (m, o) in enumerate(zip(members, outputs, strict=True)):
        start = spent + (m.input_values if len(members) > 1 else 0)  # a lone network's input comes normalised
        cum = torch.tensor([s["macs"] for s in m.config.costs["stages"]], dtype=torch.float64).cumsum(0)
        for g in m.gates:
            i = m.config.gates.index(g)
            exits.append(Exit(f"{m.name}/{g}", k, "gate", m.fitted.score))
            zs.append(o.gates[g])
            before.append(k)
            reach.append(start + float(cum[i]))
            gate_costs.append(float(m.config.costs["gates"][i]))
        answer = average_probabilities(probs[: k + 1]) if ensemble[k] else o.logits
        spent = start + m.backbone_cost
        if k == len(members) - 1:
            final = answer
            break
        exits.append(Exit(f"{m.name}/{HEAD}", k, HEAD, "softmax"))
        zs.append(answer)
        before.append(k)
        reach.append(spent)
        gate_costs.append(float(o.logits.shape[1] ** 2))
    reach.append(spent)
    return ExitTable(
        exits=exits,
        outputs=zs,
        members_before=before,
        probs=probs,
        final=final,
        labels=outputs[0].labels,
        reference_correct=outputs[-1].logits.argmax(1) == outputs[0].labels,
        reach=torch.tensor(reach, dtype=torch.float64),
        gate_costs=torch.tensor(gate_costs, dtype=torch.float64),
        reference_cost=members[-1].backbone_cost,
        ensemble=ensemble,
    )


def ensemble_options(num_members: int) -> list[tuple[bool, ...]]:
    """The ways a cascade's answers may combine that calibration tries: each later member answers
    alone or with the average of the members so far (every combination up to four members; beyond,
    all alone or all combined)."""
    later = num_members - 1
    if later > 3:
        return [(False,) * num_members, (False,) + (True,) * later]
    return [(False,) + tuple(bool(b >> j & 1) for j in range(later)) for b in range(2**later)]
