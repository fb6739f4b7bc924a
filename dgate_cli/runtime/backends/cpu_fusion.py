"""One oneDNN call for a convolution and the ReLU and residual add after it, on CPU batches.

On an x86 CPU PyTorch runs a float32 convolution on a batch through oneDNN, then ReLU and the
residual add as passes of their own over the output. :func:`fuse_pointwise` rewrites a stage's
``torch.fx`` graph so that ``conv -> relu``, ``conv -> add`` and ``conv -> add -> relu`` are one
:class:`FusedConv2d` call, which on a CPU batch of two rows or more runs them as one oneDNN
convolution with post-ops (``torch.ops.mkldnn._convolution_pointwise``, the op ``torch.compile``
uses for CPU inference). Measured on a 2-core EPYC (``benchmarks/onednn_fusion.py``): the same bits
as the separate ops; a torchvision ResNet-50 at 224 px, batch 32, 8-12% faster, gated or not (its
``layer1`` activations are large, and the separate passes read and write them again); a CIFAR
ResNet-56 unchanged (within 1.5%: its activations are small).

Anything else runs the module's own ops, as before the rewrite: a single row (PyTorch does not use
oneDNN for it, and is faster so), a GPU, another dtype, autocast, grad mode, oneDNN switched off
(``torch.backends.mkldnn.flags(enabled=False)``), or a PyTorch without the op. The fused module
replaces the convolution at its own name, so parameter names do not change. Left as they are: a
convolution called at more than one place, with hooks, or with an in-place op between it and the
ops it would absorb.
"""

from __future__ import annotations

import operator
from collections import Counter

import torch
import torch.nn.functional as F
from torch import fx, nn


def _find_op():
    """oneDNN's fused convolution op, if this PyTorch has it and it passes :func:`_works`."""
    try:
        op = torch.ops.mkldnn._convolution_pointwise
    except (AttributeError, RuntimeError):  # torch.ops raises for an op it does not have
        return None
    return op if torch.backends.mkldnn.is_available() and _works(op) else None


def _works(op) -> bool:
    """Whether ``op`` (and ``op.binary``) compute what the separate ops do on a tiny convolution:
    the op is private, so its signature could change between PyTorch versions."""
    g = torch.Generator().manual_seed(0)
    x, other = torch.randn(2, 4, 5, 5, generator=g), torch.randn(2, 4, 5, 5, generator=g)
    w, b = torch.randn(4, 4, 3, 3, generator=g), torch.randn(4, generator=g)
    args = ([1, 1], [1, 1], [1, 1], 1)
    try:
        with torch.inference_mode():
            y = F.conv2d(x, w, b, 1, 1)
            return torch.allclose(op(x, w, b, *args, "relu", [], ""), F.relu(y), atol=1e-5) and torch.allclose(
                op.binary(x, other, w, b, *args, "add", None, "relu", [], ""), F.relu(y + other), atol=1e-5
            )
    except Exception:  # another signature, no oneDNN kernel on this CPU
        return False


_OP = None  # found by the first available(), not at import
_CHECKED = False


def available() -> bool:
    """Whether this PyTorch has oneDNN and its fused convolution op, and the op passed its check."""
    global _OP, _CHECKED
    if not _CHECKED:
        _OP, _CHECKED = _find_op(), True
    return _OP is not None


def _autocast_cpu_new() -> bool:
    return torch.is_autocast_enabled("cpu")


try:  # chosen once: this is asked at every convolution
    _autocast_cpu_new()
    _autocast_cpu = _autocast_cpu_new
except TypeError:  # torch < 2.4
    _autocast_cpu = torch.is_autocast_cpu_enabled


