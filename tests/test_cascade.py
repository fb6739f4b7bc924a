"""Cascades of two tiny demo CNNs, built here: create -> fit policies -> calibrate -> export -> load -> evaluate.

The invariant of a single network holds for a cascade too: the exported model, run on real
images, exits and predicts as the calibration predicted from the members' caches. The small member
is extracted with a normalisation of its own, which the cascade must apply to its share of the input.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import near_threshold, near_tie
from torch import nn
from typer.testing import CliRunner

import dgate_cli
from dgate_cli import cache
from dgate_cli.cli.app import app
from dgate_cli.data.datasets import open_dataset
from dgate_cli.data.preprocess import Preprocess
from dgate_cli.errors import CacheMismatchError, DataError, ManifestError, NotFittedError, SpecError
from dgate_cli.evaluation.bench import bench
from dgate_cli.evaluation.evaluate import evaluate
from dgate_cli.gates.policy import exit_features
from dgate_cli.gates.pooling import Pooling
from dgate_cli.gates.scores import average_probabilities
from dgate_cli.pipeline import demo
from dgate_cli.pipeline.calibrate import calibrate
from dgate_cli.pipeline.cascade import CASCADE_JSON, create, read_members
from dgate_cli.pipeline.cascade_calibrate import calibrate_cascade
from dgate_cli.pipeline.exits import ensemble_options, load_outputs, table
from dgate_cli.pipeline.export import export
from dgate_cli.pipeline.extract import extract
from dgate_cli.pipeline.fit import fit
from dgate_cli.pipeline.policies import fit_exit_policies, network_member, read_policies
from dgate_cli.runtime import manifest
from dgate_cli.runtime.model import GatedModel
from dgate_cli.runtime.plan import Policy, Step

SIZES = {"train": 1500, "val": 500, "test": 200}
SMALL_NORM = {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}  # not the big member's (CIFAR's)
TORCH_THREADS = 1


@dataclass
class Cascade:
    base: Path
    data: dict[str, Path]
    small: Path
    big: Path
    run: Path


def _member(base: Path, name: str, data: dict[str, Path], epochs: int, seed: int, **kw) -> Path:
    """A demo CNN trained (with the normalisation it is extracted with), extracted and fitted."""
    x, y, _ = demo.make_images(SIZES["train"], seed=0)
    weights = base / f"{name}.safetensors"
    norm = Preprocess.from_dict(kw["preprocess"]) if "preprocess" in kw else None
    demo.train(x, y, weights, epochs=epochs, batch_size=64, seed=seed, preprocess=norm)
    run = base / name
    splits = {k: str(v) for k, v in data.items()}
    extract(
        run, "demo_cnn", splits, weights=str(weights), device="cpu", batch_size=128, workers=0, pooling=Pooling(), **kw
    )
    fit(run)
    return run


@pytest.fixture(scope="module")
def casc(tmp_path_factory: pytest.TempPathFactory) -> Cascade:
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("cascade")
    data = demo.write_dataset(base / "data", SIZES, seed=0)
    small = _member(base, "small", data, epochs=2, seed=1, preprocess=SMALL_NORM)
    big = _member(base, "big", data, epochs=4, seed=0)
    run = base / "casc"
    create(run, [small, big])
    fit_exit_policies(run, lambdas=(0.1, 1.0), folds=3)
    return Cascade(base, data, small, big, run)


def _export(c: Cascade, name: str, **calibration) -> tuple[Path, dict]:
    result = calibrate_cascade(c.run, **calibration)
    out = c.base / name
    export(c.run, out, overwrite=True)
    return out, result.to_dict()


def _images(model: GatedModel, split_dir: Path) -> tuple[torch.Tensor, torch.Tensor]:
    pre = model.preprocess
    ds = open_dataset(str(split_dir), pre)
    return pre.normalize(torch.stack([ds[i][0] for i in range(len(ds))])), torch.tensor(ds.labels)


def _predicted(c: Cascade, calib: dict, model: GatedModel):
    """What the members' caches predict for the model's thresholds on val: (pred, exit, unsure)."""
    members = read_members(c.run)
    t = table(members, load_outputs(members, "val"), calib["cascade"]["variant"]["ensemble"])
    oc = t.outcomes()
    if calib["cascade"]["variant"]["policy"] == "learned":  # the exported policies' scores
        scores = [model.policies[g](t.outputs[g], tuple(t.probs[: t.members_before[g]])) for g in range(len(t.exits))]
        oc = t.outcomes(torch.stack(scores, 1))
    e = oc.exits(model.thresholds)
    outs = [*t.outputs, t.final]
    pred = torch.stack([o.argmax(1) for o in outs], 1).gather(1, e[:, None]).squeeze(1)
    ties = torch.stack([near_tie(o) for o in outs], 1)
    return pred, e, near_threshold(oc.scores, model.thresholds, e, ties), oc


# -- the pipeline --------------------------------------------------------------------------------------


def test_costs_count_every_member_run_and_its_normalisation(casc: Cascade):
    small, big = read_members(casc.run)
    t = table([small, big], load_outputs([small, big], "val"), (False, False))
    norm = 3 * 32 * 32
    cum_small = torch.tensor([s["macs"] for s in small.config.costs["stages"]], dtype=torch.float64).cumsum(0)
    cum_big = torch.tensor([s["macs"] for s in big.config.costs["stages"]], dtype=torch.float64).cumsum(0)
    G_small = len(small.gates)
    assert [e.name for e in t.exits] == [f"small/{g}" for g in small.gates] + ["small/head"] + [
        f"big/{g}" for g in big.gates
    ]
    assert t.reach[0] == norm + cum_small[small.config.gates.index(small.gates[0])]
    assert t.reach[G_small] == norm + cum_small[-1]  # the small member's answer: all of it
    first_big = norm + cum_small[-1] + norm + cum_big[big.config.gates.index(big.gates[0])]
    assert t.reach[G_small + 1] == first_big
    assert t.reach[-1] == 2 * norm + cum_small[-1] + cum_big[-1]
    assert t.gate_costs[G_small] == 10 * 10  # the identity gate on the small member's 10 logits
    assert t.reference_cost == float(cum_big[-1])
    oc = t.outcomes()
    assert oc.backbone_cost == float(cum_big[-1]) and oc.backbone_accuracy == pytest.approx(
        float((load_outputs([big], "val")[0].logits.argmax(1) == t.labels).double().mean())
    )


@pytest.mark.parametrize("policy", ["threshold", "learned"])
def test_exported_cascade_does_what_calibration_predicted(casc: Cascade, policy: str):
    out, calib = _export(casc, f"model-{policy}", max_drop=0.02, policy=policy, ensemble="off")
    model = dgate_cli.load(out)
    assert calib["cascade"]["variant"]["policy"] == policy
    x, y = _images(model, casc.data["val"])
    got = model(x)
    pred, e, unsure, oc = _predicted(casc, calib, model)
    assert int(unsure.sum()) <= len(y) // 10
    assert torch.equal(got.exit[~unsure], e[~unsure]) and torch.equal(got.pred[~unsure], pred[~unsure])
    members = torch.tensor(model.exit_members())
    assert 0 < float((members[got.exit] == 0).double().mean()) < 1  # both members answer some images
    if policy == "learned":
        assert all(isinstance(p, Policy) for p in model.policies)


def test_each_member_normalises_the_cascade_input_its_own_way(casc: Cascade):
    out, _ = _export(casc, "model-norm", max_drop=0.02, policy="threshold")
    model = dgate_cli.load(out)
    assert model.preprocess.mean == (0.0, 0.0, 0.0) and model.preprocess.std == (1.0, 1.0, 1.0)
    x, _ = _images(model, casc.data["val"])
    small, big = read_members(casc.run)
    for k, m in enumerate((small, big)):
        cached = cache.load_split(m.run_dir, "val", with_features=False).logits
        torch.testing.assert_close(model.member(k)(x), cached, atol=1e-4, rtol=1e-4)
    # the reference is the last member: what `evaluate` compares with
    torch.testing.assert_close(
        model.backbone_forward(x), cache.load_split(big.run_dir, "val").logits, atol=1e-4, rtol=1e-4
    )


def test_combined_answers_average_the_members_probabilities(casc: Cascade):
    out, calib = _export(casc, "model-ens", target_acc=0.2, policy="threshold", ensemble="on")
    assert calib["cascade"]["variant"]["ensemble"] == [False, True]
    model = dgate_cli.load(out)
    x, _ = _images(model, casc.data["val"])
    model.set_thresholds([math.inf] * model.num_gates)  # everyone to the end
    small, big = read_members(casc.run)
    p = [torch.softmax(cache.load_split(m.run_dir, "val", with_features=False).logits, 1) for m in (small, big)]
    torch.testing.assert_close(model(x).logits, average_probabilities(p), atol=1e-4, rtol=1e-4)


def test_evaluate_reports_against_the_last_member_with_each_members_share(casc: Cascade):
    out, calib = _export(casc, "model-eval", max_drop=0.02, policy="threshold")
    r = evaluate(out, str(casc.data["val"]), device="cpu", batch_size=64, workers=0).to_dict()
    big = read_members(casc.run)[1]
    assert r["backbone_accuracy"] == pytest.approx(
        cache.load_split(big.run_dir, "val", with_features=False).backbone_accuracy
    )
    chosen = calib["chosen"]
    assert abs(r["flops_ratio"] - chosen["cost_ratio"]) < 0.03 and abs(r["accuracy"] - chosen["accuracy"]) < 0.03
    shares = r["members"]
    assert [m["name"] for m in shares] == ["small", "big"] and shares[0]["ran"] == 1.0
    assert shares[0]["answered"] + shares[1]["answered"] == pytest.approx(1.0)
    assert shares[1]["ran"] == pytest.approx(shares[1]["answered"])


def test_bench_times_the_cascade_against_its_reference_and_each_member(casc: Cascade):
    out, _ = _export(casc, "model-bench", max_drop=0.02, policy="threshold")
    model = dgate_cli.load(out)
    x, y = _images(model, casc.data["val"])
    r = bench(model, x[:64], y[:64], batch_sizes=[16], repeats=1)
    assert [row.mode for row in r.rows] == ["batch", "member small"]
    member = r.rows[1]
    small = read_members(casc.run)[0]
    assert member.flops_ratio == pytest.approx((small.backbone_cost + 3 * 32 * 32) / model.cost.backbone)
    assert member.accuracy == pytest.approx(float((model.member(0)(x[:64]).argmax(1) == y[:64]).double().mean()))
    with pytest.raises(SpecError, match="--stream"):
        bench(model, x[:8], y[:8], batch_sizes=[4], stream=True)


def test_calibration_records_every_variant_and_keeps_the_cheapest(casc: Cascade):
    r = calibrate_cascade(casc.run, max_drop=0.02)
    info = r.cascade
    reached = [v for v in info["variants"] if v["cost_ratio"] is not None]
    assert len(info["variants"]) == len(ensemble_options(2)) * 3  # threshold + two lambdas, each way of answering
    assert r.chosen.cost_ratio == pytest.approx(min(v["cost_ratio"] for v in reached))
    assert r.backbone_accuracy - r.chosen.target <= 0.02 + 1e-12  # type: ignore[operator]


def test_policies_are_cross_fitted_and_stale_ones_are_refused(casc: Cascade, tmp_path: Path):
    members = read_members(casc.run)
    learned = read_policies(casc.run, members)
    assert learned is not None and learned.split == "val" and learned.lambdas == [0.1, 1.0]
    t = table(members, load_outputs(members, "val"), (False, False))
    final = torch.stack([p.score(t.features(g)) for g, p in enumerate(learned.policies((False, False), 0.1))], 1)
    oof = learned.oof((False, False), 0.1)
    assert oof.shape == final.shape and not torch.allclose(oof, final)  # out-of-fold, not the final fit
    # the runtime's policy module scores as the fitted policy does
    p = learned.policies((False, False), 0.1)[-1]
    g = len(t.exits) - 1
    module = Policy(p.weight, p.bias)
    torch.testing.assert_close(
        module(t.outputs[g], tuple(t.probs[:1])), p.score(exit_features(t.outputs[g], t.probs[:1]))
    )


# -- bad input -------------------------------------------------------------------------------------------


def _cli(*args: str):
    return CliRunner().invoke(app, list(args))


def test_a_cascade_of_one_member_is_refused(casc: Cascade, tmp_path: Path):
    r = _cli("cascade", str(tmp_path / "c"), str(casc.small))
    assert r.exit_code == 2 and "at least two member run directories, got 1" in r.output
    assert not (tmp_path / "c").exists()


def test_a_member_that_is_not_fitted_is_refused(casc: Cascade, tmp_path: Path):
    unfitted = tmp_path / "unfitted"
    unfitted.mkdir()
    (unfitted / cache.RUN_FILE).write_text((casc.small / cache.RUN_FILE).read_text())
    with pytest.raises(NotFittedError, match="is not fitted; run `dgate fit"):
        create(tmp_path / "c", [unfitted, casc.big])
    r = _cli("cascade", str(tmp_path / "c2"), str(unfitted), str(casc.big))
    assert r.exit_code == 2 and "not fitted" in r.output and not (tmp_path / "c2").exists()


def test_members_with_other_classes_are_refused(casc: Cascade, tmp_path: Path):
    data = {k: Path(shutil.copytree(v, tmp_path / "data" / k)) for k, v in casc.data.items()}
    first = sorted(p.name for p in data["train"].iterdir() if p.is_dir())[0]
    for d in data.values():
        (d / first).rename(d / "zebra")  # another class name, which also sorts last: the labels shift
    run = _member(tmp_path, "zebra", data, epochs=1, seed=2)
    with pytest.raises(DataError, match="has classes that .* lacks .*zebra.*same classes in the same order"):
        create(tmp_path / "c", [run, casc.big])
    assert not (tmp_path / "c").exists()


def test_members_extracted_from_other_files_are_refused(casc: Cascade, tmp_path: Path):
    # a copy of the data (other modification times: that is fine) with one val image fewer (that is not)
    data = {k: Path(shutil.copytree(v, tmp_path / "data" / k)) for k, v in casc.data.items()}
    next(data["val"].glob("*/*.png")).unlink()
    run = _member(tmp_path, "fewer", data, epochs=1, seed=2)
    with pytest.raises(DataError, match="'val' splits were extracted from different files"):
        create(tmp_path / "c", [run, casc.big])
    assert not (tmp_path / "c").exists()


def test_members_that_see_images_at_other_sizes_are_refused(casc: Cascade, tmp_path: Path):
    run = _member(tmp_path, "resized", casc.data, epochs=1, seed=3, preprocess={"resize": 36, "crop": 32})
    with pytest.raises(SpecError, match="a cascade takes one image format"):
        create(tmp_path / "c", [run, casc.big])


def test_cascade_run_directories_and_members_are_kept_apart(casc: Cascade, tmp_path: Path):
    with pytest.raises(SpecError, match="is one of the members"):
        create(casc.small, [casc.small, casc.big])
    with pytest.raises(SpecError, match="is itself a cascade"):
        create(tmp_path / "c", [casc.run, casc.big])
    with pytest.raises(CacheMismatchError, match="already holds a cascade"):
        create(casc.run, [casc.small, casc.big])
    with pytest.raises(SpecError, match="different run directories"):
        create(tmp_path / "c", [casc.big, casc.big])
    assert json.loads((casc.run / CASCADE_JSON).read_text())["members"][0]["name"] == "small"


def test_single_network_options_are_refused_for_a_cascade_and_the_reverse(casc: Cascade):
    r = _cli("calibrate", str(casc.run), "--max-drop", "0.02", "--score", "max")
    assert r.exit_code == 2 and "--score and --gates apply to a single network" in r.output
    r = _cli("calibrate", str(casc.small), "--max-drop", "0.02", "--ensemble", "on")
    assert r.exit_code == 2 and "--ensemble applies to cascades" in r.output
    r = _cli("calibrate", str(casc.small), "--max-drop", "0.02", "--policy", "learned")
    assert r.exit_code == 2 and "has no learned policies; run `dgate fit" in r.output


def test_a_manifest_with_a_member_missing_is_refused(casc: Cascade, tmp_path: Path):
    out, _ = _export(casc, "model-manifest", max_drop=0.02, policy="threshold")
    data = manifest.read(out)
    broken = {**data, "members": data["members"][:1]}
    with pytest.raises(ManifestError, match="two or more members"):
        manifest.validate(broken)


# -- the runtime's memory of earlier answers, on a hand-built cascade ---------------------------------------


def test_memory_follows_the_rows_that_stay():
    """Member 0 answers the even rows; the odd rows go on to member 1, whose answer averages its
    probabilities with member 0's for the same rows, not for the rows that left."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    plan = [Step("stage", "a/head", "input", 0, remember=True), Step("stage", "b/head", "input", None, ensemble=True)]
    model = GatedModel([a, b], [torch.eye(3)], [torch.zeros(3)], ["nc"], Pooling(), [0.5], score="max", plan=plan)
    x = torch.randn(6, 4)
    big = torch.tensor([10.0, 0.0, 0.0])
    # rows 0, 2, 4 leave at member 0: make their first logit large enough to pass the 0.5 max-threshold
    with torch.no_grad():
        a.weight.zero_()
        a.bias.copy_(torch.tensor([-1.0, -1.0, -1.0]))
        x[::2] = 0.0
        a.weight[0, 0] = 1.0
        x[::2, 0] = 10.0
    out = model(x)
    assert out.exit.tolist() == [0, 1, 0, 1, 0, 1]
    with torch.no_grad():
        want = average_probabilities([torch.softmax(a(x[1::2]), 1), torch.softmax(b(x[1::2]), 1)])
    torch.testing.assert_close(out.logits[1::2], want)
    assert big.shape == (3,)
    with pytest.raises(ValueError, match="single networks"):
        list(model.stream([x]))


