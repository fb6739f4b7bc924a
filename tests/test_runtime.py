"""The gated runtime on a small synthetic network: the gates, the one exit loop (order, memory format,
compaction), throughput mode, the plan's steps, decision backends, malloc tuning and ``bench``."""

from __future__ import annotations

import copy
import math
import os
import pickle
import sys

import pytest
import torch
from conftest import assert_same_decisions, cascade_thresholds, near_tie, robust_cut
from torch import nn

from dgate_cli.evaluation import bench as bench_module
from dgate_cli.evaluation.bench import bench
from dgate_cli.gates.pooling import Pooling, pool
from dgate_cli.gates.scores import gate_scores
from dgate_cli.runtime.backends import malloc as _malloc
from dgate_cli.runtime.decisions import Decision, decide
from dgate_cli.runtime.model import GatedModel, GatedOutput
from dgate_cli.runtime.plan import Step
from dgate_cli.thresholds.outcomes import f32

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
    gate = model.gates[g]
    return pool(h.contiguous(), gate.pooling, "nchw").float() @ gate.weight.t() + gate.bias


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
            assert got.shape == (6, K) and got.dtype == torch.float32
            torch.testing.assert_close(got, reference_outputs(model, g, hh), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_stages_keep_float32_gates(dtype: torch.dtype):
    model = make_model(Pooling((4,)))
    weight = model.gates[0].weight.clone()
    x = torch.randn(16, 3, 16, 16)
    s0, _ = scores_at_gates(model, x, "margin")
    model.set_thresholds([midway(s0, 0.5), math.inf])
    model.stages.to(dtype)  # the stages only: the gates stay float32
    assert model.stages[0][0].weight.dtype == dtype
    assert model.gates[0].weight.dtype == torch.float32 and torch.equal(model.gates[0].weight, weight)
    out = model(x.to(dtype))
    assert out.logits.dtype == torch.float32 and out.exit.dtype == torch.long
    with torch.inference_mode():
        h = model.stages[0](x.to(dtype).contiguous(memory_format=torch.channels_last))
        z = model.gate_outputs(0, h)
    torch.testing.assert_close(z, reference_outputs(model, 0, h), atol=1e-4, rtol=1e-4)
    s, _ = gate_scores(z, "margin")
    assert torch.equal(out.exit == 0, s >= model.thresholds[0])  # the exits are these scores' decisions


def test_thresholds_are_float32_a_copy_and_checked():
    model = make_model(Pooling((2,)))
    model.set_thresholds([0.1, math.inf])
    assert model.thresholds == [f32(0.1), math.inf] and f32(0.1) != 0.1  # rounded as the runtime compares
    model.thresholds[0] = 5.0  # a copy: no effect on the model
    assert model.thresholds[0] == f32(0.1)
    model.thresholds = ["inf", None]
    assert model.thresholds == [math.inf, math.inf]
    model.set_thresholds([1e39, -math.inf])  # beyond float32: open, and only +inf passes it
    assert model.thresholds == [float(torch.finfo(torch.float32).max), -math.inf]


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
    want_exit = torch.where(s0 >= f32(t[0]), 0, torch.where(s1 >= f32(t[1]), 1, 2))
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
    report = r.to_dict()
    keys = {"batch_size", "backbone_ms", "gated_ms", "speedup", "ideal_speedup", "flops_ratio", "accuracy"}
    assert keys | {"backbone_accuracy"} <= report["rows"][0].keys()
    assert {"device", "machine", "torch", "backends", "thresholds"} <= report.keys()
    assert f"malloc {_malloc.malloc_state()}" in report["machine"]


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


# -- the plan, backends, module conventions ----------------------------------------------------------------


class Member(nn.Module):
    """A tiny network that maps images to (N, K) scores, to build a two-network plan."""

    def __init__(self, seed: int):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, K))

    def forward(self, x):
        return self.body(x)


def test_a_step_can_start_from_the_original_input():
    """A sibling of today's steps (the second network of a cascade): it reads the input rows still
    in the batch, not the previous step's output."""
    first, second = Member(1), Member(2)
    seen = []
    second.register_forward_pre_hook(lambda mod, args: seen.append(args[0].clone()))
    model = GatedModel(
        [first, second],
        [torch.eye(K)],
        [torch.zeros(K)],
        ["nc"],
        Pooling((1,)),
        [math.inf],
        score="margin",
        plan=[Step("stage", "first", gate=0), Step("stage", "second", source="input")],
        reach_costs=[1.0, 10.0],
        gate_costs=[0.0],
    )
    x = torch.randn(12, 3, 8, 8)
    with torch.inference_mode():
        s, _ = gate_scores(first(x), "margin")
    t = robust_cut(s, 0.5)
    model.set_thresholds([t])
    out = model(x)
    stay = s < t
    assert 0 < int(stay.sum()) < 12
    assert torch.equal(seen[-1], x[stay])  # the second network saw the original images of the rest
    assert torch.equal(out.exit, torch.where(stay, 1, 0))
    with torch.inference_mode():
        torch.testing.assert_close(out.logits[stay], second(x[stay]))
        torch.testing.assert_close(out.logits[~stay], first(x[~stay]))
    with pytest.raises(ValueError, match="use forward"):
        list(model.stream([x]))


class Spy:
    """A backend that answers for gate 0 only, with the reference's decision, counting its calls."""

    name = "spy"

    def __init__(self):
        self.calls = 0

    def decide(self, g, gate, h, threshold, rule):
        if g != 0:
            return None
        self.calls += 1
        return decide(gate, h, threshold, rule)


def test_backends_answer_where_they_apply_and_the_reference_elsewhere():
    model = make_model(Pooling((2,)))
    x = torch.randn(40, 3, 16, 16)
    model.set_thresholds(every_exit(model, x))
    want = model(x)
    spy = Spy()
    model.backends = [spy]
    got = model(x)
    assert spy.calls == 1
    assert torch.equal(got.exit, want.exit) and torch.equal(got.pred, want.pred)


def test_a_decision_is_the_rule_applied_to_the_gate_outputs():
    model = make_model(Pooling((2,)), score="margin")
    h = torch.randn(9, 8, 16, 16)
    d = decide(model.gates[0], h, 0.5, "margin")
    assert isinstance(d, Decision)
    s, p = gate_scores(model.gate_outputs(0, h), "margin")
    assert torch.equal(d.leave, s >= 0.5) and torch.equal(d.pred, p)


def test_state_dict_copies_and_devices_round_trip():
    model = make_model(Pooling((4,)))
    x = torch.randn(20, 3, 16, 16)
    model.set_thresholds(every_exit(model, x))
    want = model(x)
    keys = set(model.state_dict())
    assert {"gates.0.weight", "gates.0.bias", "gates.1.weight", "gates.1.bias"} <= keys
    other = make_model(Pooling((4,)), seed=9)
    other.load_state_dict(model.state_dict())
    other.set_thresholds(model.thresholds)
    for twin in (other, copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        out = twin(x)
        assert torch.equal(out.exit, want.exit) and torch.equal(out.logits, want.logits)
    model.to(torch.float64)
    out = model(x.double())
    assert out.logits.dtype == torch.float32
    assert_same_decisions(want, out)


def test_gate_outputs_keep_gradients_outside_inference_mode():
    model = make_model(Pooling((2,)))
    h = torch.randn(3, 8, 16, 16, requires_grad=True)
    model.gate_outputs(0, h).sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
