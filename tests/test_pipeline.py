"""End to end on a tiny trained demo CNN: extract -> fit -> calibrate -> export -> load -> evaluate.

The central invariant: the exported model, run on real images, exits and predicts exactly as the
calibration predicted from the feature cache.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import (
    DEMO_GATES,
    assert_same_decisions,
    cascade_thresholds,
    gate_scores_of,
    near_threshold,
    near_tie,
)
from safetensors import safe_open

import dgate_cli
from dgate_cli import _io, cache
from dgate_cli.data.datasets import open_dataset
from dgate_cli.data.loader import spread
from dgate_cli.data.preprocess import Preprocess
from dgate_cli.errors import CacheMismatchError, ManifestError, SpecError
from dgate_cli.evaluation.evaluate import EvaluateResult, evaluate
from dgate_cli.gates.pooling import Pooling
from dgate_cli.pipeline import demo
from dgate_cli.pipeline.calibrate import CalibrationResult, calibrate, outcomes
from dgate_cli.pipeline.export import export
from dgate_cli.pipeline.extract import ExtractResult, extract
from dgate_cli.pipeline.fit import fit, read_gates
from dgate_cli.runtime import manifest
from dgate_cli.runtime.backends import gate_kernel
from dgate_cli.runtime.model import GatedModel
from dgate_cli.thresholds.outcomes import GateOutcomes

SIZES = {"train": 1500, "val": 500, "test": 300}
MAX_DROP = 0.02

# written out literally on purpose: a change to the manifest's top level must be a deliberate one
MANIFEST_KEYS = [
    "calibration",
    "classes",
    "content_sha256",
    "costs",
    "dgate_version",
    "frontier",
    "gates",
    "input_size",
    "loss",
    "model",
    "pooling",
    "preprocess",
    "schema_version",
    "score",
    "source_weights",
    "steps",
    "target",
    "thresholds",
    "weights",
]


TORCH_THREADS = 1  # tiny models and many small tensor ops (see conftest._threads)


@dataclass
class Pipeline:
    data: dict[str, Path]
    weights: Path
    run: Path
    export_dir: Path
    extracted: ExtractResult
    calibration: CalibrationResult


@pytest.fixture(scope="module")
def pipe(tmp_path_factory: pytest.TempPathFactory) -> Pipeline:
    torch.set_num_threads(1)  # module fixtures run before the function-scoped thread setting
    base = tmp_path_factory.mktemp("pipeline")
    data = demo.write_dataset(base / "data", SIZES, seed=0)
    x, y, _ = demo.make_images(SIZES["train"], seed=0)  # the same images as data/train
    weights = base / "demo_cnn.safetensors"
    demo.train(x, y, weights, epochs=4, batch_size=64)
    run = base / "run"
    ex = extract(
        run,
        "demo_cnn",
        {k: str(v) for k, v in data.items()},
        weights=str(weights),
        device="cpu",
        batch_size=128,
        workers=0,
        pooling=Pooling(),  # global pooling: gates weaker than the backbone, so the frontier has many points
    )
    fit(run)
    cal = calibrate(run, max_drop=MAX_DROP)
    export(run, base / "model")
    return Pipeline(data, weights, run, base / "model", ex, cal)


@pytest.fixture(scope="module")
def val_eval(pipe: Pipeline) -> EvaluateResult:
    return evaluate(pipe.export_dir, str(pipe.data["val"]), device="cpu", batch_size=100, workers=0)


@pytest.fixture(scope="module")
def val_images(pipe: Pipeline) -> tuple[torch.Tensor, torch.Tensor]:
    """All val images, normalised as the model expects, and their labels (sample order)."""
    model = dgate_cli.load(pipe.export_dir)
    pre = Preprocess.from_dict(model.manifest["preprocess"])
    ds = open_dataset(str(pipe.data["val"]), pre)
    x = pre.normalize(torch.stack([ds[i][0] for i in range(len(ds))]))
    return x, torch.tensor(ds.labels)


@pytest.fixture(scope="module")
def cached(pipe: Pipeline) -> tuple[GateOutcomes, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Calibration's view of the val split: outcomes, (N, G) gate predictions, backbone predictions,
    and (N, G + 1) whether the outputs at each exit nearly tie between two classes."""
    config = cache.read_run(pipe.run)
    val = cache.load_split(pipe.run, "val")
    gates = read_gates(pipe.run)
    oc, pred = outcomes(config, gates, val, pipe.calibration.gates, pipe.calibration.score)
    ties = [near_tie(gates.outputs(n, val.features[n])) for n in pipe.calibration.gates] + [near_tie(val.logits)]
    return oc, pred, val.logits.argmax(1), torch.stack(ties, 1)


