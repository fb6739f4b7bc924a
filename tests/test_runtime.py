"""The gated runtime on a small synthetic network: the gate fast path, the single-sample path,
compaction (order and memory format), malloc tuning and ``bench``; no data needed."""

from __future__ import annotations

import copy
import math
import os
import pickle
import struct
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_decisions, cascade_thresholds, near_tie, robust_cut
from torch import nn

from dgate_cli.evaluation import bench as bench_module
from dgate_cli.evaluation.bench import bench
from dgate_cli.gates.pooling import Pooling, pool
from dgate_cli.gates.scores import gate_scores
from dgate_cli.runtime import model as runtime
from dgate_cli.runtime.backends import gate_kernel as _native
from dgate_cli.runtime.backends import malloc as _malloc
from dgate_cli.runtime.model import _HOST_SCORES, _LIST_SCORES, GatedModel, GatedOutput, _f32

TORCH_THREADS = 1  # see conftest._threads
K = 5


def make_model(pooling: Pooling, channels_last: bool = True, score: str = "margin", seed: int = 0) -> GatedModel:
    torch.manual_seed(seed)
    stages = [
        nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, K)),
    ]
    d = pooling.feature_size(channels=8)
    model = GatedModel(
        stages,
        [torch.randn(K, d), torch.randn(K, d)],
        [torch.randn(K), torch.randn(K)],
        ["nchw", "nchw"],
        pooling,
        [math.inf, math.inf],
        score=score,
        reach_costs=[100.0, 200.0, 210.0],
        gate_costs=[1.0, 1.0],
        channels_last=channels_last,
    )
    if channels_last:
        model.stages.to(memory_format=torch.channels_last)
    return model


