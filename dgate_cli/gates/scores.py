"""Gate scores: how a gate's outputs become one confidence and one class per sample, which the exit
rule compares with the gate's threshold.

``max`` (largest output; the paper's rule), ``margin`` (largest minus second largest), ``softmax``
(largest softmax probability) and ``entropy`` (minus the softmax entropy)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import SpecError

SCORES = ("max", "margin", "softmax", "entropy")


def gate_scores(outputs: torch.Tensor, score: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Confidence and predicted class per sample from gate outputs ``(N, K)``.

    Example:
        >>> s, p = gate_scores(torch.tensor([[2.0, -1.0, 0.5]]), "margin")
        >>> float(s[0]), int(p[0])
        (1.5, 0)
    """
    if score == "max":
        s, p = outputs.max(1)
        return s, p
    if score == "margin":
        top = (
            outputs.topk(2, dim=1).values
            if outputs.shape[1] > 1
            else torch.cat([outputs, outputs.new_full(outputs.shape, -math.inf)], 1)
        )
        return top[:, 0] - top[:, 1], outputs.argmax(1)
    logp = F.log_softmax(outputs.float(), dim=1)
    if score == "softmax":
        s, p = logp.max(1)
        return s.exp(), p
    if score == "entropy":
        return (logp.exp() * logp).sum(1), logp.argmax(1)
    raise SpecError(f"unknown gate score '{score}'; choose one of {', '.join(SCORES)}")


def average_probabilities(probs: list[torch.Tensor] | tuple[torch.Tensor, ...]) -> torch.Tensor:
    """The log of the mean of ``probs`` (each ``(N, K)`` softmax probabilities): the answer of a
    cascade member that combines its output with those of the members before it. Floored at the
    smallest float32 so that it stays finite.

    Example:
        >>> p = average_probabilities([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])])
        >>> p.exp().tolist()
        [[0.75, 0.25]]
    """
    mean = torch.stack(list(probs)).float().mean(0)
    return mean.clamp_min(torch.finfo(torch.float32).tiny).log()