def predicted(cached, thresholds) -> tuple[torch.Tensor, torch.Tensor]:
    """(pred, exit) per val sample that the cache predicts for ``thresholds``."""
    oc, pred, backbone, _ = cached
    e = oc.exits(thresholds)
    G = oc.num_gates
    at_gate = pred.gather(1, e.clamp(max=G - 1)[:, None]).squeeze(1)
    return torch.where(e < G, at_gate, backbone), e


def uncertain(cached, thresholds, ties: bool = True) -> torch.Tensor:
    """``(N,)`` val samples whose cached score lies within float rounding of a threshold at a gate they
    reach (their exit may differ on another float path, such as the runtime's), or, with ``ties``,
    whose outputs at their exit nearly tie between two classes (their class may differ)."""
    oc = cached[0]
    return near_threshold(oc.scores, thresholds, oc.exits(thresholds), cached[3] if ties else None)


def assert_runtime_matches_cache(out, cached, thresholds, labels=None, point=None) -> torch.Tensor:
    """The runtime's exits and classes are the cache's for every sample a margin away from its
    thresholds (and, for the class, from a tie); the few within float rounding (if any) can move
    the exit fractions and the accuracy by at most their share. Returns the mask of those few."""
    want_pred, want_exit = predicted(cached, thresholds)
    undecided, unsure = uncertain(cached, thresholds, ties=False), uncertain(cached, thresholds)
    n = len(want_exit)
    assert int(unsure.sum()) <= n // 10, f"{int(unsure.sum())} of {n} samples within rounding"  # not vacuous
    assert torch.equal(out.exit[~undecided], want_exit[~undecided]), point
    assert torch.equal(out.pred[~unsure], want_pred[~unsure]), point
    if point is not None:
        got = (torch.bincount(out.exit, minlength=cached[0].num_gates + 1).double() / n).tolist()
        slack = float(undecided.sum()) / n
        assert max(abs(a - b) for a, b in zip(got, point.exit_fractions, strict=True)) <= slack + 1e-12, point
        if labels is not None:
            slack = float(unsure.sum()) / n
            assert abs(float((out.pred == labels).double().mean()) - point.accuracy) <= slack + 1e-12, point
    return unsure


def copy_export(pipe: Pipeline, tmp_path: Path) -> Path:
    return Path(shutil.copytree(pipe.export_dir, tmp_path / "model"))


# -- calibration and the invariant -------------------------------------------------------------------


def test_the_pipeline_calibrates_to_its_target(pipe: Pipeline):
    cal = pipe.calibration
    assert cal.gates == DEMO_GATES
    assert cal.target_accuracy == pytest.approx(cal.backbone_accuracy - MAX_DROP)
    assert cal.chosen.accuracy >= cal.target_accuracy
    assert cal.backbone_accuracy == pipe.extracted.splits["val"].backbone_accuracy
    assert cal.backbone_accuracy > 0.3, "the demo CNN did not learn; the test data is not meaningful"
    assert cal.chosen.cost_ratio < 1.0, "the gates save nothing: they carry no signal"
    assert sum(cal.chosen.exit_fractions) == pytest.approx(1.0)


