"""The gate kernel backend against the reference decision, with a tolerance: the same decisions a
margin away from the threshold, outputs equal to float rounding; None where it does not apply."""

from __future__ import annotations

import math
import pickle

import pytest
import torch
from conftest import assert_same_decisions, near_tie, robust_cut
from test_runtime import every_exit, make_model

from dgate_cli.gates.pooling import Pooling
from dgate_cli.gates.scores import gate_scores
from dgate_cli.runtime.backends import default_backends, gate_kernel
from dgate_cli.runtime.decisions import decide
from dgate_cli.runtime.plan import Gate

TORCH_THREADS = 1

needs_kernel = pytest.mark.skipif(
    gate_kernel.status() != "on", reason=f"the gate kernel is {gate_kernel.status()} in this install"
)


def stage_output(n: int, channels_last: bool, c: int = 8, side: int = 16, seed: int = 0) -> torch.Tensor:
    torch.manual_seed(seed)
    h = torch.relu(torch.randn(n, c, side, side))
    return h.contiguous(memory_format=torch.channels_last) if channels_last else h


def a_gate(pooling: Pooling, c: int = 8, k: int = 5, seed: int = 1) -> Gate:
    torch.manual_seed(seed)
    d = pooling.feature_size(channels=c)
    return Gate(torch.randn(k, d), torch.randn(k), pooling, "nchw")


@needs_kernel
@pytest.mark.parametrize("rule", ["max", "margin"])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("n", [1, 7, 64])
@pytest.mark.parametrize("size", [1, 2, 4])
def test_the_kernel_decides_as_the_reference(rule: str, channels_last: bool, n: int, size: int):
    gate = a_gate(Pooling((size,)))
    h = stage_output(max(n, 2), channels_last, seed=n)
    ref_scores, _ = gate_scores(gate(h), rule)
    t = robust_cut(ref_scores, 0.5)  # a margin away from every score
    h = h[:n]
    want = decide(gate, h, t, rule)
    got = gate_kernel.GateKernel().decide(0, gate, h, t, rule)
    assert got is not None
    assert torch.equal(got.leave, want.leave) and got.count == int(want.leave.sum())
    if got.count:
        torch.testing.assert_close(got.outputs, want.outputs, atol=1e-5, rtol=1e-5)
        sure = ~near_tie(want.outputs)
        assert torch.equal(got.pred[sure], want.pred[sure])


@needs_kernel
@pytest.mark.parametrize(
    ("gate", "h", "rule"),
    [
        (a_gate(Pooling((2,))), stage_output(4, True), "softmax"),  # a rule the kernel does not make
        (a_gate(Pooling((2,), ("avg", "max"))), stage_output(4, True), "margin"),  # two poolings
        (a_gate(Pooling((1, 2))), stage_output(4, True), "margin"),  # two grids
        (a_gate(Pooling((2,))), stage_output(4, True).half(), "margin"),  # half precision
        (a_gate(Pooling((3,))), stage_output(4, True), "margin"),  # 16 is not a multiple of 3
        (a_gate(Pooling((2,))), stage_output(64, False, c=8, side=256), "margin"),  # beyond its batch limit
        (a_gate(Pooling((2,))), stage_output(2, True)[:, :, ::2], "margin"),  # not dense
    ],
    ids=["softmax", "avg+max", "two grids", "half", "uneven", "large", "strided"],
)
def test_the_kernel_declines_what_it_does_not_support(gate, h, rule):
    assert gate_kernel.GateKernel().decide(0, gate, h, 0.5, rule) is None


@needs_kernel
@pytest.mark.parametrize("channels_last", [True, False])
def test_one_binding_serves_every_batch_size(channels_last: bool):
    kernel = gate_kernel.GateKernel()
    gate = a_gate(Pooling((2,)))
    h = stage_output(40, channels_last)
    t = robust_cut(gate_scores(gate(h), "margin")[0], 0.5)
    for n in (40, 17, 5, 2):  # the survivor batch sizes of a run
        d = kernel.decide(0, gate, h[:n].contiguous(memory_format=h_format(channels_last)), t, "margin")
        assert torch.equal(d.leave, decide(gate, h[:n], t, "margin").leave)
    assert len(kernel._bound) == 1  # not a copy of the gate's weights per batch size


def h_format(channels_last: bool) -> torch.memory_format:
    return torch.channels_last if channels_last else torch.contiguous_format


@needs_kernel
def test_edited_gate_weights_reach_the_kernel():
    kernel = gate_kernel.GateKernel()
    gate = a_gate(Pooling((2,)))
    h = stage_output(6, True)
    before = kernel.decide(0, gate, h, -math.inf, "max")
    with torch.no_grad():
        gate.weight.mul_(2.0)
        gate.bias.mul_(2.0)
    after = kernel.decide(0, gate, h, -math.inf, "max")
    torch.testing.assert_close(after.outputs, 2 * before.outputs, atol=1e-5, rtol=1e-5)


@needs_kernel
@pytest.mark.parametrize("channels_last", [True, False])
def test_a_model_decides_alike_with_and_without_the_kernel(channels_last: bool):
    model = make_model(Pooling((4,)), channels_last=channels_last, seed=3)
    x = torch.randn(48, 3, 16, 16)
    model.set_thresholds(every_exit(model, x))
    model.backends = []
    want = [model(x), *(model(x[i : i + 1]) for i in range(0, 48, 5))]
    model.backends = default_backends(torch.device("cpu"))
    assert [b.name for b in model.backends] == ["gate kernel"]
    got = [model(x), *(model(x[i : i + 1]) for i in range(0, 48, 5))]
    for a, b in zip(want, got, strict=True):
        assert_same_decisions(a, b)
        torch.testing.assert_close(a.logits, b.logits, atol=1e-5, rtol=1e-5)
    again = pickle.loads(pickle.dumps(model))  # the kernel's bindings are rebuilt, not pickled
    assert_same_decisions(again(x), got[0])


def test_the_kernel_can_be_turned_off(monkeypatch):
    monkeypatch.setenv("DGATE_KERNEL", "0")
    assert gate_kernel.status() == "off (DGATE_KERNEL=0)"
    assert gate_kernel.default() is None and default_backends(torch.device("cpu")) == []
    assert default_backends(torch.device("meta")) == []  # only CPUs have it


def test_default_backends_take_a_device_or_its_name():
    names = [b.name for b in default_backends("cpu")]
    assert names == ([] if gate_kernel.status() != "on" else ["gate kernel"])
    assert [b.name for b in default_backends(torch.device("cpu"))] == names
    assert default_backends("cuda") == [] and default_backends("meta") == []
