"""CUDA graphs for a :class:`~dgate_cli.runtime.GatedModel` (``model.use_cuda_graphs()``).

On a GPU a small network is bound by kernel launches, not arithmetic: eager PyTorch costs
~20 us of host time per operation, whatever the batch size (a CIFAR ResNet-56 takes about as
long at batch 256 as at 1 on an H100), so leaving early saves only the launches skipped, and
every gate's host synchronisation stalls the queue. Here each segment - a stage, then its gate's
outputs, exit scores, who leaves, how many, and a stable sort that puts the stayers first - is
captured once per batch-size bucket and replayed as one launch. Between segments the host reads
one number (how many left, copied to pinned memory by the graph) and gathers the stayers into the
smallest bucket that holds them (multiples of about an eighth of the input batch size, powers of
two below that), whose padding rows are computed and ignored. Thresholds live in a device tensor
(refreshed when the model's change), so new values need no new capture; a gate that opens or
closes does.

Results are those of the eager device path up to float rounding: the same operations on the same
rows (padding rows never mix with real ones: every operation of a frozen network in eval mode is
per sample), but a bucket may be larger than the eager path's batch of survivors, for which cuDNN
and cuBLAS may pick other kernels. The static buffers are shared: one thread at a time per model.

:class:`GraphRunner` also runs without CUDA (``capture=False``: each "replay" runs the segment
eagerly into the same static buffers), which is how the bucket and compaction logic is tested
on a CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from ...gates.scores import gate_scores

if TYPE_CHECKING:
    from ..model import GatedModel, GatedOutput


def _step(n: int) -> int:
    """Bucket spacing for input batches of ``n``: the power of two at or above ``n / 8``."""
    step = 1
    while step * 8 < n:
        step *= 2
    return step


def buckets(n: int) -> list[int]:
    """Batch sizes captured for input batches of ``n``: the multiples of ``n``'s step (about
    ``n / 8``) and the powers of two below it, and ``n``. Coarser buckets would waste the exits:
    with powers of two alone, 255 of 256 samples would still run a batch of 256."""
    step = _step(n)
    out = {n, *range(step, n, step)}
    b = 1
    while b < step:
        out.add(b)
        b *= 2
    return sorted(out)


def bucket_for(m: int, n: int) -> int:
    """The smallest bucket of ``buckets(n)`` that holds ``m`` rows."""
    step = _step(n)
    if m > step:
        return min(-(-m // step) * step, n)
    b = 1
    while b < m:
        b *= 2
    return min(b, n)


class _Segment:
    """One stage (and its gate's decision) at one batch size: static buffers and a replay."""

    def __init__(
        self, body: Callable[[], tuple[torch.Tensor, ...]], src: torch.Tensor, capture: bool, pool, warmup: int = 2
    ):
        self.body = body
        self.src = src  # the input buffer the body reads
        if capture:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):  # cuDNN picks its kernels, allocations settle
                for _ in range(warmup):
                    body()
            torch.cuda.current_stream().wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph, pool=pool):
                self.outputs = body()
        else:
            self.graph = None
            self.outputs = tuple(t.clone() for t in body())

    def replay(self) -> None:
        if self.graph is not None:
            self.graph.replay()
        else:  # the same semantics without CUDA: fresh results copied into the static buffers
            for buf, new in zip(self.outputs, self.body(), strict=True):
                buf.copy_(new)