def test_gate_overhead_closes_gates_that_do_not_pay_and_reports_macs(pipe: Pipeline, cached, tmp_path: Path):
    run = Path(shutil.copytree(pipe.run, tmp_path / "run"))
    oc = cached[0]
    B = oc.backbone_cost
    # every gate charged half a backbone: none can pay for itself, all stay closed
    r = calibrate(run, max_drop=MAX_DROP, gate_overhead=0.5)
    assert r.chosen.thresholds == (math.inf,) * len(DEMO_GATES)
    assert r.chosen.cost_ratio == 1.0 and r.chosen.exit_fractions[-1] == 1.0
    assert r.target["gate_overhead"] == 0.5
    assert _io.read_json(run / "calibration.json")["target"]["gate_overhead"] == 0.5
    # a small charge: the chosen point is the cheapest when gates are priced with it (reserve 0: same target)
    plain = calibrate(run, max_drop=MAX_DROP, reserve=0)
    priced = calibrate(run, max_drop=MAX_DROP, reserve=0, gate_overhead=0.02)
    for p in (plain.chosen, priced.chosen, *priced.frontier.points):  # reported costs are MACs
        assert p.mean_cost == pytest.approx(oc.evaluate(p.thresholds).mean_cost, rel=1e-12)

    def with_overhead(p):
        return p.mean_cost + 0.02 * B * sum(
            f for g, f in enumerate(reach_fractions(p)) if g < len(DEMO_GATES) and p.thresholds[g] < math.inf
        )

    def reach_fractions(p):  # share of samples that reach each gate
        return [1.0 - sum(p.exit_fractions[:g]) for g in range(len(p.exit_fractions))]

    assert priced.chosen.accuracy >= priced.target_accuracy
    assert with_overhead(priced.chosen) <= with_overhead(plain.chosen) + 1e-9 * B
    assert sum(t < math.inf for t in priced.chosen.thresholds) <= sum(t < math.inf for t in plain.chosen.thresholds)
    with pytest.raises(SpecError, match=r"--gate-overhead must be a fraction .* got 1.5"):
        calibrate(run, max_drop=MAX_DROP, gate_overhead=1.5)


def test_exported_model_does_exactly_what_calibration_predicted(pipe: Pipeline, val_eval: EvaluateResult, cached):
    cal = pipe.calibration
    order = torch.argsort(val_eval.samples["index"])
    got_pred, got_exit = val_eval.samples["pred"][order], val_eval.samples["exit"][order]
    assert torch.equal(val_eval.samples["index"][order], torch.arange(SIZES["val"]))
    got = SimpleNamespace(exit=got_exit, pred=got_pred)
    near = assert_runtime_matches_cache(got, cached, cal.chosen.thresholds, point=cal.chosen)
    tie = cached[3][:, -1]  # the backbone's two top logits within rounding: either class
    assert torch.equal(val_eval.samples["backbone_pred"][order][~tie], cached[2][~tie])
    assert val_eval.images == SIZES["val"]
    assert abs(val_eval.backbone_accuracy - cal.backbone_accuracy) <= float(tie.sum()) / SIZES["val"]
    if not near.any():  # every sample a margin away from its thresholds: exactly the calibration's numbers
        assert val_eval.accuracy == cal.chosen.accuracy
        assert val_eval.mean_cost == pytest.approx(cal.chosen.mean_cost, rel=1e-6)
        assert val_eval.flops_ratio == pytest.approx(cal.chosen.cost_ratio, rel=1e-6)
        assert val_eval.exit_fractions == pytest.approx(list(cal.chosen.exit_fractions), abs=1e-12)
    else:  # a sample within rounding of a threshold moves each figure by at most its share
        slack = float(near.sum()) / SIZES["val"]
        costs = cached[0].exit_costs(torch.tensor(cal.chosen.thresholds) < math.inf)
        assert abs(val_eval.accuracy - cal.chosen.accuracy) <= slack + 1e-12
        assert abs(val_eval.mean_cost - cal.chosen.mean_cost) <= slack * float(costs.max() - costs.min()) + 1e-6
        assert val_eval.exit_fractions == pytest.approx(list(cal.chosen.exit_fractions), abs=slack + 1e-12)
    # the evaluation's own figures are those of its exits
    costs = cached[0].exit_costs(torch.tensor(cal.chosen.thresholds) < math.inf)
    assert val_eval.mean_cost == pytest.approx(float(costs[got_exit].mean()), rel=1e-6)
    assert val_eval.accuracy == float((got_pred == val_eval.samples["label"][order]).double().mean())


