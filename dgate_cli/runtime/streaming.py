"""The queues behind :meth:`GatedModel.stream`: per step, the rows waiting to run it.

:class:`StepQueues` runs each step on full batches of its queue, shallow to deep, and passes the
survivors on; the step itself is the model's own (handed in as ``advance``), not a copy of it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from .outputs import GatedOutput, Left

Advance = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor | None, torch.Tensor | None, list[Left]]]
"""Run step ``k`` on rows ``h`` at stream positions ``index``; returns who goes on (or None) and who left."""


class StepQueues:
    """Per step, the queued rows (step inputs and their stream positions) and how many there are."""

    def __init__(self, steps: int):
        self.queues: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(steps)]
        self.counts = [0] * steps

    def put(self, k: int, h: torch.Tensor, index: torch.Tensor) -> None:
        """Queue rows ``h`` (at stream positions ``index``) for step ``k``."""
        self.queues[k].append((h, index))
        self.counts[k] += index.shape[0]

    def drain(self, advance: Advance, size: int, flush: bool) -> Iterator[tuple[torch.Tensor, GatedOutput]]:
        """Run every step, shallow to deep, on each full batch of its queue (any remnant when flushing)."""
        for k in range(len(self.queues)):
            while self.counts[k] >= size or (flush and self.counts[k] > 0):
                h, index = _take(self.queues[k], min(size, self.counts[k]))
                self.counts[k] -= index.shape[0]
                h, index, done = advance(k, h, index)  # type: ignore[assignment]
                for d in done:
                    yield d.rows, GatedOutput(d.outputs, d.pred, torch.full_like(d.rows, d.exit))
                if h is not None:
                    self.put(k + 1, h, index)

    def copy_inputs_in(self, caller: int) -> None:
        """Copy the waiting inputs that live in storage ``caller``: the caller may refill that buffer."""
        self.queues[0] = [(h.clone() if h.untyped_storage().data_ptr() == caller else h, i) for h, i in self.queues[0]]


def _take(queue: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` queued rows (step inputs and their stream positions), removed from ``queue``."""
    hs, ids, got = [], [], 0
    while got < k:
        h, index = queue[0]
        need = k - got
        if h.shape[0] <= need:
            queue.pop(0)
        else:
            queue[0] = (h[need:], index[need:])
            h, index = h[:need], index[:need]
        hs.append(h)
        ids.append(index)
        got += h.shape[0]
    if len(hs) == 1:
        return hs[0], ids[0]
    h = torch.cat(hs)
    if hs[0].dim() == 4 and hs[0].is_contiguous(memory_format=torch.channels_last):
        h = h.contiguous(memory_format=torch.channels_last)  # a no-op when cat kept the format
    return h, torch.cat(ids)
