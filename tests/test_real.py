"""On the real data: the checkpoints' accuracies through `dgate extract`, and the pipeline end to end.

Skipped, with the reason, where ../shared/data is absent (set DGATE_SHARED_DATA to point elsewhere).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import CIFAR, R20, R20_GATES, R56, near_threshold, near_tie, needs_shared
from typer.testing import CliRunner

import dgate_cli.evaluation.evaluate
from dgate_cli.cache.run import read_run
from dgate_cli.cache.shards import load_split
from dgate_cli.cli.app import app
from dgate_cli.pipeline.calibrate import outcomes, read_calibration
from dgate_cli.pipeline.fit import read_gates

pytestmark = [needs_shared, pytest.mark.shared_data, pytest.mark.slow]
ENV = {"COLUMNS": "400", "DGATE_DEBUG": None}


def dgate(*args: object) -> dict:
    result = CliRunner().invoke(app, [str(a) for a in args], env=ENV)
    assert result.exit_code == 0, (result.stderr, result.exception)
    return json.loads(result.stdout) if "--json" in args else {}


@pytest.mark.parametrize(
    "model, weights, val_acc, test_acc",
    [("cifar_resnet56", R56, 0.8302, 0.8338), ("cifar_resnet20", R20, 0.8102, 0.8104)],
)
def test_extract_reproduces_the_checkpoint_accuracies(tmp_path, model, weights, val_acc, test_acc):
    """The documented top-1 on cifar10-jpeg val / test, within 0.05 points (val doubles as train here)."""
    out = dgate(
        "extract",
        tmp_path / "run",
        "--model",
        model,
        "--weights",
        weights,
        "--train",
        CIFAR / "val",
        "--val",
        CIFAR / "test",
        "--json",
    )
    assert out["splits"]["train"]["images"] == 5000 and out["splits"]["val"]["images"] == 5000
    assert abs(out["splits"]["train"]["backbone_accuracy"] - val_acc) <= 0.0005
    assert abs(out["splits"]["val"]["backbone_accuracy"] - test_acc) <= 0.0005


def _subset(src: Path, dst: Path, start: int, per_class: int) -> Path:
    """An ImageFolder of symlinks to images start..start+per_class of each class (nothing copied)."""
    for cls in sorted(p for p in src.iterdir() if p.is_dir()):
        (dst / cls.name).mkdir(parents=True)
        for f in sorted(cls.iterdir())[start : start + per_class]:
            (dst / cls.name / f.name).symlink_to(f.resolve())
    return dst


@pytest.fixture(scope="module")
def r20_pipeline(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("real")
    data = {
        "train": _subset(CIFAR / "train", base / "train", 0, 400),
        "val": _subset(CIFAR / "val", base / "val", 0, 250),
        "test": _subset(CIFAR / "test", base / "test", 0, 250),
    }
    run, model = base / "run", base / "model"
    extracted = dgate(
        "extract",
        run,
        "--model",
        "cifar_resnet20",
        "--weights",
        R20,
        "--train",
        data["train"],
        "--val",
        data["val"],
        "--test",
        data["test"],
        "--json",
    )
    fitted = dgate("fit", run, "--json")
    calibrated = dgate("calibrate", run, "--max-drop", "0.02", "--json")
    dgate("export", run, "--out", model, "--json")
    return data, run, model, extracted, fitted, calibrated


def test_pipeline_on_real_images(r20_pipeline):
    data, run, model, extracted, fitted, calibrated = r20_pipeline
    assert [g["gate"] for g in fitted["gates"]] == R20_GATES
    assert calibrated["chosen"]["accuracy"] >= calibrated["target_accuracy"]
    assert calibrated["chosen"]["cost_ratio"] < 1.0
    ev = dgate("evaluate", model, "--data", data["test"], "--workers", 0, "--json")
    assert ev["images"] == 2500
    assert ev["backbone_accuracy"] == pytest.approx(extracted["splits"]["test"]["backbone_accuracy"], abs=1e-9)
    assert ev["flops_ratio"] < 1.0
    assert ev["accuracy"] >= ev["backbone_accuracy"] - 0.05  # 2,500 unseen images: target 2 points plus noise
    assert abs(sum(ev["exit_fractions"].values()) - 1) < 1e-9


def test_exported_model_reproduces_calibration_on_real_images(r20_pipeline):
    """Invariant: on the calibration images the exported model exits and predicts exactly as the
    calibration predicted from the cache - every image whose cached score is a margin away from the
    thresholds it meets (and, for the class, from a tie between two classes); the few within float
    rounding (the runtime computes the scores on another path) may go either way, and move the
    accuracy by at most their share."""
    data, run, model_dir, *_ = r20_pipeline
    config, gates, val = read_run(run), read_gates(run), load_split(run, "val")
    calib = read_calibration(run)
    oc, pred = outcomes(config, gates, val, calib["gates"], calib["score"])
    thresholds = [float(t) for t in calib["chosen"]["thresholds"]]
    exits = oc.exits(thresholds)
    G = len(calib["gates"])
    expected = torch.where(exits < G, pred.gather(1, exits.clamp(max=G - 1)[:, None]).squeeze(1), val.logits.argmax(1))
    ev = dgate_cli.evaluation.evaluate.evaluate(model_dir, str(data["val"]), workers=0)
    order = torch.argsort(ev.samples["index"])
    by_index = torch.argsort(val.index)
    ties = [near_tie(gates.outputs(n, val.features[n])) for n in calib["gates"]] + [near_tie(val.logits)]
    ties = torch.stack(ties, 1)
    undecided = near_threshold(oc.scores, thresholds, exits)[by_index]  # the exit may differ
    unsure = near_threshold(oc.scores, thresholds, exits, ties)[by_index]  # the exit or the class
    assert int(unsure.sum()) <= len(unsure) // 10, f"{int(unsure.sum())} of {len(unsure)} images within rounding"
    assert torch.equal(ev.samples["exit"][order][~undecided], exits[by_index][~undecided])
    assert torch.equal(ev.samples["pred"][order][~unsure], expected[by_index][~unsure])
    slack = float(unsure.sum()) / len(unsure)
    assert ev.accuracy == pytest.approx(calib["chosen"]["accuracy"], abs=slack + 1e-12)