# -- learned policies on a single network's gates ----------------------------------------------------------


def test_a_single_network_can_exit_on_learned_policies(casc: Cascade, tmp_path: Path):
    run = Path(shutil.copytree(casc.big, tmp_path / "big"))
    fit_exit_policies(run, lambdas=(0.3, 1.0), folds=3)
    r = calibrate(run, max_drop=0.02, policy="learned")
    assert r.policy is not None and r.policy["policy"] == "learned" and r.policy["lambda"] in (0.3, 1.0)
    export(run, tmp_path / "model")
    model = dgate_cli.load(tmp_path / "model")
    assert len(model.policies) == model.num_gates and all(isinstance(p, Policy) for p in model.policies)
    member = network_member(run)
    t = table([member], load_outputs([member], "val"), (False,))
    scores = torch.stack([model.policies[g](t.outputs[g], ()) for g in range(len(t.exits))], 1)
    oc = t.outcomes(scores)
    e = oc.exits(model.thresholds)
    x, _ = _images(model, casc.data["val"])
    got = model(x)
    unsure = near_threshold(oc.scores, model.thresholds, e)
    assert int(unsure.sum()) <= len(e) // 10 and torch.equal(got.exit[~unsure], e[~unsure])
    # by default calibration keeps whichever is cheaper at the target, and says which it tried
    auto = calibrate(run, max_drop=0.02)
    costs = [v["cost_ratio"] for v in auto.policy["variants"] if v["cost_ratio"] is not None]  # type: ignore[index]
    assert [v["policy"] for v in auto.policy["variants"]] == ["threshold", "learned", "learned"]  # type: ignore[index]
    assert auto.chosen.cost_ratio == pytest.approx(min(costs))
    # policies refitted after calibration are not exported with stale thresholds
    fit_exit_policies(run, lambdas=(0.1,), folds=3)
    if auto.policy["policy"] == "learned":  # type: ignore[index]
        with pytest.raises(CacheMismatchError, match="refitted after calibration"):
            export(run, tmp_path / "model2")
    with pytest.raises(NotFittedError, match="fit .* --policies"):
        calibrate(casc.small, max_drop=0.02, policy="learned")  # no policies fitted there


def test_fit_policies_only_keeps_the_gates(casc: Cascade, tmp_path: Path):
    run = Path(shutil.copytree(casc.small, tmp_path / "small"))
    gates = (run / "gates.safetensors").read_bytes()
    r = _cli("fit", str(run), "--policies-only", "--json")
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["lambdas"] == [0.01, 0.03, 0.1, 0.3, 1.0]
    assert (run / "gates.safetensors").read_bytes() == gates and (run / "policies.safetensors").is_file()