def test_every_stored_operating_point_matches_the_cache(pipe: Pipeline, val_images, cached):
    model = dgate_cli.load(pipe.export_dir)
    x, labels = val_images
    points = model.frontier
    assert len(points) >= 1  # with strong gates one point (all leave early) can dominate every other
    for p in points:
        model.set_thresholds(list(p.thresholds))
        assert_runtime_matches_cache(model(x), cached, p.thresholds, labels, point=p)
    # with thresholds that split the samples over every exit too, cut from the cached scores a margin
    # away from every score that decides: the runtime must then agree on every sample
    t = cascade_thresholds(cached[0].scores)
    assert not uncertain(cached, t, ties=False).any()
    model.set_thresholds(t)
    out = model(x)
    counts = torch.bincount(out.exit, minlength=model.num_gates + 1)
    assert (counts > 0).all(), counts
    want_pred, want_exit = predicted(cached, t)
    assert torch.equal(out.exit, want_exit)
    sure = ~uncertain(cached, t)
    assert torch.equal(out.pred[sure], want_pred[sure])


def test_evaluate_on_held_out_test_images(pipe: Pipeline):
    r = evaluate(pipe.export_dir, str(pipe.data["test"]), device="cpu", batch_size=64, workers=0, images=120)
    assert r.images == 120
    assert sorted(r.samples["index"].tolist()) == sorted(set(r.samples["index"].tolist()))
    assert sum(sum(row) for row in r.per_class_exits) == 120
    full = evaluate(pipe.export_dir, str(pipe.data["test"]), device="cpu", batch_size=64, workers=0)
    ties = near_tie(cache.load_split(pipe.run, "test").logits)  # these may go either way on another float path
    slack = float(ties.sum()) / len(ties)
    assert abs(full.backbone_accuracy - pipe.extracted.splits["test"].backbone_accuracy) <= slack
    assert full.flops_ratio < 1.0
    assert full.to_dict()["exit_fractions"].keys() == {*DEMO_GATES, "backbone"}


# -- the runtime skips work --------------------------------------------------------------------------


def record_stage_inputs(model: GatedModel) -> tuple[list[list[int]], list]:
    seen: list[list[int]] = [[] for _ in model.stages]
    handles = [
        stage.register_forward_pre_hook(lambda mod, args, k=k: seen[k].append(int(args[0].shape[0])))
        for k, stage in enumerate(model.stages)
    ]
    return seen, handles


def test_samples_that_exit_skip_the_later_stages(pipe: Pipeline, val_images, cached, monkeypatch):
    model = dgate_cli.load(pipe.export_dir)
    x = val_images[0][:200]
    G = model.num_gates
    assert len(DEMO_GATES) == G and len(model.stages) == G + 1
    seen, handles = record_stage_inputs(model)

    t0 = cascade_thresholds(cached[0].scores[:200], stay=0.3)[0]  # about 70% leave at gate 0
    only_first = [t0] + [math.inf] * (G - 1)
    model.set_thresholds(only_first)
    out = model(x)
    leave = int((out.exit == 0).sum())
    assert 0 < leave < 200
    assert seen == [[200]] + [[200 - leave]] * G

    for s in seen:
        s.clear()
    model.set_thresholds([-math.inf] * G)
    out = model(x)
    assert seen == [[200]] + [[]] * G
    assert bool((out.exit == 0).all())

    calls = []
    for g, gate in enumerate(model.gates):  # every decision computes its gate's outputs
        gate.register_forward_pre_hook(lambda mod, args, g=g: calls.append(g))
    for s in seen:
        s.clear()
    model.set_thresholds([math.inf] * G)
    out = model(x)
    assert calls == []
    assert seen == [[200]] * (G + 1)
    assert bool((out.exit == G).all())
    assert torch.equal(out.pred, model.backbone_forward(x).argmax(1))
    model.set_thresholds(only_first)
    model(x)
    assert calls == [0]  # the closed gate is never computed
    for h in handles:
        h.remove()