def reference_outputs(model: GatedModel, g: int, h: torch.Tensor) -> torch.Tensor:
    """What the gate computed at fit time: pool in NCHW order, then the linear layer."""
    return pool(h, model.poolings[g], "nchw").float() @ model.gate_weight(g).t() + model.gate_bias(g)


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize(
    "pooling", [Pooling((1,)), Pooling((4,)), Pooling((2,), ("avg", "max")), Pooling((1, 2))], ids=str
)
def test_gate_outputs_equal_pooling_then_linear(pooling: Pooling, channels_last: bool):
    model = make_model(pooling, channels_last)
    x = torch.randn(6, 3, 16, 16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        h = model.stages[0](x)
        assert h.is_contiguous(memory_format=torch.channels_last) == channels_last
        for g, hh in enumerate([h, model.stages[1](h)]):
            got = model.gate_outputs(g, hh)
            assert got.shape == (6, K)
            torch.testing.assert_close(got, reference_outputs(model, g, hh), atol=1e-5, rtol=1e-5)
    fast = [plan.size for plan in model._plans.values()]
    # the reordered-weights path is taken exactly for one average grid (either memory format)
    assert fast == ([pooling.sizes[0]] * 2 if pooling.ops == ("avg",) and len(pooling.sizes) == 1 else [0, 0])


def test_half_precision_stage_outputs_are_scored_in_float32():
    model = make_model(Pooling((4,)))
    h = torch.randn(3, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    got = model.gate_outputs(0, h.half())
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, reference_outputs(model, 0, h.half()), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_model_keeps_float32_gates(dtype: torch.dtype):
    model = make_model(Pooling((4,)))
    weight = model.gate_weight(0).clone()
    x = torch.randn(16, 3, 16, 16)
    s0, _ = scores_at_gates(model, x, "margin")
    model.set_thresholds([midway(s0, 0.5), math.inf])
    model.to(dtype)
    assert model.stages[0][0].weight.dtype == dtype
    assert model.gate_weight(0).dtype == torch.float32 and torch.equal(model.gate_weight(0), weight)  # not rounded
    out = model(x.to(dtype))
    assert out.logits.dtype == torch.float32 and out.exit.dtype == torch.long
    with torch.inference_mode():
        h = model.stages[0](x.to(dtype).contiguous(memory_format=torch.channels_last))
        z = model.gate_outputs(0, h)
    torch.testing.assert_close(z, reference_outputs(model, 0, h), atol=1e-5, rtol=1e-5)  # float32 weights, half h
    s, _ = gate_scores(z, "margin")
    assert torch.equal(out.exit == 0, s >= model.thresholds[0])  # the exits are these scores' decisions
    model.float()
    assert model.stages[0][0].weight.dtype == torch.float32 and torch.equal(model.gate_weight(0), weight)


@pytest.mark.parametrize("score", ["max", "margin"])
def test_host_rules_are_gate_scores_bit_for_bit(score: str):
    torch.manual_seed(1)
    z = torch.randn(2000, K) * torch.logspace(-3, 3, 2000)[:, None]
    z[:50, 1] = z[:50, 0]  # exact ties for the top class
    z[50:100, 2] = torch.nextafter(z[50:100, 3], torch.tensor(math.inf))  # margins of one ulp
    z[100:110] = 0.0  # all tied
    s, p = gate_scores(z, score)
    hs = _HOST_SCORES[score](z.numpy())
    assert hs.dtype == np.float32
    assert torch.equal(torch.from_numpy(hs), s)
    assert torch.equal(torch.from_numpy(z.numpy().argmax(1)), p)  # the host's classes: NumPy's argmax
    for i in range(z.shape[0]):  # one sample, as a Python list
        assert _LIST_SCORES[score](z[i].tolist()) == float(s[i]), (i, z[i])


@pytest.mark.parametrize("score", ["max", "margin"])
def test_one_sample_scored_from_unrounded_sums_as_from_float32_outputs(score: str):
    # the single-sample path adds the bias to the product in double and rounds once in the rule:
    # the same scores as the float32 outputs product + bias a device computes
    torch.manual_seed(2)
    product = torch.randn(3000, K) * torch.logspace(-4, 4, 3000)[:, None]
    bias = torch.randn(K) * 3
    bias[0] = 1e-3  # small next to large products: sums that round
    product[:40, 1] = product[:40, 0] + bias[0] - bias[1]  # near ties after the bias
    z = product + bias  # float32
    s, p = gate_scores(z, score)
    for i in range(z.shape[0]):
        row = [v + b for v, b in zip(product[i].tolist(), bias.tolist(), strict=True)]
        assert _LIST_SCORES[score](row) == float(s[i]), (i, row)
        assert np.array(row, dtype=np.float32).tolist() == z[i].tolist()  # the logits the host returns
        assert int(np.array(row, dtype=np.float32).argmax()) == int(p[i])


@pytest.mark.parametrize("score", ["max", "margin"])
def test_nan_and_infinite_outputs_score_like_torch(score: str):
    nan, inf = math.nan, math.inf
    z = torch.tensor([[1.0, nan, 3.0], [nan, 2.0, nan], [-inf, -inf, -inf], [inf, inf, 1.0], [inf, 0.0, 1.0]])
    s, p = gate_scores(z, score)
    hs = _HOST_SCORES[score](z.numpy())
    assert torch.allclose(torch.from_numpy(hs), s, equal_nan=True, atol=0, rtol=0)  # bit-equal, NaN = NaN
    assert torch.equal(torch.from_numpy(z.numpy().argmax(1)), p)
    for i in range(z.shape[0]):
        ls = _LIST_SCORES[score](z[i].tolist())
        assert ls == float(s[i]) or (math.isnan(ls) and math.isnan(float(s[i]))), (i, ls)
    one = torch.tensor([[-inf], [nan], [2.0]])  # K = 1: torch's margin is z - (-inf)
    s1, _ = gate_scores(one, "margin")
    assert torch.allclose(torch.from_numpy(_HOST_SCORES["margin"](one.numpy())), s1, equal_nan=True, atol=0, rtol=0)
    assert [_LIST_SCORES["margin"](r) for r in one.tolist()][2] == inf
    assert all(math.isnan(_LIST_SCORES["margin"](r)) for r in one.tolist()[:2])


def test_single_class_margin_is_infinite_on_both_paths():
    z = torch.tensor([[0.25], [-1.0]])
    hs = _HOST_SCORES["margin"](z.numpy())
    assert hs.tolist() == [math.inf, math.inf] and z.numpy().argmax(1).tolist() == [0, 0]
    assert _LIST_SCORES["margin"]([0.25]) == math.inf
    s, p = gate_scores(z, "margin")
    assert s.tolist() == [math.inf, math.inf] and p.tolist() == [0, 0]


def test_thresholds_compare_in_float32_like_the_device():
    a = 0.1  # not a float32 number: float32(0.1) > 0.1
    assert _f32(a) > a and _f32(a) == struct.unpack("f", struct.pack("f", a))[0]
    assert _f32(math.inf) == math.inf and _f32(-math.inf) == -math.inf
    assert _f32(1e300) == math.inf and _f32(-1e300) == -math.inf
    score = torch.tensor([_f32(a)])
    assert bool(score >= a)  # torch casts the threshold to float32 before comparing
    assert _f32(a) >= _f32(a)


def device_path(model: GatedModel, x: torch.Tensor) -> GatedOutput:
    """The tensor (GPU) exit decisions, run on the CPU for comparison, on ``x`` in the model's format."""
    if model.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        return model._forward_device(x)


def scores_at_gates(model: GatedModel, x: torch.Tensor, score: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every sample's score at gate 0 and gate 1 (all samples through both stages)."""
    with torch.inference_mode():
        h0 = model.stages[0](x.contiguous(memory_format=torch.channels_last))
        s0, _ = gate_scores(model.gate_outputs(0, h0), score)
        s1, _ = gate_scores(model.gate_outputs(1, model.stages[1](h0)), score)
    return s0, s1


def midway(scores: torch.Tensor, q: float) -> float:
    """A threshold near the ``q`` quantile of ``scores``, in the middle of a gap between neighbouring
    scores wider than float rounding (conftest.robust_cut): decisions then survive the rounding
    differences between batch sizes (the convolutions pick other kernels at batch size 1), the gate
    kernel and PyTorch, a stage's input compacted or not."""
    return robust_cut(scores, q)


def every_exit(model: GatedModel, x: torch.Tensor, stay=(0.6, 0.5)) -> list[float]:
    """Thresholds under which some of ``x`` leave at each gate and some reach the head, a margin away
    from every score that decides (each gate's cut from the samples that reach it)."""
    s0, s1 = scores_at_gates(model, x, model.score)
    return cascade_thresholds(torch.stack([s0, s1], 1), list(stay))


@pytest.mark.parametrize("score", ["max", "margin", "softmax"])
def test_one_sample_at_a_time_decides_like_the_batch(score: str):
    model = make_model(Pooling((4,)), score=score)
    x = torch.randn(64, 3, 16, 16)
    model.set_thresholds(every_exit(model, x))
    big = model(x)
    counts = torch.bincount(big.exit, minlength=3)
    assert (counts > 0).all(), counts
    singles = [model(x[i : i + 1]) for i in range(64)]
    together = GatedOutput(*(torch.cat([getattr(o, f) for o in singles]) for f in GatedOutput._fields))
    assert_same_decisions(big, together)
    torch.testing.assert_close(together.logits, big.logits, atol=1e-4, rtol=1e-4)
    assert all(o.pred.dtype == o.exit.dtype == torch.long for o in singles)


@pytest.mark.parametrize("score", ["max", "margin"])
def test_a_single_sample_at_its_threshold_leaves_and_one_ulp_above_does_not(score: str):
    model = make_model(Pooling((4,)), score=score)
    for _ in range(8):
        x = torch.randn(1, 3, 16, 16)
        with torch.inference_mode():
            h0 = model.stages[0](x.contiguous(memory_format=torch.channels_last))
            s, p = gate_scores(model.gate_outputs(0, h0), score)
        at = float(s[0])
        model.set_thresholds([at + abs(at) * 1e-12, math.inf])  # a double that rounds to the score in float32
        out = model(x)
        assert int(out.exit[0]) == 0 and int(out.pred[0]) == int(p[0])
        above = float(torch.nextafter(s, torch.tensor(math.inf))[0])
        model.set_thresholds([above, math.inf])
        assert int(model(x).exit[0]) == 2


def test_outputs_come_back_in_input_order_with_each_exits_logits():
    model = make_model(Pooling((2,)))
    x = torch.randn(40, 3, 16, 16)
    with torch.inference_mode():
        h0 = model.stages[0](x.contiguous(memory_format=torch.channels_last))
        h1 = model.stages[1](h0)
        z0, z1, zb = model.gate_outputs(0, h0), model.gate_outputs(1, h1), model.stages[2](h1)
        s0, _ = gate_scores(z0, "margin")
        s1, _ = gate_scores(z1, "margin")
    t = [midway(s0, 0.5), midway(s1, 0.5)]  # (gate 1 sees a compacted batch: its scores up to rounding)
    model.set_thresholds(t)
    out = model(x)
    want_exit = torch.where(s0 >= _f32(t[0]), 0, torch.where(s1 >= _f32(t[1]), 1, 2))
    assert torch.equal(out.exit, want_exit)
    want = torch.stack([z0, z1, zb])[want_exit, torch.arange(40)]
    torch.testing.assert_close(out.logits, want, atol=1e-5, rtol=1e-5)
    sure = ~near_tie(want)  # gate 1 and the head ran on the survivors only: a near tie may go either way
    assert torch.equal(out.pred[sure], want.argmax(1)[sure]) and 2 * int(sure.sum()) >= len(sure)
    # everyone at the first gate, and everyone through to the head
    model.set_thresholds([-math.inf, math.inf])
    assert torch.equal(model(x).exit, torch.zeros(40, dtype=torch.long))
    model.set_thresholds([math.inf, math.inf])
    torch.testing.assert_close(model(x).logits, zb)


@pytest.mark.parametrize("score", ["max", "margin"])
def test_host_decisions_equal_the_device_path(score: str):
    """The NumPy exit decisions (CPU batches) and the tensor ones (GPU batches) give the same
    exits, classes and outputs, run here side by side on the CPU."""
    model = make_model(Pooling((2,)), score=score, seed=3)
    x = torch.randn(48, 3, 16, 16)
    last = assert_host_equals_device(model, x, score)
    assert int((last.exit == 2).sum()) == 1  # the last case: the lone survivor went on to the head


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("pooling", [Pooling((1,)), Pooling((4,)), Pooling((2,), ("avg", "max"))], ids=str)
def test_host_equals_device_for_every_gate_layout(pooling: Pooling, channels_last: bool):
    # NCHW pooled tensors use the (C, s, s) weights, channels-last ones the (s, s, C) weights,
    # other poolings the features' own order: bit for bit the same outputs either way
    model = make_model(pooling, channels_last=channels_last, seed=4)
    x = torch.randn(48, 3, 16, 16)
    assert_host_equals_device(model, x, "margin")
    s0, s1 = scores_at_gates(model, x, "margin")
    model.set_thresholds([midway(s0, 0.6), midway(s1, 0.5)])
    for i in range(0, 48, 7):  # one sample: decided from a Python list with the bias added there
        one = x[i : i + 1]
        host = model(one)
        dev = device_path(model, one)
        assert torch.equal(host.logits, dev.logits) and torch.equal(host.exit, dev.exit), i
        assert torch.equal(host.pred, dev.pred), i


def assert_host_equals_device(model: GatedModel, x: torch.Tensor, score: str) -> GatedOutput:
    """Host and device paths agree bit for bit over thresholds from every sample's exit to none;
    returns the host's output for the last (one survivor after gate 0, none after gate 1)."""
    s0, s1 = scores_at_gates(model, x, score)
    # (1/47, q1): one survivor after gate 0, decided from a Python list at gate 1
    for q0, q1 in [(0.3, 0.5), (0.0, 0.9), (1.0, 0.2), (0.7, 1.0), (1 / 47, 0.0), (1 / 47, 1.0)]:
        t = [float(s0.sort().values[int(q0 * 47)]), float(s1.sort().values[int(q1 * 47)])]  # ties: some sample's score
        model.set_thresholds(t)
        host = model(x)
        dev = device_path(model, x)
        assert torch.equal(host.exit, dev.exit) and torch.equal(host.pred, dev.pred), (q0, q1)
        assert torch.equal(host.logits, dev.logits)
        assert host.exit.dtype == host.pred.dtype == torch.long and host.logits.dtype == torch.float32
    return host


def test_a_threshold_beyond_float32_keeps_the_gate_open_and_new_weights_are_used():
    model = make_model(Pooling((2,)))
    x = torch.randn(12, 3, 16, 16)
    model(x)  # gate plans cached
    model.set_thresholds([0.0, math.inf])
    model(x)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["gate0_bias"][0] = math.inf  # class 0 at +inf: a margin of +inf for every sample
    model.load_state_dict(state)  # must drop the cached plans (they hold copies of the bias)
    model.set_thresholds([1e39, math.inf])  # above float32's range, but open: only +inf passes
    host = model(x)
    dev = device_path(model, x)
    assert host.exit.tolist() == dev.exit.tolist() == [0] * 12
    assert host.pred.tolist() == dev.pred.tolist() == [0] * 12
    assert model(x[:1]).exit.tolist() == [0]  # one sample, from a Python list
    assert model.exit_costs()[0] == 101.0  # the open gate is charged


def test_backbone_module_shares_the_stages_and_runs_in_inference_mode():
    model = make_model(Pooling((2,)))
    x = torch.randn(5, 3, 16, 16)
    backbone = model.backbone()
    assert isinstance(backbone, nn.Module) and backbone.stages is model.stages
    got = backbone(x)  # called outside inference mode: it enters it itself, as forward does
    assert got.is_inference() and not got.requires_grad and got.dtype == torch.float32
    assert torch.equal(got, model.backbone_forward(x))
    model.set_thresholds([math.inf, math.inf])
    out = model(x)
    assert out.logits.is_inference() and torch.equal(out.logits, got) and out.exit.tolist() == [2] * 5


def test_thresholds_are_a_copy_and_assigning_a_list_rounds_it_again():
    model = make_model(Pooling((2,)))
    model.set_thresholds([0.1, math.inf])
    model.thresholds[0] = 5.0  # a copy: no effect on the model
    assert model.thresholds == [0.1, math.inf] and model._t32[0] == _f32(0.1)
    model.thresholds = [0.2, 0.3]
    assert model._t32 == [_f32(0.2), _f32(0.3)]


def test_compaction_keeps_the_channels_last_memory_format():
    model = make_model(Pooling((4,)))
    x = torch.randn(32, 3, 16, 16)
    s0, _ = scores_at_gates(model, x, "margin")
    t = midway(s0, 0.5)
    model.set_thresholds([t, math.inf])
    seen: list[tuple[int, bool]] = []
    hook = model.stages[1].register_forward_pre_hook(
        lambda mod, args: seen.append((args[0].shape[0], args[0].is_contiguous(memory_format=torch.channels_last)))
    )
    model(x)
    hook.remove()
    # about half left at gate 0; the survivors stay channels-last (index_select would make them NCHW)
    assert seen == [(int((s0 < t).sum()), True)] and 0 < seen[0][0] < 32


@pytest.mark.parametrize("score", ["margin", "softmax"])  # host and device decisions
def test_stream_decides_like_forward_and_keeps_stage_batches_full(score: str):
    model = make_model(Pooling((2,)), score=score, seed=5)
    x = torch.randn(70, 3, 16, 16)
    s0, s1 = scores_at_gates(model, x, score)
    model.set_thresholds([midway(s0, 0.5), midway(s1, 0.5)])
    want = model(x)
    sizes: list[list[int]] = [[], [], []]
    seen_formats: list[bool] = []
    hooks = [
        st.register_forward_pre_hook(lambda mod, args, k=k: sizes[k].append(args[0].shape[0]))
        for k, st in enumerate(model.stages)
    ]
    hooks.append(
        model.stages[1].register_forward_pre_hook(
            lambda mod, args: seen_formats.append(args[0].is_contiguous(memory_format=torch.channels_last))
        )
    )
    got_index, got = [], []
    for index, out in model.stream(x.split(8)):  # 8 batches of 8 and one of 6
        got_index.append(index)
        got.append(out)
    for hook in hooks:
        hook.remove()
    index = torch.cat(got_index)
    assert sorted(index.tolist()) == list(range(70))  # every sample exactly once
    order = torch.empty_like(index)
    order[index] = torch.arange(70)
    exit_ = torch.cat([o.exit for o in got])[order]
    streamed = GatedOutput(*(torch.cat([getattr(o, f) for o in got])[order] for f in GatedOutput._fields))
    assert_same_decisions(want, streamed)
    torch.testing.assert_close(torch.cat([o.logits for o in got])[order], want.logits, atol=1e-5, rtol=1e-5)
    # stage 0 runs each input batch; the later stages run full batches of 8, one remnant each at the end
    assert sizes[0] == [8] * 8 + [6]
    reached = [int((exit_ >= g).sum()) for g in (1, 2)]
    for k, n in zip((1, 2), reached, strict=True):
        assert sum(sizes[k]) == n and all(b == 8 for b in sizes[k][:-1]) and 0 < sizes[k][-1] <= 8, sizes[k]
    assert all(seen_formats)  # survivors gathered from several batches stay channels-last


def test_stream_batch_size_and_empty_input():
    model = make_model(Pooling((4,)))
    model.set_thresholds([-math.inf, math.inf])  # everyone leaves at gate 0
    x = torch.randn(10, 3, 16, 16)
    outs = list(model.stream(x.split(3), batch_size=5))
    assert [o.exit.tolist() for _, o in outs] == [[0] * 5, [0] * 5]  # stage 0 waited for 5 inputs
    assert torch.equal(torch.cat([i for i, _ in outs]), torch.arange(10))
    assert list(model.stream([])) == []
    # empty batches are skipped, even first; a bad batch size is refused
    outs = list(model.stream([x[:0], x[:4], x[4:4], x[4:]]))
    assert torch.equal(torch.cat([i for i, _ in outs]), torch.arange(10))
    with pytest.raises(ValueError, match="batch_size must be a positive number"):
        list(model.stream([x], batch_size=0))


def test_stream_does_not_keep_the_callers_buffer():
    """A producer that refills one buffer for every batch: inputs still queued are copies."""
    model = make_model(Pooling((2,)), seed=7)
    x = torch.randn(30, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    s0, _ = scores_at_gates(model, x, "margin")
    model.set_thresholds([midway(s0, 0.5), math.inf])
    want = model(x)
    buf = torch.empty(4, 3, 16, 16).contiguous(memory_format=torch.channels_last)

    def refill():
        for i in range(0, 30, 4):
            part = x[i : i + 4]
            buf[: part.shape[0]].copy_(part)
            yield buf[: part.shape[0]]

    got = list(model.stream(refill(), batch_size=6))  # stage 0 waits for 6: part of each buffer stays queued
    index = torch.cat([i for i, _ in got])
    order = torch.empty_like(index)
    order[index] = torch.arange(30)
    streamed = (torch.cat([getattr(o, f) for _, o in got])[order] for f in GatedOutput._fields)
    assert_same_decisions(want, GatedOutput(*streamed))


def test_bench_times_both_and_reports_what_it_saw():
    model = make_model(Pooling((4,)))
    x = torch.randn(24, 3, 16, 16)
    s0, _ = scores_at_gates(model, x, "margin")
    model.set_thresholds([midway(s0, 0.6), math.inf])  # batches of 1, 8 and 24: the same decisions
    y = torch.randint(0, K, (24,))
    r = bench(model, x, y, batch_sizes=[1, 8], repeats=2, min_batches=2)
    assert [row.batch_size for row in r.rows] == [1, 8]
    assert [row.batches for row in r.rows] == [48, 6]  # 24 and 3 batches, timed twice
    assert [row.images for row in r.rows] == [48, 48]
    out = model(x)
    fractions = (torch.bincount(out.exit, minlength=3).double() / 24).tolist()
    costs = torch.tensor(model.exit_costs(), dtype=torch.float64)
    mean_cost = float(costs[out.exit].mean())
    for row in r.rows:
        assert row.exit_fractions == pytest.approx(fractions, abs=1e-12)
        assert row.flops_ratio == pytest.approx(mean_cost / 210.0)
        assert row.ideal_speedup == pytest.approx(210.0 / mean_cost)
        assert row.efficiency == pytest.approx(row.speedup / row.ideal_speedup)
        assert row.accuracy == float((out.pred == y).double().mean())
        assert row.backbone_accuracy == float((model.backbone_forward(x).argmax(1) == y).double().mean())
        assert 0 < row.gated_ms <= row.gated_p95_ms and 0 < row.backbone_ms <= row.backbone_p95_ms
    assert all(row.mode == "batch" for row in r.rows)
    rs = bench(model, x, y, batch_sizes=[8], repeats=2, min_batches=2, stream=True)
    assert [row.mode for row in rs.rows] == ["batch", "stream"]
    st = rs.rows[1]
    assert st.batches == 6 and st.images == 48  # two whole passes over 3 batches
    assert st.exit_fractions == pytest.approx(fractions, abs=1e-12)  # the same decisions as forward
    assert st.accuracy == r.rows[1].accuracy and st.backbone_accuracy == r.rows[1].backbone_accuracy
    assert st.ideal_speedup == pytest.approx(210.0 / mean_cost) and st.speedup > 0
    kept = list(model.thresholds)
    rn = bench(model, x, y, batch_sizes=[8], repeats=2, min_batches=2, no_exits=True)
    assert [row.mode for row in rn.rows] == ["batch", "no-exit"]
    ne = rn.rows[1]
    assert model.thresholds == kept  # put back after the no-exit timing
    assert ne.exit_fractions == [0.0, 0.0, 1.0]  # the open gate ran and let nobody out
    assert ne.flops_ratio == pytest.approx((210.0 + model.gate_costs[0]) / 210.0)  # the backbone plus the open gate
    assert ne.accuracy == ne.backbone_accuracy == rn.rows[0].backbone_accuracy
    assert ne.batches == 6 and ne.speedup > 0
    calls = []

    def failing(*args, **kwargs):
        calls.append(list(model.thresholds))
        if len(calls) == 2:
            raise RuntimeError("interrupted")
        return real(*args, **kwargs)

    real = bench_module._time_batches
    bench_module._time_batches = failing
    try:
        with pytest.raises(RuntimeError, match="interrupted"):
            bench(model, x, y, batch_sizes=[8], repeats=1, min_batches=2, no_exits=True)
    finally:
        bench_module._time_batches = real
    assert calls[1][0] == float(torch.finfo(torch.float32).max) and calls[1][1] == math.inf  # open gate never passes
    assert model.thresholds == kept  # put back although the timing failed
    listed = r.to_list()
    keys = {"batch_size", "backbone_ms", "gated_ms", "speedup", "ideal_speedup", "flops_ratio", "accuracy"}
    assert keys | {"backbone_accuracy", "device", "machine", "torch"} <= listed[0].keys()
    assert f"malloc {_malloc.malloc_state()}" in listed[0]["machine"]
    assert listed[0]["machine"].endswith(f", gate kernel {_native.status()}")


def test_malloc_tuning(monkeypatch):
    monkeypatch.setenv("DGATE_MALLOC", "system")
    monkeypatch.setattr(_malloc, "_tuned", False)
    assert _malloc.tune_malloc_from_env() is False
    assert _malloc.malloc_state() == "system"
    assert _malloc.tune_malloc(mmap_threshold=1 << 40) is False  # not a C int
    assert _malloc.malloc_state() == "system"
    if not sys.platform.startswith("linux") or glibc_version() is None:  # musl, macOS: a no-op that says so
        assert _malloc.tune_malloc() is False
        assert _malloc.malloc_state() == "system"
    else:  # glibc: mallopt accepts both thresholds
        assert _malloc.tune_malloc() is True
        assert _malloc.malloc_state() == "tuned"


def glibc_version() -> str | None:
    """The running glibc's version (``glibc 2.36``), or None under another C library (musl has no
    ``_CS_GNU_LIBC_VERSION``); asked through ``confstr``, not as the library asks."""
    try:
        version = os.confstr("CS_GNU_LIBC_VERSION")
    except (ValueError, OSError, AttributeError):
        return None
    return version if version and version.startswith("glibc") else None


def test_switching_points_keeps_gates_closed_that_the_overhead_pricing_closed():
    from dgate_cli.thresholds.outcomes import OperatingPoint

    one = OperatingPoint((1.0, math.inf), 0.90, 156.0, 156.0 / 210, (0.5, 0.0, 0.5), target=0.89)
    two = OperatingPoint((1.0, 2.0), 0.90, 155.5, 155.5 / 210, (0.5, 0.1, 0.4), target=0.89)
    model = make_model(Pooling((4,)))
    model.frontier = [one, two]
    model.manifest = {"calibration": {"backbone_accuracy": 0.90, "target": {"max_drop": 0.01}}}
    assert model.use_operating_point(max_drop=0.01) == two  # MACs only: the second gate saves 0.5 MACs
    # charged 0.1 x 210 MACs per open gate reached: 156 + 21 = 177 against 155.5 + 21 * 1.5 = 187
    model.manifest["calibration"]["target"]["gate_overhead"] = 0.1
    assert model.use_operating_point(max_drop=0.01) == one
    assert model.thresholds == [1.0, math.inf]


def test_moving_the_model_drops_the_cached_gate_plans():
    model = make_model(Pooling((4,)))
    x = torch.randn(4, 3, 16, 16)
    model.set_thresholds([math.inf, -math.inf])
    model(x)
    assert len(model._plans) == 1
    model.to(torch.float64).to(torch.float32)
    assert model._plans == {}
    assert torch.equal(model(x).exit, torch.ones(4, dtype=torch.long))


def needs_kernel() -> None:
    if _native.kernel() is None:
        pytest.skip(f"the gate kernel is {_native.status()}")


def python_headers() -> str | None:
    """The directory of this Python's ``Python.h`` (the kernel builds as an extension module), or
    None (it builds as a plain library, called through ctypes)."""
    include = sysconfig.get_paths().get("include") or ""
    return include if include and Path(include, "Python.h").is_file() else None


def built_status() -> str:
    """What :func:`_native.status` says where a C compiler builds the kernel on this machine."""
    if python_headers():
        return "on"
    return f"on (through ctypes: no Python.h in {sysconfig.get_paths().get('include') or ''!r})"


def no_pooling(*args, **kwargs):
    raise AssertionError("the single-sample product pooled in PyTorch")


@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("side", [16, 24, 10])
def test_one_sample_goes_through_the_kernel_when_the_windows_are_even(
    side: int, channels_last: bool, monkeypatch: pytest.MonkeyPatch
):
    # even windows: pooling, product and bias in the C kernel (no PyTorch pooling); uneven ones
    # (10 / 4) in PyTorch. Both equal pool-then-linear.
    needs_kernel()
    model = make_model(Pooling((4,)), channels_last, seed=5)
    x = torch.randn(1, 3, side, side)
    with torch.inference_mode():
        h = model.stages[0](x.contiguous(memory_format=torch.channels_last) if channels_last else x)
        want = reference_outputs(model, 0, h)
        if side % 4 == 0:
            monkeypatch.setattr(runtime, "_adaptive_avg_pool2d", no_pooling)
        got = model.gate_outputs(0, h)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        assert torch.equal(got, model.gate_outputs(0, h))  # again, from the cached arguments
    assert (model._native(0, h) is not None) == (side % 4 == 0)


@pytest.mark.parametrize("rule", [0, 1])
def test_the_kernel_scores_its_outputs_as_gate_scores_does(rule: int):
    # one sample at a time (score; outputs kept for dgate_outputs) and the same samples as a batch
    # (outputs and who leaves): the same bits, scored as gate_scores scores, and equal to pooling
    # then the linear layer (weights in (s, s, C) order) up to float rounding
    needs_kernel()
    kernel = _native.kernel()
    torch.manual_seed(7)
    c, side, s = 6, 8, 2
    for k in (1, 2, 5):
        w = torch.randn(k, c * s * s)
        b = torch.randn(k)
        if k == 5:
            w[3], b[3] = w[1], b[1]  # a tie for the largest or elsewhere
        hs = torch.randn(40, c, side, side) * 10.0 ** (torch.arange(40) % 7 - 3).view(-1, 1, 1, 1)
        hs[5, 2, 3, 3] = math.nan  # every output NaN
        hs[6, 1, 1, 1] = math.inf
        b_nan = b.clone()
        b_nan[k - 1] = math.nan  # one output NaN
        for bias in (b, b_nan):
            gate = _native.bind(kernel, w, bias, (1, c, side, side), s, False, rule)
            singles, scores = [], []
            for h in hs:
                scores.append(gate.one(h.data_ptr(), gate.address))
                singles.append(runtime._kernel_outputs(gate))
            z = torch.from_numpy(np.concatenate(singles))
            want, _ = gate_scores(z, ["max", "margin"][rule])
            for got, wanted in zip(scores, want.tolist(), strict=True):
                if math.isnan(wanted):
                    assert math.isnan(got), (k, got)
                else:
                    assert struct.pack("f", got) == struct.pack("f", wanted), (k, got, wanted)
            features = F.adaptive_avg_pool2d(hs, s).permute(0, 2, 3, 1).flatten(1)  # the kernel's (s, s, C) order
            torch.testing.assert_close(z, features @ w.t() + bias, atol=1e-4, rtol=1e-5, equal_nan=True)
            scored = want[~want.isnan()]  # NaN never leaves
            t = float(scored.median()) if scored.numel() else 0.0
            batch, leave, count = runtime._kernel_gates(gate, hs, t)
            assert np.array_equal(batch, z.numpy(), equal_nan=True)
            assert leave.tolist() == (want >= t).tolist() and count == int((want >= t).sum())


def test_without_the_kernel_single_samples_are_decided_in_pytorch(monkeypatch: pytest.MonkeyPatch, tmp_path):
    model = make_model(Pooling((4,)), seed=8)
    x = torch.randn(32, 3, 16, 16)
    s0, s1 = scores_at_gates(model, x, "margin")
    model.set_thresholds([midway(s0, 0.5), midway(s1, 0.5)])
    monkeypatch.setenv("DGATE_CACHE_DIR", str(tmp_path))
    outs = {}
    for setting, env in [("on", {}), ("off", {"DGATE_NATIVE": "0"}), ("no cc", {"CC": "no-such-cc"})]:
        monkeypatch.delenv("DGATE_NATIVE", raising=False)
        monkeypatch.delenv("CC", raising=False)
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        _native.reset()
        model = model.to(torch.float32)  # drops the cached kernel arguments
        outs[setting] = [model(x[i : i + 1]) for i in range(32)], _native.status()
        outs[setting] += (model(x),)  # the batch path, with the kernel or without
    _native.reset()
    assert outs["off"][1] == "off (DGATE_NATIVE=0)"
    assert outs["no cc"][1] == "off (no C compiler: 'no-such-cc' not found; install one or set CC)"
    big = outs["off"][2]
    for setting, (singles, _, batch) in outs.items():
        assert torch.equal(torch.cat([o.exit for o in singles]), big.exit), setting
        assert torch.equal(batch.exit, big.exit), setting
        torch.testing.assert_close(torch.cat([o.logits for o in singles]), big.logits, atol=1e-4, rtol=1e-4)
    if outs["on"][1] == built_status():  # built into the cache directory, under its final name only
        files = list(tmp_path.iterdir())
        assert len(files) == 1 and files[0].name.startswith("gates-") and files[0].suffix == ".so"


@pytest.mark.parametrize("channels_last", [True, False])
def test_a_batch_goes_through_the_kernel_up_to_its_size_limit(channels_last: bool, monkeypatch: pytest.MonkeyPatch):
    # a batch's gates: one kernel call each (no PyTorch pooling), each row the bits of that sample
    # alone; beyond _KERNEL_BATCH values a batch is pooled in PyTorch (on every thread), one sample never
    needs_kernel()
    model = make_model(Pooling((4,)), channels_last, seed=9)
    x = torch.randn(6, 3, 16, 16)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        h = model.stages[0](x)
        want = reference_outputs(model, 0, h)
        monkeypatch.setattr(runtime, "_adaptive_avg_pool2d", no_pooling)
        got = model.gate_outputs(0, h)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
        for i in range(6):  # each sample alone, through the single-sample entry: the same bits
            native = model._native(0, h[i : i + 1])
            native.one(h[i : i + 1].data_ptr(), native.address)
            assert torch.equal(torch.from_numpy(runtime._kernel_outputs(native))[0], got[i])
        other = h.contiguous() if channels_last else h.contiguous(memory_format=torch.channels_last)
        assert torch.equal(model.gate_outputs(0, other), got)  # NCHW and NHWC: the same bits
        model.set_thresholds([midway(gate_scores(got, "margin")[0], 0.5), math.inf])
        out = model(x)  # the host batch path, no PyTorch pooling either
        assert out.exit.tolist() == [0 if v else 2 for v in (gate_scores(got, "margin")[0] >= model._t32[0]).tolist()]
        monkeypatch.undo()
        monkeypatch.setattr(runtime, "_KERNEL_BATCH", h.numel() - 1)
        model = model.to(torch.float32)  # drops the bindings
        assert model._native(0, h) is None
        assert model._native(0, h[:1]) is not None
        torch.testing.assert_close(model.gate_outputs(0, h), want, atol=1e-5, rtol=1e-5)


def test_without_python_headers_the_kernel_is_called_through_ctypes(monkeypatch: pytest.MonkeyPatch, tmp_path):
    # the same library, loaded with ctypes instead of as an extension module: the same bits
    needs_kernel()
    model = make_model(Pooling((4,)), seed=10)
    x = torch.randn(5, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        h, h1 = model.stages[0](x), model.stages[0](x[:1])  # (batch 1 convolves with other kernels)
        ext = model.gate_outputs(0, h), model.gate_outputs(0, h1)
        monkeypatch.setenv("DGATE_CACHE_DIR", str(tmp_path))
        monkeypatch.setattr(_native.sysconfig, "get_paths", lambda: {"include": str(tmp_path / "nowhere")})
        _native.reset()
        try:
            model = model.to(torch.float32)
            assert _native.status() == f"on (through ctypes: no Python.h in {str(tmp_path / 'nowhere')!r})"
            assert torch.equal(model.gate_outputs(0, h), ext[0])
            assert torch.equal(model.gate_outputs(0, h1), ext[1])
            model.set_thresholds([-math.inf, math.inf])  # everyone leaves at gate 0: the single-sample call
            assert torch.equal(model(x[:1]).logits, ext[1])
        finally:
            _native.reset()


def test_an_extension_module_that_does_not_load_falls_back_to_ctypes(monkeypatch: pytest.MonkeyPatch, tmp_path):
    needs_kernel()
    if python_headers() is None:
        pytest.skip(f"no Python.h in {sysconfig.get_paths().get('include')!r}: no extension module is built")
    monkeypatch.setenv("DGATE_CACHE_DIR", str(tmp_path))

    def broken(lib):
        raise ImportError("undefined symbol: PyFloat_FromDouble")

    monkeypatch.setattr(_native, "_load_extension", broken)
    _native.reset()
    try:
        assert _native.status() == (
            "on (through ctypes: the extension module failed: undefined symbol: PyFloat_FromDouble)"
        )
        assert len(list(tmp_path.iterdir())) == 2  # the extension (built, not loaded) and the plain library
    finally:
        _native.reset()


def test_single_inputs_of_another_layout_get_their_own_bindings():
    # the kernel bindings are kept per stage output layout: an NCHW and a channels-last input (a
    # model that keeps what it is given) each get theirs, and .to() drops them
    needs_kernel()
    model = make_model(Pooling((4,)), channels_last=False, seed=11)
    xs = torch.randn(16, 1, 3, 16, 16)
    model.set_thresholds(every_exit(model, xs[:, 0], stay=(0.3, 0.5)))  # some leave at each gate
    fresh = copy.deepcopy(model)  # no bindings: every gate bound afresh
    with torch.inference_mode():
        for x in xs:
            for inp in (x, x.contiguous(memory_format=torch.channels_last)):
                out, want = model(inp), fresh._forward_one(inp)
                fresh._natives.clear()
                assert torch.equal(out.logits, want.logits) and out.exit == want.exit
        exits = torch.cat([model(x).exit for x in xs])
        assert (exits == 0).any() and (exits == 1).any() and (exits == 2).any()
    layouts = sorted((key[0], gate.keep[0].nhwc) for key, gate in model._natives.items() if key[1][0] == 1)
    assert layouts == [(0, 0), (0, 1), (1, 0), (1, 1)]  # NCHW input: NCHW stage outputs; channels-last: NHWC
    model = model.to(torch.float32)
    assert model._natives == {}


def test_a_binding_is_checked_against_what_each_stage_returns(monkeypatch: pytest.MonkeyPatch):
    # a stage changed in place (not through the model's .to()) or autocast changes the stage
    # outputs of the same input: the bindings made for the old ones must not be used for them (the
    # kernel would read NHWC data as NCHW, or bfloat16 memory as float32, past its end)
    needs_kernel()
    model = make_model(Pooling((4,)), channels_last=False, seed=12)
    x = torch.randn(12, 3, 16, 16)
    s0, s1 = scores_at_gates(model, x, "margin")
    model.set_thresholds([midway(s0, 0.3), midway(s1, 0.5)])
    with torch.inference_mode():
        for i in range(12):
            model(x[i : i + 1])  # binds the NCHW layout
        model.stages.to(memory_format=torch.channels_last)  # the ModuleList's own .to(): the bindings stay
        assert model._natives
        for i in range(12):
            xi = x[i : i + 1]
            assert model.stages[0](xi).is_contiguous(memory_format=torch.channels_last)
            want = copy.deepcopy(model)._forward_one(xi)
            got = model(xi)
            assert torch.equal(got.logits, want.logits) and got.exit == want.exit
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model.stages[0](x[:1]).dtype == torch.bfloat16
            for i in range(12):
                xi = x[i : i + 1]
                want = copy.deepcopy(model)._forward_one(xi)
                got = model(xi)  # bfloat16 stage outputs: decided in PyTorch, not by the float32 kernel
                assert torch.equal(got.logits, want.logits) and got.exit == want.exit


def test_a_failing_compiler_leaves_the_kernel_off_and_no_file(monkeypatch: pytest.MonkeyPatch, tmp_path):
    monkeypatch.setenv("DGATE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("CC", "false")  # exists, fails
    monkeypatch.delenv("DGATE_NATIVE", raising=False)
    _native.reset()
    try:
        assert _native.kernel() is None
        assert _native.status() == "off (false failed: no message)"
    finally:
        _native.reset()
    assert list((tmp_path / "cache").iterdir()) == []  # the temporary file is gone


def test_single_samples_from_several_threads_get_their_own_outputs():
    needs_kernel()
    model = make_model(Pooling((4,)), seed=9)
    x = torch.randn(64, 3, 16, 16)
    s0, s1 = scores_at_gates(model, x, "margin")
    model.set_thresholds([midway(s0, 0.5), midway(s1, 0.5)])
    alone = [model(x[i : i + 1]) for i in range(64)]
    with ThreadPoolExecutor(4) as pool_:
        for _ in range(3):
            together = list(pool_.map(lambda i: model(x[i : i + 1]), range(64)))
            for a, t in zip(alone, together, strict=True):
                assert torch.equal(a.logits, t.logits) and torch.equal(a.exit, t.exit)


def test_half_outputs_and_other_poolings_are_scored_in_pytorch():
    model = make_model(Pooling((4,)), seed=6)
    h = torch.randn(1, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        half = model.gate_outputs(0, h.half())
        torch.testing.assert_close(half, reference_outputs(model, 0, h.half()), atol=1e-4, rtol=1e-4)
        assert model._native(0, h.half()) is None
        mixed = make_model(Pooling((2,), ("avg", "max")), seed=6)
        torch.testing.assert_close(mixed.gate_outputs(0, h), reference_outputs(mixed, 0, h), atol=1e-5, rtol=1e-5)
    assert list(mixed._natives.values()) == [None]


def test_new_gate_weights_reach_the_single_sample_kernel():
    model = make_model(Pooling((4,)))
    x = torch.randn(1, 3, 16, 16)
    model.set_thresholds([-math.inf, math.inf])  # everyone leaves at gate 0 with its outputs
    before = model(x).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["gate0_weight"] *= 2
    state["gate0_bias"] *= 2
    model.load_state_dict(state)  # copies into the same buffers
    torch.testing.assert_close(model(x).logits, 2 * before, atol=1e-5, rtol=1e-5)
    state = {k: v * 3 if k.startswith("gate0") else v for k, v in model.state_dict().items()}
    model.load_state_dict(state, assign=True)  # new buffers: the cached pointers must go
    torch.testing.assert_close(model(x).logits, 6 * before, atol=1e-5, rtol=1e-5)
    model.to(torch.float64).to(torch.float32)  # moving drops the cached arguments too
    assert model._natives == {}
    torch.testing.assert_close(model(x).logits, 6 * before, atol=1e-5, rtol=1e-5)


def test_a_model_that_used_the_kernel_can_be_copied_and_pickled():
    model = make_model(Pooling((4,)))
    x = torch.randn(1, 3, 16, 16)
    model.set_thresholds([-math.inf, math.inf])
    before = model(x)  # caches the kernel's arguments (ctypes functions, raw pointers)
    twin = copy.deepcopy(model)
    again = pickle.loads(pickle.dumps(model))
    for m in (twin, again):
        assert m._natives == {}
        out = m(x)
        assert torch.equal(out.logits, before.logits) and torch.equal(out.exit, before.exit)
    twin.gate0_bias.add_(1.0)  # its own buffers, not the original's
    torch.testing.assert_close(twin(x).logits, before.logits + 1.0)
    assert torch.equal(model(x).logits, before.logits)
    state = model.__getstate__()
    del state["_plans"], state["_natives"]  # pickled by a version without these caches
    old = GatedModel.__new__(GatedModel)
    old.__setstate__(state)
    assert torch.equal(old(x).logits, before.logits)


def test_softmax_gates_use_the_kernel_for_their_outputs_only(monkeypatch: pytest.MonkeyPatch):
    # the kernel scores max and margin; for softmax it still pools and multiplies (one sample or a
    # batch), and the decision is softmax's (stream mode included)
    needs_kernel()
    model = make_model(Pooling((4,)), score="softmax", seed=13)
    x = torch.randn(8, 3, 16, 16).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        h = model.stages[0](x)
        want = reference_outputs(model, 0, h)
        s0, _ = gate_scores(want, "softmax")
        model.set_thresholds([midway(s0, 0.5), math.inf])
        monkeypatch.setattr(runtime, "_adaptive_avg_pool2d", no_pooling)
        torch.testing.assert_close(model.gate_outputs(0, h), want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model.gate_outputs(0, h[:1]), want[:1], atol=1e-5, rtol=1e-5)
        streamed = torch.empty(8, dtype=torch.long)
        for index, out in model.stream([x[:4], x[4:]], batch_size=4):
            streamed[index] = out.exit
    assert streamed.tolist() == [0 if v else 2 for v in (s0 >= model._t32[0]).tolist()]


def test_gate_outputs_of_one_sample_keep_gradients():
    model = make_model(Pooling((4,)))
    h = torch.randn(1, 8, 16, 16, requires_grad=True)
    z = model.gate_outputs(0, h)
    assert z.grad_fn is not None
    z.sum().backward()
    assert h.grad is not None and h.grad.shape == h.shape


def test_a_compiler_given_with_arguments_builds_the_kernel(monkeypatch: pytest.MonkeyPatch, tmp_path):
    needs_kernel()
    monkeypatch.setenv("DGATE_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", "cc -DDGATE_TEST=1")
    _native.reset()
    try:
        assert _native.status() == built_status()  # an extension module, or through ctypes without Python.h
    finally:
        _native.reset()
    assert [p.name.startswith("gates-") for p in tmp_path.iterdir()] == [True]


def test_the_kernel_builds_under_a_group_umask_and_a_world_writable_one_is_refused(
    monkeypatch: pytest.MonkeyPatch, tmp_path
):
    needs_kernel()
    monkeypatch.setenv("DGATE_CACHE_DIR", str(tmp_path))
    old = os.umask(0o002)  # user-private-group systems: new files are group-writable
    try:
        _native.reset()
        assert _native.status() == built_status()
    finally:
        os.umask(old)
        _native.reset()
    (lib,) = tmp_path.iterdir()
    if python_headers():  # the extension module first; refused, the plain library is built beside it
        lib.chmod(0o666)  # anyone could have replaced it
        refused = f"{lib} is not owned by this user or is world-writable; remove it"
        try:  # not loaded: the plain library is built beside it and called through ctypes
            assert _native.status() == f"on (through ctypes: the extension module failed: {refused})"
        finally:
            _native.reset()
        (plain,) = set(tmp_path.iterdir()) - {lib}
    else:  # no Python.h: the plain library was the only one built
        plain = lib
    plain.chmod(0o666)
    try:
        assert _native.status() == f"off ({plain} is not owned by this user or is world-writable; remove it)"
    finally:
        _native.reset()
