"""``GatedModel``: stage-by-stage execution where each sample leaves the batch at its own gate.

After each stage the open gate scores the surviving samples; those at or above the gate's threshold
are set aside and removed from the batch (the survivors are indexed out, keeping their memory
format), so no later stage runs for them; the results are put back in input order at the end.
Closed gates (threshold ``inf``) are skipped entirely, at no cost.

A gate is one pooling and one small matrix product. On a CPU, for one average grid of even windows,
a gate is one call of a small C kernel (:mod:`._native`: pooling, product, bias, exit score and the
comparison with the threshold, for one sample or a batch; ``gate_outputs`` calls it too, so on a
CPU the host and device paths give the same bits). Without it the exit decision is still made on the host: on a
NumPy view of the gate's ``(N, K)`` products for a batch (the pooled tensor read in its memory
order against the weights, kept in both orders), with the bias added there and the float32
rounding of :func:`gate_scores`; a single sample's outputs are read as a Python list. Few
operations per gate is the point: right after a stage every small operation costs 10-40 us on a
CPU (the stage has evicted the caches), whatever its size. On a GPU the decision stays on the
device, with one host synchronisation per open gate to learn how many samples remain.

:meth:`GatedModel.stream` is the throughput mode: survivors wait in a queue per stage until a full
batch of them (from several input batches) is there, so the deep stages do not run on remnants.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..gates.pooling import Pooling, pool
from ..gates.scores import gate_scores
from ..thresholds.outcomes import OperatingPoint, decode_threshold
from .backends import gate_kernel as _native
from .backends.cudagraphs import GraphChain, GraphRunner

# the pooling op without F.adaptive_avg_pool2d's Python argument handling (~15 us a call, cold);
# it also skips __torch_function__ overrides (tensor subclasses), which stage outputs do not use
_adaptive_avg_pool2d = getattr(torch._C._nn, "adaptive_avg_pool2d", F.adaptive_avg_pool2d)


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


class _GatePlan(NamedTuple):
    size: int  # the grid side for one average grid on an NCHW output, else 0
    dim: int  # D, the gate's input features
    weight_t: torch.Tensor  # (D, K): (s, s, C) order for a grid, else the features' order
    weight_chw: torch.Tensor  # (D, K) in (C, s, s) order
    bias: torch.Tensor
    bias_np: np.ndarray  # on the host, for the NumPy decisions
    bias_list: list[float]  # for one sample's decision in Python
    key: tuple  # the gate buffers' storage and version counters when the plan was made


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
        self._thresholds: list[float] = []
        self._t32: list[float] = []  # the thresholds rounded to float32, as a device compares them
        self._plans: dict[int, _GatePlan] = {}  # per gate, see _plan
        self._natives: dict[tuple, _native.Gate | None] = {}  # per gate and stage output layout, see _native
        self._graphs: GraphRunner | None = None  # see use_cuda_graphs
        self.set_thresholds(thresholds)
        self.eval()

    def _apply(self, fn, recurse=True):
        """``.to()``, ``.cuda()``, ``.half()``: drop the cached gate plans (they hold the old tensors)
        and keep the gates in float32 on the new device - their scores are float32 by design, and
        ``model.half()`` (or bfloat16) then runs the stages in half precision with the gates exact."""
        self._plans, self._natives = {}, {}
        if self._graphs is not None:
            self._graphs.reset()
        gates = {k: v for k, v in self._buffers.items() if k.startswith("gate") and v is not None}
        out = super()._apply(fn, recurse)
        for k, before in gates.items():
            after = self._buffers[k]
            if after is not None and after.dtype != torch.float32:
                self._buffers[k] = before.to(device=after.device)
        return out

    def _load_from_state_dict(self, *args, **kwargs):  # new gate weights: the plans hold copies of the old
        self._plans, self._natives = {}, {}
        if self._graphs is not None:
            self._graphs.reset()
        super()._load_from_state_dict(*args, **kwargs)

    @property
    def num_gates(self) -> int:
        return len(self.layouts)

    def gate_weight(self, i: int) -> torch.Tensor:
        return getattr(self, f"gate{i}_weight")

    def gate_bias(self, i: int) -> torch.Tensor:
        return getattr(self, f"gate{i}_bias")

    # -- operating point --------------------------------------------------------------------------
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
        them with :meth:`set_thresholds` or by assigning a whole list (both are checked)."""
        return list(self._thresholds)

    @thresholds.setter
    def thresholds(self, values: Sequence[float | str | None]) -> None:
        try:
            values = [] if isinstance(values, (str, bytes)) else list(values)
        except TypeError:
            values = []
        if not values and self.num_gates:
            raise ValueError(f"thresholds must be a list of {self.num_gates} numbers (one per gate)")
        if len(values) != self.num_gates:
            raise ValueError(f"expected {self.num_gates} thresholds (one per gate), got {len(values)}")
        try:
            parsed = [decode_threshold(t) for t in values]
        except (TypeError, ValueError):
            raise ValueError(f"thresholds must be numbers, 'inf' or None, got {values!r}") from None
        if any(math.isnan(v) for v in parsed):
            raise ValueError("thresholds must be numbers or inf, not NaN")
        self._thresholds = parsed
        self._t32 = [_f32(t) for t in parsed]

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
            point = min(ok, key=self._search_cost)
        self.set_thresholds(list(point.thresholds))
        return point

    def _search_cost(self, p: OperatingPoint) -> float:
        """What calibration minimised for ``p``: its mean MACs plus, under ``--gate-overhead F``,
        ``F`` x the backbone's cost for every open gate a sample reaches (so that switching points
        does not reopen gates the calibration closed as not worth their time)."""
        overhead = float(self.manifest.get("calibration", {}).get("target", {}).get("gate_overhead") or 0.0)
        if not overhead:
            return p.mean_cost
        reach, passed = 1.0, 0.0
        for t, f in zip(p.thresholds, p.exit_fractions, strict=False):
            if t < math.inf:
                passed += reach
            reach -= f
        backbone = self.reach_costs[-1] if self.reach_costs else p.mean_cost / p.cost_ratio
        return p.mean_cost + overhead * backbone * passed

    def exit_costs(self) -> list[float]:
        """MACs of leaving at each exit under the current thresholds (closed gates cost nothing)."""
        if self.reach_costs is None or self.gate_costs is None:
            raise ValueError("this model carries no cost table")
        spent, out = 0.0, []
        for g in range(self.num_gates):
            if self._thresholds[g] < math.inf:
                spent += self.gate_costs[g]
            out.append(self.reach_costs[g] + spent)
        out.append(self.reach_costs[-1] + spent)
        return out

    # -- inference --------------------------------------------------------------------------------
    def gate_outputs(self, g: int, h: torch.Tensor) -> torch.Tensor:
        """Gate ``g``'s outputs ``(N, K)`` (float32) for stage output ``h``: the pooled features
        times the weights, plus the bias (added in float32 after the product, as the host paths
        do); on a CPU, where it applies, those of the gate kernel (:mod:`._native`), as the
        runtime's."""
        if not (h.requires_grad and torch.is_grad_enabled()):
            native = self._native(g, h)
            if native is not None:
                z, _, _ = _kernel_gates(native, h, math.inf)
                return torch.from_numpy(z)
        return self._gate_product(g, h).add_(self._plan(g).bias)

    def _gate_product(self, g: int, h: torch.Tensor) -> torch.Tensor:
        """Gate ``g``'s pooled features times its weights, without the bias: ``(N, K)`` float32.

        Three operations for one average grid (pool, a strided view, ``mm``) - each small op costs
        20-40 us right after a stage on a CPU, and ``addmm`` with a broadcast bias twice ``mm``."""
        n = h.shape[0]
        plan = self._plan(g)
        if plan.size:
            s, height, width = plan.size, h.shape[-2], h.shape[-1]
            if h.is_cuda and height % s == 0 and width % s == 0:  # even windows: adaptive pooling is slow on
                f = F.avg_pool2d(h, (height // s, width // s))  # CUDA for large ones (3.7x, H100: RESULTS.md)
            else:
                f = _adaptive_avg_pool2d(h, s)
            if f.dtype != torch.float32:
                f = f.float()
            if f.is_contiguous():  # NCHW (or a 1x1 grid): features in (C, s, s) order
                return torch.mm(f.view(n, -1), plan.weight_chw)
            if f.is_contiguous(memory_format=torch.channels_last) and f.numel() == n * plan.dim:  # (s, s, C): no copy
                return torch.mm(f.as_strided((n, plan.dim), (plan.dim, 1)), plan.weight_t)
            return torch.mm(f.permute(0, 2, 3, 1).reshape(n, -1), plan.weight_t)
        f = pool(h, self.poolings[g], self.layouts[g])
        if f.dtype != torch.float32:
            f = f.float()
        return torch.mm(f, plan.weight_t)

    def _native(self, g: int, h: torch.Tensor) -> _native.Gate | None:
        """Gate ``g`` bound to the gate kernel for stage output ``h`` ``(N, C, H, W)`` and the
        exit rule (max for the softmax and entropy rules, whose decisions the kernel does not make:
        its outputs only). None (PyTorch) without the kernel, off the CPU, for other
        poolings than one average grid, uneven windows, an empty or a float32 output that is not
        dense in NCHW or NHWC order, gate buffers not float32 ``(K, D)`` and ``(K,)``, or a batch of
        more than ``_KERNEL_BATCH`` values (the kernel runs on one thread; PyTorch pools a large
        batch on all of them). Cached per shape, strides, dtype, device kind and exit rule until
        the model moves or loads new weights."""
        plan = self._plan(g)  # first: it drops this gate's bindings if its weights changed
        key = (g, h.shape, h.stride(), h.dtype, h.is_cpu, self.score)
        entry = self._natives.get(key, False)
        if entry is not False:
            return entry
        s = plan.size  # 0: not one average grid on an NCHW output
        w, b = plan.weight_t.t(), self.gate_bias(g)  # (K, D) in (s, s, C) order, the kernel's
        usable = (
            s
            and h.is_cpu
            and h.dim() == 4
            and h.numel() > 0
            and (h.shape[0] == 1 or h.numel() <= _KERNEL_BATCH)
            and h.dtype == w.dtype == b.dtype == torch.float32
        )
        kernel = _native.kernel() if usable else None
        if kernel is not None:
            _, c, height, width = h.shape
            nhwc = not h.is_contiguous()
            if (
                w.is_cpu
                and b.is_cpu
                and w.shape[1] == c * s * s
                and b.shape == (w.shape[0],)
                and height % s == 0
                and width % s == 0
                and w.is_contiguous()
                and b.is_contiguous()
                and (not nhwc or h.is_contiguous(memory_format=torch.channels_last))
            ):
                entry = _native.bind(kernel, w, b, h.shape, s, nhwc, _RULES.get(self.score, 0))
        self._natives[key] = entry = entry or None
        return entry

    def __getstate__(self) -> dict[str, Any]:
        """Pickling and ``copy.deepcopy``: without the caches (the kernel's entries hold ctypes
        functions and raw pointers into this model's buffers); a copy builds its own."""
        state = dict(self.__dict__)
        state["_plans"], state["_natives"] = {}, {}
        state["_graphs"] = self._graphs is not None  # a copy captures its own
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:  # also a model pickled before a cache existed
        self.__dict__.update(state)
        self._plans, self._natives = {}, {}
        self._graphs = GraphRunner(self) if state.get("_graphs") else None

    def use_cuda_graphs(self, enabled: bool = True) -> GatedModel:
        """Run CUDA inputs through CUDA graphs (:mod:`dgate_cli.cudagraphs`). Returns ``self``.

        Each stage and its gate's decision is captured once per batch-size bucket (the input's
        batch size, multiples of about an eighth of it, and the powers of two below that) and
        replayed as one launch; the host reads one number per open gate. Not for concurrent calls
        from several threads (the graphs' buffers are shared). Cuts latency where a GPU waits on
        kernel launches (small networks, small batches): on an H100 the gated CIFAR ResNet-56
        took 0.73 ms at batch size 1 instead of 2.64 eager. Against a graphed backbone the gates'
        host round trips then weigh more (``benchmarks/RESULTS.md``). The first batch of a new size captures its buckets (seconds); each bucket keeps its
        activations on the GPU. :meth:`backbone` is then graphed too, for a fair comparison.
        CPU inputs and :meth:`stream` run as before.
        """
        self._graphs = GraphRunner(self) if enabled else None
        return self

    @property
    def cuda_graphs(self) -> bool:
        """Whether CUDA inputs run through CUDA graphs (:meth:`use_cuda_graphs`)."""
        return self._graphs is not None

    def _plan(self, g: int) -> _GatePlan:
        """How gate ``g`` reads its stage output (cached until the model moves): the weights as a
        transposed ``(D, K)`` view of a ``(K, D)`` matrix, the layout MKL multiplies fastest - for
        one average grid on an NCHW output in ``(s, s, C)`` order, to read a channels-last pooled
        tensor without a copy, and in ``(C, s, s)`` order for a contiguous one; the bias as a
        tensor, a NumPy array and a list, for the device and the two host paths."""
        w, bias = self.gate_weight(g), self.gate_bias(g)
        key = (w.data_ptr(), _version(w), bias.data_ptr(), _version(bias), w.device)
        plan = self._plans.get(g)
        if plan is not None and plan.key == key:
            return plan
        if plan is not None:  # the gate's weights changed (in place, or replaced): drop what holds the old
            self._natives = {k: v for k, v in self._natives.items() if k[0] != g}
            if self._graphs is not None:
                self._graphs.reset()
        pooling = self.poolings[g]
        size, w_t = 0, w.t()
        if self.layouts[g] == "nchw" and pooling.ops == ("avg",) and len(pooling.sizes) == 1:
            s = pooling.sizes[0]
            if w.shape[1] % (s * s) == 0:
                size = s
                w_t = w.view(w.shape[0], -1, s, s).permute(0, 2, 3, 1).reshape(w.shape[0], -1).contiguous().t()
        host = bias.detach().cpu()
        plan = self._plans[g] = _GatePlan(size, w.shape[1], w_t, w.t(), bias, host.numpy(), host.tolist(), key)
        return plan

    def forward(self, x: torch.Tensor) -> GatedOutput:
        """Run the gated network on a batch; samples leave at the first gate confident enough."""
        if not torch.is_inference_mode_enabled():  # (a decorator would enter it on every call: ~50 us cold)
            with torch.inference_mode():
                return self.forward(x)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        if self._graphs is not None and x.is_cuda and x.shape[0] > 0:
            return self._graphs(x)
        if x.shape[0] == 1 and self.score in _LIST_SCORES:
            return self._forward_one(x)
        if self.score in _HOST_SCORES and x.device.type == "cpu":
            return self._forward_host(x)
        return self._forward_device(x)

    def _forward_one(self, x: torch.Tensor) -> GatedOutput:
        """One sample (on any device): each open gate decided as :meth:`_leaves_one` decides it,
        written out here - a method call per gate costs 0.2-0.6% of a ResNet-56 with nine gates
        at batch size 1 on a CPU, where every line runs cold after its stage (measured)."""
        stages = list(self.stages)  # ModuleList[g] costs ~13 us a call on a small CPU
        thresholds, t32 = self._thresholds, self._t32
        h = x
        for g in range(len(thresholds)):
            h = stages[g](h)
            if thresholds[g] == math.inf:  # closed
                continue
            native = self._native(g, h)
            if native is None:
                z = self._list_leaves(g, h)
            elif native.one(h.data_ptr(), native.address) >= t32[g]:
                z = _kernel_outputs(native)
            else:
                continue
            if z is not None:
                return _assemble_host(1, [(g, None, z)], x.device)
        return _at_head(stages[-1](h).float(), len(thresholds))

    def _leaves_one(self, g: int, h: torch.Tensor) -> np.ndarray | None:
        """Whether one sample leaves at gate ``g``: its ``(1, K)`` float32 outputs if so, else None.
        Through the gate kernel on a CPU, else :meth:`_list_leaves`."""
        native = self._native(g, h)
        if native is None:
            return self._list_leaves(g, h)
        return _kernel_outputs(native) if native.one(h.data_ptr(), native.address) >= self._t32[g] else None

    def _list_leaves(self, g: int, h: torch.Tensor) -> np.ndarray | None:
        """:meth:`_leaves_one` without the kernel: the outputs read as a Python list with the bias
        added there (a NumPy call costs more for K values), scored by the float32 rule of
        :func:`gate_scores`."""
        row = [v + b for v, b in zip(self._gate_product(g, h).tolist()[0], self._plan(g).bias_list, strict=True)]
        return np.array([row], dtype=np.float32) if _LIST_SCORES[self.score](row) >= self._t32[g] else None

    def _forward_host(self, x: torch.Tensor) -> GatedOutput:
        """Exit decisions on the host (a CPU batch): each open gate's ``(N, K)`` outputs and who
        leaves come from one call of the gate kernel, or, where it does not apply, the outputs are
        viewed as a NumPy array and scored there, with the float32 rounding of :func:`gate_scores`;
        a last sample is decided as a single input is (:meth:`_leaves_one`). Classes are found
        once, for everyone, at the end.

        Every distinct operation here is paid for twice on a CPU: a stage's kernels push the
        runtime's own code out of the caches, so a small op right after a stage costs 20-80 us
        instead of 2-15, and the next stage starts cold in turn. Hence as few operations per
        gate as the decision allows."""
        n = x.shape[0]
        alive: np.ndarray | None = None  # rows still in the batch, made when the first sample leaves
        left = n  # how many
        done: list[tuple[int, np.ndarray, np.ndarray]] = []  # (exit, rows, outputs)
        stages = list(self.stages)  # ModuleList[g] costs ~13 us a call on a small CPU: 10 of them ~2% of a ResNet-56
        thresholds = self._thresholds
        h = x
        for g in range(self.num_gates):
            h = stages[g](h)
            if thresholds[g] == math.inf:  # closed (a finite threshold above float32's range stays open)
                continue
            if left == 1:  # one sample left: decided as a single input is
                z1 = self._leaves_one(g, h)
                if z1 is not None:
                    done.append((g, np.arange(n) if alive is None else alive, z1))
                    return _assemble_host(n, done, x.device)
                continue
            z, leave = self._host_gate(g, h)
            gone = leave.nonzero()[0]
            if gone.size == 0:
                continue
            if alive is None:
                alive = np.arange(n)
            if gone.size == left:
                done.append((g, alive, z))
                return _assemble_host(n, done, x.device)
            stay = (~leave).nonzero()[0]
            done.append((g, alive[gone], z[gone]))
            alive = alive[stay]
            left = alive.size
            h = _rows(h, torch.from_numpy(stay))
        out = stages[-1](h).float()
        if alive is None:  # nobody left early
            return _at_head(out, self.num_gates)
        done.append((self.num_gates, alive, out.cpu().numpy()))
        return _assemble_host(n, done, x.device)

    def _forward_device(self, x: torch.Tensor) -> GatedOutput:
        """Exit decisions as tensor operations on the device (GPU batches, and the softmax and
        entropy rules); one host synchronisation per open gate, to learn how many samples remain."""
        n = x.shape[0]
        device = x.device
        alive = torch.arange(n, device=device)
        done: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]] = []  # (gate, rows, outputs, classes)
        stages = list(self.stages)
        h = x
        for g in range(self.num_gates):
            h = stages[g](h)
            t = self._thresholds[g]
            if t == math.inf:
                continue
            z = self.gate_outputs(g, h)
            s, p = gate_scores(z, self.score)
            leave = s >= t
            gone = torch.nonzero(leave).squeeze(1)  # the one host sync per open gate
            n_leave = gone.numel()
            if n_leave == 0:
                continue
            done.append((g, alive[gone], z[gone], p[gone]))
            if n_leave == alive.numel():
                return self._assemble(n, done)
            stay = torch.nonzero(~leave).squeeze(1)
            alive = alive[stay]
            h = _rows(h, stay)
        out = stages[-1](h).float()
        done.append((self.num_gates, alive, out, out.argmax(1)))
        return self._assemble(n, done)

    @staticmethod
    def _assemble(n: int, done: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]) -> GatedOutput:
        """Put the per-exit results ``(exit, rows, outputs, classes)`` back into input order."""
        if len(done) == 1 and done[0][1].numel() == n:  # everyone left at one exit: rows are in order
            g, _, z, p = done[0]
            return GatedOutput(z, p, torch.full((n,), g, dtype=torch.long, device=z.device))
        rows = torch.cat([d[1] for d in done])
        order = torch.empty_like(rows)
        order[rows] = torch.arange(n, device=rows.device)  # position of input i among the concatenated rows
        exits = torch.cat([torch.full((d[1].numel(),), d[0], dtype=torch.long, device=rows.device) for d in done])
        return GatedOutput(torch.cat([d[2] for d in done])[order], torch.cat([d[3] for d in done])[order], exits[order])

    @torch.inference_mode()
    def stream(
        self, batches: Iterable[torch.Tensor], batch_size: int | None = None
    ) -> Iterator[tuple[torch.Tensor, GatedOutput]]:
        """Run a stream of input batches with every stage's batch kept full (throughput mode).

        In :meth:`forward` the later stages run on what is left of one batch (at batch 32, a
        ResNet-56's last stage sees ~5 images, at which a CPU does ~2x the work per image). Here
        the survivors of each gate wait until ``batch_size`` of them (default: the first input
        batch's size) are there, from as many input batches as it takes; the rest is flushed when
        the inputs run out. Decisions are those of :meth:`forward` (up to the float rounding of
        other batch compositions). For offline scoring: a sample's result may come several input
        batches later.

        Yields:
            ``(index, output)`` as samples finish: ``index`` ``(n,)`` are positions in the stream
            (0 is the first sample of the first batch), in no particular order.

        Example:
            >>> for index, out in model.stream(loader_batches):  # doctest: +SKIP
            ...     preds[index] = out.pred
        """
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be a positive number of samples, got {batch_size}")
        queues: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in range(self.num_gates + 1)]
        counts = [0] * (self.num_gates + 1)
        offset = 0
        for x in batches:
            if x.shape[0] == 0:
                continue
            caller = x.untyped_storage().data_ptr()
            if self.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            batch_size = batch_size or x.shape[0]
            queues[0].append((x, torch.arange(offset, offset + x.shape[0], device=x.device)))
            counts[0] += x.shape[0]
            offset += x.shape[0]
            yield from self._drain(queues, counts, batch_size, flush=False)
            # inputs still waiting are copied: the caller may refill its buffer for the next batch
            queues[0] = [(h.clone() if h.untyped_storage().data_ptr() == caller else h, i) for h, i in queues[0]]
        yield from self._drain(queues, counts, batch_size or 1, flush=True)

    def _drain(
        self, queues: list[list[tuple[torch.Tensor, torch.Tensor]]], counts: list[int], size: int, flush: bool
    ) -> Iterator[tuple[torch.Tensor, GatedOutput]]:
        """Run every stage, shallow to deep, on each full batch (any remnant too when flushing)."""
        last = self.num_gates
        stages = list(self.stages)
        for g in range(last + 1):
            while counts[g] >= size or (flush and counts[g] > 0):
                h, index = _take(queues[g], min(size, counts[g]))
                counts[g] -= index.shape[0]
                h = stages[g](h)
                if g == last:
                    out = h.float()
                    yield index, _at_head(out, last)
                    continue
                if self._thresholds[g] < math.inf:
                    z, gone, stay, p = self._decide(g, h)
                    if gone.numel():
                        yield index[gone], GatedOutput(z[gone], p[gone], torch.full_like(index[gone], g))
                        if not stay.numel():
                            continue
                        h, index = _rows(h, stay), index[stay]
                queues[g + 1].append((h, index))
                counts[g + 1] += index.shape[0]

    def _host_gate(self, g: int, h: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Gate ``g`` on a CPU stage output ``h`` for the max and margin rules: its ``(N, K)``
        float32 outputs and which rows leave (score against the threshold rounded to float32,
        compared in float32, as a device compares them). One call of the gate kernel where it
        applies; else PyTorch's product viewed as a NumPy array, with the bias and the float32 rule
        of :func:`gate_scores` applied there."""
        native = self._native(g, h)
        if native is not None:
            z, leave, _ = _kernel_gates(native, h, self._t32[g])
            return z, leave
        z = self._gate_product(g, h).numpy()
        z += self._plan(g).bias_np  # in place, in float32, as gate_outputs adds it
        return z, _HOST_SCORES[self.score](z) >= self._t32[g]

    def _decide(self, g: int, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(outputs, rows that leave at gate ``g``, rows that stay, classes) for stage output ``h``."""
        if h.device.type == "cpu" and self.score in _HOST_SCORES:
            zn, leave = self._host_gate(g, h)
            return (
                torch.from_numpy(zn),
                torch.from_numpy(leave.nonzero()[0]),
                torch.from_numpy((~leave).nonzero()[0]),
                torch.from_numpy(zn.argmax(1)),
            )
        z = self.gate_outputs(g, h)
        s, pt = gate_scores(z, self.score)
        leave = s >= self._thresholds[g]
        return z, torch.nonzero(leave).squeeze(1), torch.nonzero(~leave).squeeze(1), pt

    def backbone_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The backbone's logits without gates: the same stages, chained."""
        return _chain(self.stages, self.channels_last, x)

    def backbone(self) -> Backbone:
        """The backbone without gates as a module sharing these stages: ``model.backbone()(x)``
        gives its logits. The baseline of ``dgate bench``, called as the gated model is."""
        return Backbone(self.stages, self.channels_last, cuda_graphs=self.cuda_graphs)

    def extra_repr(self) -> str:
        gates = ", ".join(f"{n}@{t:.4g}" for n, t in zip(self.gate_names, self._thresholds, strict=True))
        pools = ", ".join(map(str, self.poolings))
        return f"gates=[{gates}], score={self.score}, pooling=[{pools}]"

    @property
    def classes(self) -> list[str]:
        return list(self.manifest.get("classes", []))


class Backbone(nn.Module):
    """The stages of a :class:`GatedModel` chained without gates (see :meth:`GatedModel.backbone`)."""

    def __init__(self, stages: nn.ModuleList, channels_last: bool = False, cuda_graphs: bool = False):
        super().__init__()
        self.stages = stages
        self.channels_last = channels_last
        self._graph = GraphChain(self._eager) if cuda_graphs else None

    def _apply(self, fn, recurse=True):  # new parameter storage: the graphs read the old
        if self._graph is not None:
            self._graph.reset()
        return super()._apply(fn, recurse)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._graph is not None and x.is_cuda:
            with torch.inference_mode():
                return self._graph(x)
        return self._eager(x)

    def _eager(self, x: torch.Tensor) -> torch.Tensor:
        return _chain(self.stages, self.channels_last, x)


def _chain(stages: nn.ModuleList, channels_last: bool, x: torch.Tensor) -> torch.Tensor:
    """The backbone's logits (float32): ``stages`` chained, in inference mode."""
    if not torch.is_inference_mode_enabled():
        with torch.inference_mode():
            return _chain(stages, channels_last, x)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    for stage in stages:
        x = stage(x)
    return x.float()


def _version(t: torch.Tensor) -> int:
    """``t``'s version counter (bumped by in-place edits); -1 for inference tensors, which have none."""
    return -1 if t.is_inference() else t._version


def _at_head(out: torch.Tensor, head: int) -> GatedOutput:
    """Everyone's result at the backbone's head (exit index ``head``) from its float32 logits."""
    return GatedOutput(out, out.argmax(1), torch.full((out.shape[0],), head, dtype=torch.long, device=out.device))


def _f32(v: float) -> float:
    """``v`` rounded to float32 (infinities kept)."""
    if math.isinf(v):
        return v
    try:
        return struct.unpack("f", struct.pack("f", v))[0]
    except OverflowError:  # beyond float32's range: it compares as an infinity would
        return math.copysign(math.inf, v)


def _rows(h: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The rows ``index`` of a stage output, in its memory format (``index_select`` returns a
    channels-last input as NCHW, on which the next convolutions run ~2x slower)."""
    return h[index]


def _take(queue: list[tuple[torch.Tensor, torch.Tensor]], k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` queued rows (stage inputs and their stream positions), removed from ``queue``."""
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


def _assemble_host(n: int, done: list[tuple[int, np.ndarray, np.ndarray]], device) -> GatedOutput:
    """Put the per-exit results ``(exit, rows, outputs)`` back into input order, find the classes
    (one ``argmax`` for all, as :func:`gate_scores` finds them) and move them to ``device``."""
    if len(done) == 1:  # everyone left at one gate: rows are in order
        g, _, z = done[0]
        exits = np.full(n, g, dtype=np.int64)
    else:
        rows = np.concatenate([d[1] for d in done])
        order = np.empty_like(rows)
        order[rows] = np.arange(n)  # position of input i among the concatenated rows
        z = np.concatenate([d[2] for d in done])[order]
        exits = np.repeat(np.array([d[0] for d in done], dtype=np.int64), [d[1].size for d in done])[order]
    return GatedOutput(
        torch.from_numpy(z).to(device),
        torch.from_numpy(z.argmax(1).astype(np.int64, copy=False)).to(device),
        torch.from_numpy(exits).to(device),
    )


def _np_max(z: np.ndarray) -> np.ndarray:
    return z.max(1)  # NaN in a row gives NaN, as torch's max


def _np_margin(z: np.ndarray) -> np.ndarray:
    with np.errstate(invalid="ignore"):  # inf - inf and NaN give NaN, as in torch
        if z.shape[1] == 1:  # torch pads with -inf: z - (-inf)
            return z[:, 0] + np.float32(np.inf)
        top = np.partition(z, -2, axis=1)[:, -2:]  # (second largest, largest) per row; NaN sorts last
        return top[:, 1] - top[:, 0]


def _list_nan(row: list[float]) -> bool:
    """Whether ``row`` holds a NaN (Python's max skips one that is not first; torch's gives NaN)."""
    total = sum(row)  # NaN for a NaN, or for inf and -inf together: then look
    return total != total and any(v != v for v in row)


def _list_max(row: list[float]) -> float:
    """The max rule for one sample's outputs as Python floats (float32 values, or sums of two
    float32 values in double: rounded here, once - rounding is monotonic - which gives the float32
    sum's bits)."""
    return math.nan if _list_nan(row) else _f32(max(row))


def _list_margin(row: list[float]) -> float:
    """The margin rule, as :func:`_list_max`: the float32 difference of the two rounded largest."""
    if _list_nan(row):
        return math.nan
    best = max(row)
    if len(row) == 1:
        return _f32(best) + math.inf  # torch pads with -inf: NaN for -inf, else inf
    p = row.index(best)
    return _f32(_f32(best) - _f32(max(row[:p] + row[p + 1 :])))


# exit scores the host computes exactly as gate_scores does on a device (float32 in, float32 out):
# on NumPy arrays (N, K), and on one sample's K outputs as a Python list; the class is the argmax
_HOST_SCORES = {"max": _np_max, "margin": _np_margin}
_LIST_SCORES = {"max": _list_max, "margin": _list_margin}
_RULES = {"max": 0, "margin": 1}  # the kernel's numbers for them


# the most values (N * C * H * W) of a batch the gate kernel pools (on one thread): 4 MB, a batch of
# 64 CIFAR images after a ResNet-56's first stage; beyond, PyTorch pools on all threads
_KERNEL_BATCH = 1 << 20


def _kernel_gates(native: _native.Gate, h: torch.Tensor, t: float) -> tuple[np.ndarray, np.ndarray, int]:
    """The gate kernel on a batch ``h``: its ``(N, K)`` float32 outputs, a boolean mask of the rows
    whose score is at least ``t`` (float32), and how many those are."""
    n = h.shape[0]
    z = np.empty((n, native.k), dtype=np.float32)
    leave = np.empty(n, dtype=np.bool_)  # one byte each, 0 or 1: the kernel's unsigned chars
    count = native.many(h.data_ptr(), n, native.address, t, z.ctypes.data, leave.ctypes.data)
    if count < 0:
        raise MemoryError("the gate kernel could not allocate its buffer (out of memory?); set DGATE_NATIVE=0")
    return z, leave, count


def _kernel_outputs(native: _native.Gate) -> np.ndarray:
    """The ``(1, K)`` outputs of this thread's last single-sample kernel call."""
    z = np.empty((1, native.k), dtype=np.float32)
    if native.outputs(z.ctypes.data, native.k) != native.k:  # the kernel could not allocate its buffer
        raise MemoryError("the gate kernel has no outputs (out of memory?); set DGATE_NATIVE=0")
    return z