def test_batch_size_does_not_change_decisions(pipe: Pipeline, val_images, cached):
    model = dgate_cli.load(pipe.export_dir)
    x = val_images[0][:64]
    # cut from this batch's own scores: some leave at every gate, none within rounding of a threshold
    # (batches of 1, 40 and 64 convolve with other kernels: the same scores only up to rounding)
    model.set_thresholds(cascade_thresholds(gate_scores_of(model, x)))
    big = model(x)
    assert len(set(big.exit.tolist())) == model.num_gates + 1
    singles = [model(x[i : i + 1]) for i in range(64)]
    assert_same_decisions(big, joined(singles))
    halves = [model(x[:40]), model(x[40:])]
    assert_same_decisions(big, joined(halves))


def joined(outs) -> SimpleNamespace:
    return SimpleNamespace(exit=torch.cat([o.exit for o in outs]), pred=torch.cat([o.pred for o in outs]))


def test_batchnorm_folding_keeps_the_decisions(pipe: Pipeline, val_images):
    model = dgate_cli.load(pipe.export_dir)
    x = val_images[0][:64]
    model.set_thresholds(cascade_thresholds(gate_scores_of(model, x)))  # folded convolutions round otherwise
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.stages.modules())
    plain = dgate_cli.load(pipe.export_dir, fuse=False)
    plain.set_thresholds(model.thresholds)
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in plain.stages.modules())
    with torch.inference_mode():
        a, b = model(x), plain(x)
        assert_same_decisions(a, b)
        torch.testing.assert_close(model.backbone_forward(x), plain.backbone_forward(x), rtol=1e-4, atol=1e-4)


def test_operating_points_switch_without_recalibrating(pipe: Pipeline, val_images, cached):
    untouched = {p: p.stat().st_mtime_ns for p in [pipe.run / "calibration.json", pipe.export_dir / "dgate.json"]}
    model = dgate_cli.load(pipe.export_dir)
    x, _ = val_images
    assert model.thresholds == list(pipe.calibration.chosen.thresholds)
    calibrated = model(x)
    costs_before = model.exit_costs()

    first = model.use_operating_point(index=0)
    assert first == model.frontier[0]
    assert model.thresholds == list(first.thresholds)
    out = model(x)
    assert_runtime_matches_cache(out, cached, first.thresholds, point=first)

    loose = model.use_operating_point(max_drop=0.1)
    # a point promises its calibration target: the cheapest within max_drop of the backbone's accuracy
    base = model.manifest["calibration"]["backbone_accuracy"]
    allowed = [p for p in model.frontier if p.target >= base - 0.1 - 1e-12]
    assert loose.target >= base - 0.1 - 1e-12
    assert loose.mean_cost == min(p.mean_cost for p in allowed)
    assert model.thresholds == list(loose.thresholds)
    out_loose = model(x)
    assert_runtime_matches_cache(out_loose, cached, loose.thresholds, point=loose)
    assert first.mean_cost > loose.mean_cost
    assert not torch.equal(out.exit, out_loose.exit)

    model.set_thresholds(["inf"] * model.num_gates)
    assert bool((model(x).exit == model.num_gates).all())
    assert model.exit_costs() != costs_before
    model.set_thresholds(list(pipe.calibration.chosen.thresholds))
    assert torch.equal(model(x).exit, calibrated.exit)
    assert model.exit_costs() == costs_before

    with pytest.raises(ValueError, match=f"expected {model.num_gates} thresholds"):
        model.set_thresholds([0.0])
    with pytest.raises(ValueError):
        model.set_thresholds([0.0] * (model.num_gates + 1))
    with pytest.raises(ValueError, match="NaN"):
        model.set_thresholds([float("nan")] + [0.0] * (model.num_gates - 1))
    with pytest.raises(ValueError, match="exactly one"):
        model.use_operating_point()
    with pytest.raises(ValueError, match="exactly one"):
        model.use_operating_point(max_drop=0.01, index=0)
    assert model.thresholds == list(pipe.calibration.chosen.thresholds)  # a refused change changes nothing
    assert {p: p.stat().st_mtime_ns for p in untouched} == untouched