class FusedConv2d(nn.Conv2d):
    """A ``Conv2d``, then optionally ``+ other`` and a ReLU: one oneDNN call on CPU batches.

    Built by :func:`fuse_pointwise` from an existing convolution (shares its parameters).
    """

    add: bool
    relu: bool
    unary: str | None  # the op's post-op: "relu" or None
    geometry: tuple[list[int], list[int], list[int], int]  # the op's padding, stride, dilation, groups

    @classmethod
    def of(cls, conv: nn.Conv2d, add: bool, relu: bool) -> FusedConv2d:
        fused = cls.__new__(cls)
        # the same parameters and settings; its own dicts of them (and of hooks), so that
        # registering something on one module does not register it on the other
        fused.__dict__.update({k: v.copy() if isinstance(v, dict) else v for k, v in conv.__dict__.items()})
        fused.add, fused.relu, fused.unary = add, relu, "relu" if relu else None
        fused.geometry = (list(conv.padding), list(conv.stride), list(conv.dilation), conv.groups)
        return fused

    def op_weight(self, x: torch.Tensor) -> torch.Tensor:
        """The weight handed to the oneDNN op for input ``x``: the parameter itself (oneDNN
        reorders it at every call; ``benchmarks/onednn_fusion.py`` tries reordering once)."""
        return self.weight

    def extra_repr(self) -> str:
        return super().extra_repr() + (", + other" if self.add else "") + (", relu" if self.relu else "")

    def forward(self, x: torch.Tensor, other: torch.Tensor | None = None) -> torch.Tensor:  # type: ignore[override]
        """``relu(conv(x) + other)`` (each part as built): one oneDNN call where it applies."""
        if (
            x.dim() == 4
            and x.shape[0] > 1
            and _OP is not None
            and x.device.type == "cpu"
            and x.dtype == torch.float32
            and self.weight.dtype == torch.float32
            and not torch.is_grad_enabled()  # the op has no autograd formula
            and torch._C._get_mkldnn_enabled()
            and not _autocast_cpu()
        ):
            if other is None:
                return _OP(x, self.op_weight(x), self.bias, *self.geometry, self.unary or "none", [], "")
            if isinstance(other, torch.Tensor) and other.dtype == x.dtype and other.shape == self._out_shape(x):
                fmt = (
                    torch.channels_last
                    if x.is_contiguous(memory_format=torch.channels_last)
                    else torch.contiguous_format
                )
                other = other.contiguous(memory_format=fmt)
                return _OP.binary(
                    x, other, self.op_weight(x), self.bias, *self.geometry, "add", None, self.unary, [], ""
                )
        y = self._conv_forward(x, self.weight, self.bias)
        if other is not None:
            y = y + other
        return F.relu(y) if self.relu else y

    def _out_shape(self, x: torch.Tensor) -> tuple[int, ...]:
        return (x.shape[0], self.out_channels) + tuple(
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip(
                x.shape[2:], self.padding, self.dilation, self.kernel_size, self.stride, strict=True
            )
        )


def _is_relu(n: fx.Node, modules: dict[str, nn.Module]) -> bool:
    return (
        (n.op == "call_function" and n.target in (F.relu, torch.relu))
        or (n.op == "call_method" and n.target == "relu")
        or (n.op == "call_module" and type(modules.get(str(n.target))) is nn.ReLU)
    )


def _fusable(m: nn.Module | None) -> bool:
    return (
        type(m) is nn.Conv2d
        and m.padding_mode == "zeros"
        and not isinstance(m.padding, str)
        and m.weight.dtype == torch.float32
        and not (m._forward_hooks or m._forward_pre_hooks)
    )


_IN_PLACE_OPERATORS = {
    getattr(operator, f"i{name}")
    for name in ("add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "matmul", "and", "or", "xor")
}


def _in_place(n: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if n.kwargs.get("inplace") is True:
        return True
    if n.op == "call_module":
        return getattr(modules.get(str(n.target)), "inplace", False) is True
    if n.op == "call_method":
        return str(n.target).endswith("_")
    if n.op == "call_function":
        return n.target in _IN_PLACE_OPERATORS or getattr(n.target, "__name__", "").endswith("_")
    return False


def _in_place_between(first: fx.Node, chain: list[fx.Node], modules: dict[str, nn.Module]) -> bool:
    n = first.next
    while n is not chain[-1]:
        if n not in chain and _in_place(n, modules):
            return True
        n = n.next
    return False


def fuse_pointwise(stage: nn.Module) -> nn.Module:
    """``stage`` with each ``conv -> [add ->] relu`` and ``conv -> add`` as one :class:`FusedConv2d`.

    Rewrites a ``torch.fx.GraphModule`` in place and returns it; anything else, or a PyTorch without
    oneDNN, is returned unchanged. A convolution whose output has other users stays as it is.
    """
    if not isinstance(stage, fx.GraphModule) or not available():
        return stage
    modules = dict(stage.named_modules())
    graph = stage.graph
    calls = Counter(str(n.target) for n in graph.nodes if n.op == "call_module")
    changed = False
    for node in list(graph.nodes):
        conv = modules.get(str(node.target)) if node.op == "call_module" else None
        if not _fusable(conv) or calls[str(node.target)] != 1 or len(node.users) != 1:
            continue
        if len(node.args) != 1 or node.kwargs:
            continue
        chain, other = [node], None
        user = next(iter(node.users))
        if (
            user.op == "call_function"
            and user.target in (operator.add, torch.add)
            and len(user.args) == 2
            and not user.kwargs
        ):
            o = user.args[1] if user.args[0] is node else user.args[0]
            if isinstance(o, fx.Node) and o is not node:
                chain, other = [node, user], o
        after = list(chain[-1].users)
        if len(after) == 1 and _is_relu(after[0], modules):
            chain.append(after[0])
        if len(chain) == 1:  # nothing to fuse: keep PyTorch's own convolution
            continue
        if _in_place_between(node, chain, modules):  # the fused call runs at chain[-1]'s place
            continue
        relu = _is_relu(chain[-1], modules)
        stage.set_submodule(str(node.target), FusedConv2d.of(conv, other is not None, relu))
        with graph.inserting_after(chain[-1]):
            fused = graph.call_module(str(node.target), (node.args[0],) if other is None else (node.args[0], other))
        chain[-1].replace_all_uses_with(fused)
        for n in reversed(chain):
            graph.erase_node(n)
        changed = True
    if changed:
        graph.lint()
        stage.recompile()
    return stage
