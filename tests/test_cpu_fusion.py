"""cpu_fusion: conv -> [add ->] relu as one oneDNN call on CPU batches, the same results as the ops."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from dgate_cli.runtime.backends import cpu_fusion
from dgate_cli.runtime.backends.cpu_fusion import FusedConv2d, fuse_pointwise

pytestmark = pytest.mark.skipif(not cpu_fusion.available(), reason="this PyTorch has no oneDNN fused convolution op")


class Block(nn.Module):
    """Every pattern: conv->F.relu, conv->add->nn.ReLU, conv->add, a conv with two users, torch.relu."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(8, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 1)
        self.d = nn.Conv2d(8, 8, 3, padding=1)
        self.e = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        h = F.relu(self.a(x))
        h = self.act(self.b(h) + x)  # residual, then a ReLU module
        g = self.c(h) + h  # residual, no ReLU
        d = self.d(g)  # two users: stays a plain convolution
        return torch.relu(self.e(d + d.mean()))


def _rewritten(module: nn.Module) -> fx.GraphModule:
    return fuse_pointwise(fx.symbolic_trace(module))


@pytest.fixture(scope="module")
def block() -> nn.Module:
    torch.manual_seed(0)
    return Block().eval()


def test_rewrite_fuses_each_pattern_and_keeps_parameter_names(block):
    gm = _rewritten(block)
    fused = {name: (m.add, m.relu) for name, m in gm.named_modules() if isinstance(m, FusedConv2d)}
    assert fused == {"a": (False, True), "b": (True, True), "c": (True, False), "e": (False, True)}
    assert type(gm.d) is nn.Conv2d
    assert list(gm.state_dict()) == list(block.state_dict())
    assert gm.a.weight is block.a.weight  # shares the parameters
    code = gm.code
    assert "relu" not in code.replace("self.act", "") and " + x" not in code


@pytest.mark.parametrize("n", [1, 2, 5])
@pytest.mark.parametrize("channels_last", [False, True])
def test_same_results_as_the_separate_ops(block, n, channels_last):
    gm = _rewritten(block)
    torch.manual_seed(n)
    x = torch.randn(n, 8, 12, 12)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want, got = block(x.clone()), gm(x.clone())
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


class _Counting:
    """Stands in for the oneDNN op, counting calls (and the binary overload)."""

    def __init__(self, op):
        self.op, self.calls, self.binary_calls = op, 0, 0

    def __call__(self, *args):
        self.calls += 1
        return self.op(*args)

    def binary(self, *args):
        self.binary_calls += 1
        return self.op.binary(*args)


def test_batches_take_the_fused_op_and_single_rows_grad_and_disabled_onednn_do_not(block, monkeypatch):
    gm = _rewritten(block)
    spy = _Counting(cpu_fusion._OP)
    monkeypatch.setattr(cpu_fusion, "_OP", spy)
    x = torch.randn(3, 8, 12, 12)
    with torch.inference_mode():
        gm(x)
    assert (spy.calls, spy.binary_calls) == (2, 2)  # a, e; b, c
    with torch.inference_mode():
        gm(x[:1])
    with torch.inference_mode(), torch.backends.mkldnn.flags(enabled=False):
        gm(x)
    assert (spy.calls, spy.binary_calls) == (2, 2)
    # autograd: the module's own ops, with the same gradients
    xg = x.clone().requires_grad_()
    gm(xg).sum().backward()
    assert (spy.calls, spy.binary_calls) == (2, 2)
    xr = x.clone().requires_grad_()
    block(xr).sum().backward()
    torch.testing.assert_close(xg.grad, xr.grad, rtol=1e-5, atol=1e-5)