# -- the manifest and weights are checked on load ----------------------------------------------------


def test_a_flipped_byte_in_the_weights_is_detected(pipe: Pipeline, tmp_path: Path):
    d = copy_export(pipe, tmp_path)
    w = d / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    w.write_bytes(bytes(raw))
    with pytest.raises(ManifestError, match="sha256"):
        dgate_cli.load(d)


def test_truncated_weights_without_verification(pipe: Pipeline, tmp_path: Path):
    d = copy_export(pipe, tmp_path)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ManifestError, match="sha256"):
        dgate_cli.load(d)
    with pytest.raises(ManifestError, match="safetensors"):
        dgate_cli.load(d, verify=False)


def _edit_manifest(d: Path, edit) -> None:
    """Edit a manifest as a writer would (its content hash rewritten, so validation is what is tested)."""
    m = json.loads((d / "dgate.json").read_text())
    edit(m)
    (d / "dgate.json").write_text(json.dumps(manifest.seal(m)))


def test_unknown_schema_version(pipe: Pipeline, tmp_path: Path):
    d = copy_export(pipe, tmp_path)
    _edit_manifest(d, lambda m: m.update(schema_version=99))
    with pytest.raises(ManifestError, match="schema_version 99") as info:
        dgate_cli.load(d)
    assert "reads 2" in str(info.value)


def test_manifest_that_is_not_json(pipe: Pipeline, tmp_path: Path):
    d = copy_export(pipe, tmp_path)
    (d / "dgate.json").write_text("{ this is not json")
    with pytest.raises(ManifestError, match="corrupt"):
        dgate_cli.load(d)
    (d / "dgate.json").write_text("[1, 2, 3]")
    with pytest.raises(ManifestError, match="not a JSON object"):
        dgate_cli.load(d)


@pytest.mark.parametrize("key", sorted(manifest.REQUIRED))
def test_manifest_missing_a_required_key(pipe: Pipeline, tmp_path: Path, key: str):
    d = copy_export(pipe, tmp_path)
    _edit_manifest(d, lambda m: m.pop(key))
    with pytest.raises(ManifestError, match=key):
        dgate_cli.load(d)


def test_unknown_manifest_keys_are_ignored(pipe: Pipeline, tmp_path: Path, val_images):
    d = copy_export(pipe, tmp_path)
    _edit_manifest(d, lambda m: m.update(added_by_a_newer_dgate={"x": 1}, another=[1, 2]))
    model = dgate_cli.load(d)
    reference = dgate_cli.load(pipe.export_dir)
    x = val_images[0][:32]
    assert torch.equal(model(x).pred, reference(x).pred)
    assert model.manifest["added_by_a_newer_dgate"] == {"x": 1}


def test_missing_weights_file(pipe: Pipeline, tmp_path: Path):
    d = copy_export(pipe, tmp_path)
    (d / "model.safetensors").unlink()
    with pytest.raises(ManifestError, match="missing"):
        dgate_cli.load(d)


