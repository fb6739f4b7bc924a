"""Conventions shared with scikit-learn and torchvision: estimator parameters and ``clone``, the
loaded model's preprocessing, and one way (``to_dict``, strict JSON) to serialise every result."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from sklearn.base import clone

from dgate_cli import _io
from dgate_cli.data.preprocess import Preprocess
from dgate_cli.errors import DataError, SpecError
from dgate_cli.gates.linear import CSearch, LinearGate
from dgate_cli.pipeline.demo import TrainResult
from dgate_cli.pipeline.fit import GateFit
from dgate_cli.pipeline.stages import StageRow
from dgate_cli.thresholds.frontier import Frontier
from dgate_cli.thresholds.outcomes import OperatingPoint


def test_linear_gate_clones_with_sklearn_and_the_clone_is_unfitted():
    gate = LinearGate(loss="ce", C=0.25, max_iter=50)
    X = torch.randn(60, 3)
    gate.fit(X, (X[:, 0] > 0).long(), num_classes=2)
    copy = clone(gate)
    assert copy.get_params() == {
        "loss": "ce",
        "C": 0.25,
        "max_iter": 50,
        "tol": 1e-5,
        "standardize": True,
        "device": "cpu",
    }
    assert copy is not gate and not hasattr(copy, "coef_")
    assert repr(copy) == "LinearGate(loss='ce', C=0.25, max_iter=50)"


def test_set_params_sets_and_refuses_unknown_names():
    gate = LinearGate()
    assert gate.set_params(C=0.5, loss="ce") is gate and (gate.C, gate.loss) == (0.5, "ce")
    with pytest.raises(
        SpecError, match=r"Invalid parameter 'lr' for estimator LinearGate\. Valid parameters are: loss, C"
    ):
        gate.set_params(lr=0.1)


def test_preprocess_is_callable_like_torchvision_transforms():
    p = Preprocess(resize=40, crop=32, mean=(0.5, 0.25, 0.0), std=(0.5, 0.25, 1.0))
    img = Image.new("RGB", (64, 48), (255, 0, 128))
    x = p(img)
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32
    assert x[:, 16, 16].tolist() == pytest.approx([1.0, -1.0, 128 / 255], abs=1e-6)
    batch = p([img, img])
    assert batch.shape == (2, 3, 32, 32) and torch.equal(batch[1], x)
    pixels = torch.full((2, 3, 48, 64), 255, dtype=torch.uint8)
    assert p(pixels).shape == (2, 3, 32, 32) and p(pixels[0]).shape == (3, 32, 32)
    assert p(pixels)[0, 0].sub(1.0).abs().max() < 1e-6
    with pytest.raises(DataError, match="preprocess takes uint8 images .* got a torch.float32 tensor"):
        p(torch.zeros(3, 8, 8))


def test_the_gated_model_carries_its_preprocessing():
    from test_runtime import make_model

    from dgate_cli.gates.pooling import Pooling

    model = make_model(Pooling())
    assert model.transforms() is model.preprocess
    img = Image.new("RGB", (8, 8), (10, 20, 30))
    out = model(model.preprocess([img]))
    assert out.logits.shape == (1, 5)


def strict(obj) -> object:
    return json.loads(json.dumps(obj.to_dict(), allow_nan=False))


def test_every_result_serialises_with_to_dict_as_strict_json():
    point = OperatingPoint((0.5, math.inf), 0.9, 10.0, 0.5, (0.4, 0.0, 0.6), target=0.89)
    frontier = Frontier([point])
    assert strict(frontier)["points"][0]["thresholds"] == [0.5, "inf"]
    assert Frontier.from_dict(strict(frontier)) == frontier
    assert strict(CSearch(0.1, (0.1, 1.0), (0.8, 0.7))) == {
        "C": 0.1,
        "grid": [0.1, 1.0],
        "holdout_accuracy": [0.8, 0.7],
    }
    fit = GateFit("layer1", 16, 0.1, [0.1], [0.8], 0.9, None, 0.95, 1.5, 30)
    assert strict(fit)["val_accuracy"] is None and strict(fit)["gate"] == "layer1"
    assert strict(TrainResult(Path("w.safetensors"), 3, 0.7, 2.0, False))["path"] == "w.safetensors"
    row = StageRow("layer1", [], [16, 32, 32], 10, 10, 0.1, True, "family default")
    assert strict(row)["shape"] == [16, 32, 32]
    assert _io.jsonable(frontier) == frontier.to_dict()