def test_a_broadcast_add_falls_back_to_the_ops():
    class Bias(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(4, 4, 3, padding=1)
            self.shift = nn.Parameter(torch.randn(1, 4, 1, 1))

        def forward(self, x):
            return F.relu(self.conv(x) + self.shift)

    m = Bias().eval()
    gm = _rewritten(m)
    assert isinstance(gm.conv, FusedConv2d) and gm.conv.add
    x = torch.randn(3, 4, 6, 6)
    with torch.inference_mode():
        torch.testing.assert_close(gm(x), m(x), rtol=1e-6, atol=1e-6)


def test_other_dtypes_and_modules_are_left_alone():
    plain = nn.Sequential(nn.Conv2d(3, 3, 3), nn.ReLU())
    assert fuse_pointwise(plain) is plain  # not a GraphModule
    double = fx.symbolic_trace(Block().double())
    assert not any(isinstance(m, FusedConv2d) for m in fuse_pointwise(double).modules())
    torch.manual_seed(1)
    ref = Block().eval()
    gm = _rewritten(copy.deepcopy(ref)).double()  # fused, then turned float64: its own ops
    x = torch.randn(2, 8, 12, 12, dtype=torch.float64)
    with torch.inference_mode():
        torch.testing.assert_close(gm(x), ref.double()(x), rtol=1e-12, atol=1e-12)


class Awkward(nn.Module):
    """Graphs the rewrite must leave alone, or fuse without changing what they compute."""

    def __init__(self) -> None:
        super().__init__()
        self.twice = nn.Conv2d(4, 4, 3, padding=1)  # called at two places
        self.before = nn.Conv2d(4, 4, 3, padding=1)  # an in-place op on its input before its relu
        self.sized = nn.Conv2d(4, 4, 1)  # + an int

    def forward(self, x):
        h = self.twice(F.relu(self.twice(x)))
        y = self.before(h)
        z = F.relu(h, inplace=True)
        out = F.relu(y) + z
        return self.sized(out) + out.size(1)


@pytest.mark.parametrize("n", [1, 3])
def test_awkward_graphs_compute_what_they_did(n):
    torch.manual_seed(2)
    ref = Awkward().eval()
    gm = _rewritten(copy.deepcopy(ref))
    assert type(gm.twice) is nn.Conv2d and type(gm.before) is nn.Conv2d
    assert isinstance(gm.sized, FusedConv2d) and gm.sized.add  # an int other: runs the ops
    x = torch.randn(n, 4, 6, 6)
    with torch.inference_mode():
        torch.testing.assert_close(gm(x.clone()), ref(x.clone()), rtol=1e-6, atol=1e-6)


def test_grad_mode_and_autocast_run_the_modules_own_ops(block):
    gm = _rewritten(copy.deepcopy(block))
    for m in gm.modules():  # BitFit-style: only the biases train
        for name, p in m.named_parameters(recurse=False):
            p.requires_grad_(name == "bias")
    x = torch.randn(3, 8, 12, 12)
    gm(x).sum().backward()
    assert gm.b.bias.grad is not None and gm.b.bias.grad.abs().sum() > 0
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert gm(x).dtype == block(x).dtype == torch.bfloat16
        assert gm.a(x).dtype == F.relu(block.a(x)).dtype == torch.bfloat16  # a float32 input


def test_the_fused_module_has_its_own_hook_dicts(block):
    traced = fx.symbolic_trace(block)  # shares its leaf modules with block
    gm = fuse_pointwise(traced)
    gm.a.register_forward_hook(lambda *args: None)
    assert not block.a._forward_hooks
    assert "relu" in repr(gm.a) and "+ other" in repr(gm.b)


def test_an_op_that_fails_its_check_turns_the_rewrite_off(block, monkeypatch):
    assert cpu_fusion._works(cpu_fusion._OP)

    class NoRelu:  # computes something else
        def __call__(self, x, w, b, pad, stride, dil, groups, *rest):
            return F.conv2d(x, w, b, stride, pad, dil, groups)

        binary = None

    def new_signature(*args):
        raise RuntimeError("mkldnn::_convolution_pointwise() expected at most 9 arguments")

    assert not cpu_fusion._works(NoRelu()) and not cpu_fusion._works(new_signature)
    monkeypatch.setattr(cpu_fusion, "_OP", None)  # as available() leaves it then
    traced = fx.symbolic_trace(block)
    assert fuse_pointwise(traced) is traced
    assert not any(isinstance(m, FusedConv2d) for m in traced.modules())