class GraphRunner:
    """Replays a gated model's segments as CUDA graphs, bucket by bucket (see the module doc)."""

    def __init__(self, model: GatedModel, capture: bool = True):
        self.model = model
        self.capture = capture
        self.reset()

    def reset(self) -> None:
        """Forget every capture (the model moved, loaded new weights, or a gate opened or closed)."""
        self.segments: dict[tuple[int, int], _Segment] = {}  # (segment, bucket)
        self.inputs: dict[int, torch.Tensor] = {}  # bucket -> the first segment's input
        self.valid: dict[int, torch.Tensor] = {}  # bucket -> rows in use (a device scalar)
        self.counts: torch.Tensor | None = None  # per gate, how many left (host memory the graphs write)
        self.thresholds: torch.Tensor | None = None  # float32, on the device: the graphs read it
        self.t32: list[float] = []  # what it holds
        self.closed: tuple[bool, ...] = ()  # per gate, as captured
        self.key: tuple | None = None
        self.pool = None
        self.built: set[int] = set()  # input batch sizes whose buckets are all captured

    def __call__(self, x: torch.Tensor) -> GatedOutput:
        model = self.model
        n = x.shape[0]
        self._prepare(x)
        if n not in self.built:
            self._build(x)
        closed = self.closed
        nseg = model.num_gates + 1
        self.inputs[n].copy_(x)
        self.valid[n].fill_(n)
        b, valid = n, n
        alive: torch.Tensor | None = None  # input rows still in the batch (None: all, in order)
        done: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for g in range(nseg):
            seg = self.segments[(g, b)]
            seg.replay()
            if not self.capture:
                self._clobber(seg)
            if g == nseg - 1 or closed[g]:
                continue
            self._sync()
            gone = int(self.counts[g])  # type: ignore[index]
            if gone == 0:
                continue
            _, z, p, order = seg.outputs
            leavers = order[b - gone :]  # stable sort: valid stayers, padding, then leavers
            rows = leavers.clone() if alive is None else alive[leavers]  # (order is overwritten: see _clobber)
            done.append((g, rows, z[leavers], p[leavers]))
            valid -= gone
            if valid == 0:
                return model._assemble(n, done)
            stay = order[:valid]
            alive = stay.clone() if alive is None else alive[stay]
            nb = bucket_for(valid, n)
            dst = self.segments[(g, nb)].outputs[0]  # the next segment's input at that bucket
            dst[:valid] = seg.outputs[0][stay]
            self.valid[nb].fill_(valid)
            b = nb
        out, p = (t[:valid].clone() for t in self.segments[(nseg - 1, b)].outputs)
        done.append((model.num_gates, torch.arange(valid, device=x.device) if alive is None else alive, out, p))
        return model._assemble(n, done)

    def _clobber(self, seg: _Segment) -> None:
        """Without CUDA: spoil what a real replay of ``seg`` may overwrite. All captures share
        one memory pool, so a graph's working memory may lie under the outputs of any graph
        captured after it: only ``seg``'s own outputs and its input survive its replay. (This is
        why the results read from a segment are copied out before the next replay.)"""
        for other in self.segments.values():
            if other is seg:
                continue
            for t in other.outputs:
                if t is not seg.src:
                    t.fill_(math.nan if t.is_floating_point() else 1 << 40)

    def _sync(self) -> None:
        if self.capture:
            torch.cuda.current_stream().synchronize()

    def _prepare(self, x: torch.Tensor) -> None:
        """Drop the captures when the input's shape, dtype, device, the exit rule or the open
        gates changed (a threshold of inf closes a gate; a finite one beyond float32's range
        stays open, as on the eager paths); refresh the thresholds the graphs read."""
        model = self.model
        closed = tuple(t == math.inf for t in model._thresholds)
        key = (tuple(x.shape[1:]), closed, x.dtype, x.device, model.score)
        if key != self.key:
            self.reset()
            self.key, self.closed = key, closed
            self.thresholds = torch.empty(model.num_gates, dtype=torch.float32, device=x.device)
            self.counts = torch.zeros(model.num_gates, dtype=torch.int64, pin_memory=self.capture)
            self.pool = torch.cuda.graph_pool_handle() if self.capture else None
        if self.t32 != model._t32:
            self.thresholds.copy_(torch.tensor(model._t32, dtype=torch.float32))  # type: ignore[union-attr]
            self.t32 = list(model._t32)

    def _build(self, x: torch.Tensor) -> None:
        """Capture every segment at every bucket of ``x``'s batch size (buckets already captured
        for another batch size are shared)."""
        model = self.model
        n = x.shape[0]
        stages = list(model.stages)
        fmt = torch.channels_last if model.channels_last and x.dim() == 4 else torch.contiguous_format
        for b in buckets(n):
            if all((g, b) in self.segments for g in range(model.num_gates + 1)):  # captured for another size
                continue
            # the first segment's input (used at the input batch size; at the others, only
            # segments after a gate run, on the stayers gathered into the previous one's output)
            src = self.inputs[b] = torch.zeros((b, *x.shape[1:]), dtype=x.dtype, device=x.device).contiguous(
                memory_format=fmt
            )
            self.valid[b] = torch.full((), b, dtype=torch.int64, device=x.device)
            rows = torch.arange(b, device=x.device)
            for g in range(model.num_gates + 1):
                body = self._body(stages[g], g, src, rows, self.valid[b])
                seg = self.segments[(g, b)] = _Segment(body, src, self.capture, self.pool)
                src = seg.outputs[0]
        self.built.add(n)

    def _body(self, stage, g: int, src: torch.Tensor, rows: torch.Tensor, valid: torch.Tensor):
        """What segment ``g`` computes from its input buffer ``src``: the head's logits and
        classes; a closed gate's stage output; or an open gate's stage output, outputs, classes
        and order (stayers first; how many left goes to the pinned counts)."""
        model = self.model
        counts, thresholds = self.counts, self.thresholds

        if g == model.num_gates:

            def head() -> tuple[torch.Tensor, ...]:
                out = stage(src).float()
                return out, out.argmax(1)

            return head
        if self.closed[g]:
            return lambda: (stage(src),)

        def segment() -> tuple[torch.Tensor, ...]:
            h = stage(src)
            z = model.gate_outputs(g, h)
            s, p = gate_scores(z, model.score)
            leave = (s >= thresholds[g]) & (rows < valid)  # type: ignore[index]
            counts[g].copy_(leave.sum(), non_blocking=True)  # type: ignore[index]
            order = torch.sort(leave.to(torch.uint8), stable=True).indices
            return h, z, p, order

        return segment


class GraphChain:
    """A function of one tensor (the backbone's eager forward) as one CUDA graph per input shape,
    dtype, device and memory format: the baseline a graphed gated model is timed against."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]):
        self.fn = fn
        self.reset()

    def reset(self) -> None:
        """Forget every capture (the stages' parameters moved)."""
        self.graphs: dict[tuple, tuple[torch.Tensor, _Segment]] = {}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        key = (tuple(x.shape), x.stride(), x.dtype, x.device)
        entry = self.graphs.get(key)
        if entry is None:
            inp = torch.zeros_like(x)  # (its memory format too)
            entry = self.graphs[key] = (inp, _Segment(lambda: (self.fn(inp),), inp, True, None))
        inp, seg = entry
        inp.copy_(x)
        seg.replay()
        return seg.outputs[0].clone()