# -- golden: what export writes ----------------------------------------------------------------------


def test_manifest_keys_are_exactly_the_known_ones(pipe: Pipeline):
    m = json.loads((pipe.export_dir / "dgate.json").read_text())
    assert sorted(m) == MANIFEST_KEYS
    assert set(m) <= manifest.PERMITTED
    assert set(manifest.REQUIRED) <= set(m)
    assert m["schema_version"] == manifest.SCHEMA_VERSION
    assert [g["name"] for g in m["gates"]] == pipe.calibration.gates
    assert all(set(g) == manifest.GATE_KEYS for g in m["gates"])
    assert m["weights"]["file"] == "model.safetensors"
    assert len(m["thresholds"]) == len(m["gates"])
    assert manifest.validate(m) is m


def test_weights_file_holds_the_backbone_and_the_gates(pipe: Pipeline):
    with safe_open(str(pipe.export_dir / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        G = len(DEMO_GATES)
        gate_shapes = [tuple(f.get_tensor(f"gates.{i}.weight").shape) for i in range(G)]
        bias_shapes = [tuple(f.get_tensor(f"gates.{i}.bias").shape) for i in range(G)]
    expected = {f"backbone.{k}" for k in demo.demo_cnn().state_dict()}
    expected |= {f"gates.{i}.{p}" for i in range(G) for p in ("weight", "bias")}
    assert keys == expected
    sizes = pipe.extracted.config.feature_sizes
    assert gate_shapes == [(10, d) for d in sizes]
    assert bias_shapes == [(10,)] * G


# -- export's own safety -----------------------------------------------------------------------------


def test_export_does_not_overwrite_without_being_asked(pipe: Pipeline, tmp_path: Path):
    d = copy_export(pipe, tmp_path)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    (d / "dgate.json").touch()
    with pytest.raises(CacheMismatchError, match="--overwrite"):
        export(pipe.run, d)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".incomplete")]
    result = export(pipe.run, d, overwrite=True)
    assert result.out_dir == d
    assert dgate_cli.load(d).thresholds == list(pipe.calibration.chosen.thresholds)
    assert sorted(p.name for p in d.iterdir()) == ["dgate.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".incomplete")]


def test_a_failed_export_leaves_nothing_behind(pipe: Pipeline, tmp_path: Path, monkeypatch):
    def broken(data, source="dgate.json"):
        raise ManifestError("simulated failure after the weights were written")

    monkeypatch.setattr("dgate_cli.pipeline.export.manifest.validate", broken)
    out = tmp_path / "fresh"
    with pytest.raises(ManifestError, match="simulated"):
        export(pipe.run, out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []

    d = copy_export(pipe, tmp_path)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(ManifestError, match="simulated"):
        export(pipe.run, d, overwrite=True)
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


@pytest.mark.parametrize(
    "edit, name",
    [
        (lambda m: m["model"].pop("spec"), "model.spec"),
        (lambda m: m["costs"].pop("reach"), "costs.reach"),
        (lambda m: m["costs"].update(gates=[1.0]), "costs.gates"),
        (lambda m: m["gates"][0].update(pooling={}), "gates[0].pooling.sizes"),
        (lambda m: m.update(thresholds=["abc"] * len(m["thresholds"])), "thresholds[0]"),
        (lambda m: m.update(classes=[1, 2]), "classes"),
    ],
)
def test_damaged_nested_manifest_fields(pipe: Pipeline, tmp_path: Path, edit, name: str):
    d = copy_export(pipe, tmp_path)
    _edit_manifest(d, edit)
    with pytest.raises(ManifestError) as info:
        dgate_cli.load(d)
    assert name in str(info.value) and "re-export" in str(info.value)


# -- dgate bench on the exported model ----------------------------------------------------------------


def test_bench_command_reports_json_for_each_batch_size(pipe: Pipeline, cached):
    from typer.testing import CliRunner

    from dgate_cli.cli.app import app

    args = ["bench", str(pipe.export_dir), "--data", str(pipe.data["val"]), "--device", "cpu"]
    result = CliRunner().invoke(app, [*args, "--batch-size", "1,16", "--images", "48", "--repeats", "2", "--json"])
    assert result.exit_code == 0, (result.stderr, result.exception)
    report = json.loads(result.stdout)
    rows = report["rows"]
    assert [r["batch_size"] for r in rows] == [1, 16]
    assert [r["batches"] for r in rows] == [96, 10]  # 48 and 5 (at least 5 batches per size), timed twice
    model = dgate_cli.load(pipe.export_dir)
    for r in rows:
        assert {"backbone_ms", "gated_ms", "speedup", "ideal_speedup", "flops_ratio", "accuracy"} <= r.keys()
        assert r["speedup"] > 0 and r["ideal_speedup"] == pytest.approx(1 / r["flops_ratio"])
        assert len(r["exit_fractions"]) == model.num_gates + 1 and sum(r["exit_fractions"]) == pytest.approx(1.0)
        assert 0.0 <= r["accuracy"] <= 1.0 and 0.0 <= r["backbone_accuracy"] <= 1.0
    assert (
        "threads" in report["device"]
        and "malloc" in report["machine"]
        and report["backends"] == ([] if gate_kernel.status() != "on" else ["gate kernel"])
    )
    assert all(r["mode"] == "batch" for r in rows)
    streamed = CliRunner().invoke(app, [*args, "--batch-size", "16", "--images", "80", "--stream", "--json"])
    assert streamed.exit_code == 0, (streamed.stderr, streamed.exception)
    batch_row, stream_row = json.loads(streamed.stdout)["rows"]
    assert (batch_row["mode"], stream_row["mode"]) == ("batch", "stream")
    assert stream_row["images"] == 80 and stream_row["batches"] == 5  # one pass over the same 5 batches
    assert sum(stream_row["exit_fractions"]) == pytest.approx(1.0) and stream_row["speedup"] > 0
    assert stream_row["backbone_accuracy"] == batch_row["backbone_accuracy"]  # 5 batches of 16: the same 80 images
    # the stream regroups the survivors into other batches: only a sample within float rounding of a
    # threshold (or a tie) may be decided otherwise, each moving the accuracy by 1/80
    timed = spread(SIZES["val"], 80)
    slack = float(uncertain(cached, pipe.calibration.chosen.thresholds)[timed].sum()) / 80
    assert abs(stream_row["accuracy"] - batch_row["accuracy"]) <= slack + 1e-12
    table = CliRunner(env={"COLUMNS": "200"}).invoke(app, [*args, "--batch-size", "16", "--images", "48", "--stream"])
    assert table.exit_code == 0 and "16 stream" in table.stdout and "throughput mode" in table.stdout
    worst = CliRunner(env={"COLUMNS": "200"}).invoke(app, [*args, "--batch-size", "16", "--images", "32", "--no-exits"])
    assert worst.exit_code == 0, (worst.stderr, worst.exception)
    assert "16 no-exit" in worst.stdout and "no exits at batch 16: gated" in worst.stdout
    assert "% time against the backbone" in worst.stdout
    bad = CliRunner().invoke(app, [*args, "--batch-size", "1,x"])
    assert bad.exit_code == 2 and "--batch-size must be comma-separated integers like 1,32,256" in bad.stderr
    bad = CliRunner().invoke(app, [*args, "--dtype", "float64"])
    assert bad.exit_code == 2 and "--dtype must be one of float32, float16, bfloat16" in bad.stderr
    half = CliRunner(env={"COLUMNS": "200"}).invoke(
        app, [*args, "--batch-size", "16", "--images", "32", "--dtype", "bfloat16"]
    )
    assert half.exit_code == 0, (half.stderr, half.exception)
    assert "stages in bfloat16" in half.stdout
