"""CUDA graph execution (``GatedModel.use_cuda_graphs``): the buckets, and the compaction between
replays, checked on the CPU by replaying the segments eagerly into the same static buffers; the
real capture where a GPU is present."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_same_decisions
from test_runtime import device_path, every_exit, make_model, midway, reference_outputs, scores_at_gates

from dgate_cli.gates.pooling import Pooling
from dgate_cli.runtime.backends.cudagraphs import GraphRunner, bucket_for, buckets
from dgate_cli.runtime.model import GatedOutput


def test_buckets_are_steps_of_an_eighth_of_the_batch_and_powers_of_two_below():
    assert buckets(1) == [1]
    assert buckets(13) == [1, 2, 4, 6, 8, 10, 12, 13]
    assert buckets(256) == [1, 2, 4, 8, 16, *range(32, 257, 32)]
    assert [bucket_for(m, 13) for m in (1, 2, 3, 5, 8, 9, 13)] == [1, 2, 4, 6, 8, 10, 13]
    assert [bucket_for(m, 256) for m in (1, 3, 17, 32, 33, 255)] == [1, 4, 32, 32, 64, 256]
    for n in (5, 13, 100, 256):  # always the smallest bucket that holds m rows
        assert all(bucket_for(m, n) == min(b for b in buckets(n) if b >= m) for m in range(1, n + 1))


def run(runner: GraphRunner, x: torch.Tensor) -> GatedOutput:
    with torch.inference_mode():
        return runner(x.contiguous(memory_format=torch.channels_last))


def assert_same(a: GatedOutput, b: GatedOutput) -> None:
    """The same decisions (thresholds a margin away from the scores: see conftest) and outputs."""
    assert_same_decisions(a, b)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("score", ["max", "margin", "softmax", "entropy"])
def test_replayed_segments_decide_like_the_device_path(score: str):
    model = make_model(Pooling((4,)), score=score)
    x = torch.randn(13, 3, 16, 16)
    s0, s1 = scores_at_gates(model, x, score)
    runner = GraphRunner(model, capture=False)
    cases = [
        every_exit(model, x),  # some leave at each gate: 13 -> about 8 -> about 4 rows
        [midway(s0, 0.2), math.inf],  # most leave at gate 0, the rest run the closed gate 1
        [float(s0.min()) - 1, 0.0],  # everyone leaves at gate 0
        [float(s0.max()) + 1, float(s1.max()) + 1],  # nobody leaves
    ]
    for thresholds in cases:
        model.set_thresholds(thresholds)
        want = device_path(model, x)
        for _ in range(2):  # the second call reuses every buffer of the first
            assert_same(run(runner, x), want)
    assert sorted({e for c in cases[:1] for e in device_path(model.set_thresholds(c), x).exit.tolist()}) == [0, 1, 2]


def test_another_batch_size_shares_the_buckets_and_order_is_kept():
    model = make_model(Pooling((2,)))
    x13, x5, x8 = torch.randn(13, 3, 16, 16), torch.randn(5, 3, 16, 16), torch.randn(8, 3, 16, 16)
    # cut from the scores of every batch below: each a margin away from the thresholds (buckets pad the
    # rows, and the padded convolutions may round otherwise than the device path's)
    s0, s1 = scores_at_gates(model, torch.cat([x13, x5, x8, torch.randn(38, 3, 16, 16)]), "margin")
    model.set_thresholds([midway(s0, 0.5), midway(s1, 0.5)])
    runner = GraphRunner(model, capture=False)
    assert_same(run(runner, x13), device_path(model, x13))
    captured = set(runner.segments)
    assert {b for _, b in captured} == set(buckets(13))
    assert_same(run(runner, x5), device_path(model, x5))
    assert set(runner.segments) - captured == {(g, b) for g in range(3) for b in (3, 5)}  # buckets(5) = 1..5
    assert_same(run(runner, x13), device_path(model, x13))
    # x8: a bucket of 13 already, but buckets(8) has 3, 5 and 7 besides
    assert_same(run(runner, x8), device_path(model, x8))
    assert {b for _, b in runner.segments} == set(buckets(13)) | set(buckets(5)) | set(buckets(8))


def test_thresholds_reach_the_captures_and_opening_a_gate_captures_again():
    model = make_model(Pooling((4,)))
    x = torch.randn(8, 3, 16, 16)
    s0, s1 = scores_at_gates(model, x, "margin")
    model.set_thresholds([midway(s0, 0.5), midway(s1, 0.5)])
    runner = model.use_cuda_graphs()._graphs
    runner.capture = False  # replay eagerly: no GPU here
    run(runner, x)
    before = dict(runner.segments)
    model.set_thresholds([midway(s0, 0.25), midway(s1, 0.75)])  # new values: the same captures
    assert_same(run(runner, x), device_path(model, x))
    assert runner.segments == before and runner.thresholds.tolist() == pytest.approx(model._t32)
    model.set_thresholds([midway(s0, 0.25), 1e39])  # beyond float32 but finite: open, as on the eager paths
    assert_same(run(runner, x), device_path(model, x))
    assert runner.segments == before and runner.thresholds.tolist()[1] == math.inf
    model.set_thresholds([midway(s0, 0.25), math.inf])  # gate 1 closes: captured again
    assert runner.closed == (False, False)  # (until the next call)
    assert_same(run(runner, x), device_path(model, x))
    assert runner.closed == (False, True)
    assert runner.segments and all(runner.segments[k] is not before.get(k) for k in runner.segments)


def test_cpu_inputs_ignore_the_graphs_and_the_backbone_follows_the_setting():
    model = make_model(Pooling((4,))).use_cuda_graphs()
    x = torch.randn(4, 3, 16, 16)
    s0, _ = scores_at_gates(model, x, "margin")
    model.set_thresholds([midway(s0, 0.5), math.inf])
    assert_same(model(x), device_path(model, x))
    assert model._graphs.segments == {}  # nothing captured for a CPU batch
    backbone = model.backbone()
    assert backbone._graph is not None
    backbone._graph.graphs["captured"] = None  # (stands for a capture reading the old parameters)
    backbone.float()  # new parameter storage drops the backbone's graphs too
    assert backbone._graph.graphs == {}
    assert model.use_cuda_graphs(False).backbone()._graph is None
    torch.testing.assert_close(model.backbone()(x), model.backbone_forward(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (captures real CUDA graphs)")
@pytest.mark.parametrize("n", [1, 13, 64])
def test_cuda_graphs_on_a_gpu_decide_like_the_eager_device_path(n: int):
    model = make_model(Pooling((4,))).cuda()
    x = torch.randn(n, 3, 16, 16, device="cuda")
    # thresholds a margin away from the scores of x too (cuDNN picks its kernels per batch size)
    s0, s1 = scores_at_gates(model, torch.cat([x, torch.randn(256, 3, 16, 16, device="cuda")]), "margin")
    model.set_thresholds([midway(s0.cpu(), 0.5), midway(s1.cpu(), 0.5)])
    want = device_path(model, x)
    model.use_cuda_graphs()
    for _ in range(3):
        got = model(x)
        assert_same(got, want)
    torch.testing.assert_close(model.backbone()(x), model.backbone_forward(x), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the GPU pools even windows otherwise)")
@pytest.mark.parametrize("side", [16, 15])  # even windows (avg_pool2d), uneven (adaptive pooling)
def test_gpu_gate_outputs_equal_pooling_then_linear(side: int):
    model = make_model(Pooling((4,))).cuda()
    h = torch.randn(6, 8, side, side, device="cuda").contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        torch.testing.assert_close(model.gate_outputs(0, h), reference_outputs(model, 0, h), rtol=1e-5, atol=1e-5)
