"""Model specs: parsing, built-in models, user factories and their error messages."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import R20_GATES
from torch import nn

from dgate_cli.data.preprocess import Preprocess
from dgate_cli.errors import DgateError, SpecError
from dgate_cli.models.backbone import CIFAR_PREPROCESS, build_backbone
from dgate_cli.models.cifar_resnet import DEPTHS, CifarResNet, OptionAShortcut, cifar_resnet
from dgate_cli.models.families import GENERIC, Family, register
from dgate_cli.models.specs import ModelSpec, list_builtin_models, parse_model_spec
from dgate_cli.models.staging import run_stages

FACTORY_SOURCE = textwrap.dedent(
    """
    import torch
    from torch import nn

    CALLS = []


    class Net(nn.Module):
        def __init__(self, width=8, num_classes=3):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.ReLU())
            self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, stride=2), nn.ReLU())
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.head = nn.Linear(width, num_classes)

        def forward(self, x):
            x = self.body(self.stem(x))
            return self.head(torch.flatten(self.pool(x), 1))


    def make(width=8, num_classes=3):
        CALLS.append((width, num_classes))
        return Net(width, num_classes)


    def make_seq(width=4, num_classes=2):
        return nn.Sequential(
            nn.Conv2d(3, width, 3), nn.ReLU(), nn.Conv2d(width, width, 3), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes),
        )


    def not_a_model():
        return {"weights": 1}


    NOT_CALLABLE = 3
    """
)


@pytest.fixture
def factory_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A user module on sys.path; returns its (test-unique) name."""
    name = f"dgate_user_models_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(FACTORY_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


# -- spec parsing --------------------------------------------------------------------------------------


def test_parse_builtin_specs():
    assert parse_model_spec("cifar_resnet56") == ModelSpec("cifar_resnet", "56", {})
    assert parse_model_spec("  resnet50 ") == ModelSpec("torchvision", "resnet50", {})
    assert parse_model_spec("torchvision:resnet50") == ModelSpec("torchvision", "resnet50", {})
    assert parse_model_spec("demo_cnn") == ModelSpec("demo", "demo_cnn", {})
    assert parse_model_spec("pkg.mod:make_model") == ModelSpec("factory", "pkg.mod:make_model", {})


def test_spec_str_round_trips():
    for spec in ["cifar_resnet20", "torchvision:resnet18", "demo_cnn", "pkg.sub.mod:fn"]:
        ms = parse_model_spec(spec, {"num_classes": 7})
        assert str(ms) == spec
        assert parse_model_spec(str(ms), ms.kwargs) == ms
        assert ms.to_dict() == {"spec": spec, "kwargs": {"num_classes": 7}}
    assert str(parse_model_spec("resnet18")) == "torchvision:resnet18"


def test_model_kwargs_as_json_or_dict():
    assert parse_model_spec("resnet18", '{"num_classes": 10}').kwargs == {"num_classes": 10}
    assert parse_model_spec("resnet18", {"num_classes": 10}).kwargs == {"num_classes": 10}
    assert parse_model_spec("resnet18", "  ").kwargs == {}
    assert parse_model_spec("resnet18", None).kwargs == {}
    d = {"num_classes": 10}
    ms = parse_model_spec("resnet18", d)
    d["num_classes"] = 11
    assert ms.kwargs == {"num_classes": 10}, "the spec must not alias the caller's dict"


@pytest.mark.parametrize("bad", ['{"num_classes": }', "{num_classes: 10}", "'x'"])
def test_model_kwargs_bad_json(bad):
    with pytest.raises(SpecError) as ei:
        parse_model_spec("resnet18", bad)
    msg = str(ei.value)
    assert "--model-kwargs" in msg and "not valid JSON" in msg and "\n" not in msg


@pytest.mark.parametrize("bad", ["[1, 2]", '"num_classes"', "10", [("num_classes", 10)]])
def test_model_kwargs_must_be_an_object(bad):
    with pytest.raises(SpecError, match="must be a JSON object"):
        parse_model_spec("resnet18", bad)


def test_unknown_model_name():
    with pytest.raises(SpecError) as ei:
        parse_model_spec("resnet5000")
    msg = str(ei.value)
    assert "'resnet5000'" in msg and "`dgate models`" in msg and "\n" not in msg
    with pytest.raises(SpecError, match="dgate models"):
        parse_model_spec("torchvision:resnet5000")
    with pytest.raises(SpecError, match="dgate models"):
        build_backbone("resnet5000")


def test_unknown_cifar_depth_lists_depths():
    with pytest.raises(SpecError) as ei:
        parse_model_spec("cifar_resnet21")
    msg = str(ei.value)
    assert all(str(d) in msg for d in DEPTHS)


@pytest.mark.parametrize("bad", ["my-mod:make", "mod:", ":make", "mod:make-model", "a..b:f"])
def test_malformed_factory_spec(bad):
    with pytest.raises(SpecError, match="package.module:factory"):
        parse_model_spec(bad)


def test_builtin_list():
    names = list_builtin_models()
    assert [f"cifar_resnet{d}" for d in DEPTHS] == names[: len(DEPTHS)]
    assert "demo_cnn" in names and "resnet18" in names and "vit_b_16" in names
    for n in names:
        parse_model_spec(n)  # every listed name parses


# -- built-in models -------------------------------------------------------------------------------


def test_cifar_resnet_backbone():
    torch.manual_seed(0)
    bb = build_backbone("cifar_resnet20")
    assert isinstance(bb.module, CifarResNet)
    assert not bb.module.training
    assert bb.family.name == "cifar_resnet"
    assert bb.input_size == 32
    assert bb.preprocess == CIFAR_PREPROCESS == Preprocess()
    assert bb.weights is None
    assert bb.num_classes == 10
    assert bb.default_gates() == R20_GATES
    # 3 blocks per stage: 8 candidates (every block but the last)
    assert [c.name for c in bb.candidate_cuts()][:3] == ["layer1.0", "layer1.1", "layer1"]
    assert len(bb.candidate_cuts()) == 8
    assert sum(p.numel() for p in bb.module.parameters()) == 269722  # ResNet-20 with option-A shortcuts: 0.27M
    shortcuts = [m for m in bb.module.modules() if isinstance(m, OptionAShortcut)]
    assert len(shortcuts) == 2 and sum(p.numel() for s in shortcuts for p in s.parameters()) == 0


def test_cifar_resnet_kwargs_and_depths():
    bb = build_backbone("cifar_resnet32", model_kwargs='{"num_classes": 100}')
    assert bb.num_classes == 100
    assert len(bb.module.layer1) == 5
    with pytest.raises(ValueError, match="depth"):
        cifar_resnet(21)


def test_cifar_resnet_shapes():
    torch.manual_seed(0)
    m = cifar_resnet(20).eval()
    stages = build_backbone("cifar_resnet20").graph
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        h = torch.relu(m.bn1(m.conv1(x)))
        assert m.layer1(h).shape == (2, 16, 32, 32)
        assert m.layer2(m.layer1(h)).shape == (2, 32, 16, 16)
        assert m.layer3(m.layer2(m.layer1(h))).shape == (2, 64, 8, 8)
    assert "layer3" in stages and "avgpool" in stages and "linear" not in stages  # linear gives the logits
    s = OptionAShortcut(32)
    y = s(torch.ones(1, 16, 8, 8))
    assert y.shape == (1, 32, 4, 4)
    assert y[:, :8].abs().sum() == 0 and y[:, 24:].abs().sum() == 0 and torch.equal(y[:, 8:24], torch.ones(1, 16, 4, 4))


def test_torchvision_backbone_preprocessing_and_size():
    bb = build_backbone("resnet18", model_kwargs={"num_classes": 10})
    assert bb.spec == ModelSpec("torchvision", "resnet18", {"num_classes": 10})
    assert bb.preprocess.resize == 256 and bb.preprocess.crop == 224
    assert bb.input_size == 224
    assert build_backbone("resnet18", input_size=64).input_size == 64


def test_torchvision_bad_kwargs():
    with pytest.raises(SpecError) as ei:
        build_backbone("resnet18", model_kwargs={"num_clases": 10})
    msg = str(ei.value)
    assert "num_clases" in msg and "torchvision:resnet18" in msg and "\n" not in msg


def test_torchvision_weights_tag_errors():
    with pytest.raises(SpecError, match="torchvision:IMAGENET1K_V1"):
        build_backbone("resnet18", weights="torchvision:NOPE")
    with pytest.raises(SpecError, match="only for torchvision models"):
        build_backbone("cifar_resnet20", weights="torchvision:DEFAULT")


def test_resolve_gates_variants():
    bb = build_backbone("cifar_resnet20")
    assert [c.name for c in bb.resolve_gates(None)] == R20_GATES
    assert [c.name for c in bb.resolve_gates([])] == R20_GATES
    assert [c.name for c in bb.resolve_gates(["layer2.1", "layer1.2"])] == ["layer1", "layer2.1"]
    assert len(bb.resolve_gates(["all"])) == 8
    with pytest.raises(SpecError, match="dgate stages cifar_resnet20"):
        bb.resolve_gates(["layer7"])


# -- user factories ------------------------------------------------------------------------------------


def test_factory_model_with_kwargs(factory_module):
    bb = build_backbone(f"{factory_module}:make", model_kwargs='{"width": 4, "num_classes": 5}')
    mod = sys.modules[factory_module]
    assert mod.CALLS == [(4, 5)]
    assert type(bb.module).__name__ == "Net" and bb.module.stem[0].out_channels == 4
    assert not bb.module.training
    assert bb.spec == ModelSpec("factory", f"{factory_module}:make", {"width": 4, "num_classes": 5})
    assert bb.family is GENERIC
    assert bb.preprocess == Preprocess()
    assert bb.input_size == 224
    assert bb.num_classes == 5
    gates = bb.default_gates()
    assert gates == ["stem"]  # the cut nearest each ninth of the MACs; `body` ends past 94.4% (test_defaults.py)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(run_stages(bb.graph.split(bb.graph.resolve(gates)), x)[-1], bb.module(x))


def test_factory_sequential_model(factory_module):
    bb = build_backbone(f"{factory_module}:make_seq", model_kwargs={"width": 6})
    assert isinstance(bb.module, nn.Sequential)
    assert [c.name for c in bb.candidate_cuts()] == ["0", "1", "2", "3", "4", "5"]
    gates = bb.default_gates()
    assert gates == ["1"]  # the ReLU after the first convolution, at 1/3 of the MACs (test_defaults.py)
    torch.manual_seed(0)
    x = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        ref = bb.module(x)
        assert ref.shape == (2, 2)
        assert torch.equal(run_stages(bb.graph.split(bb.graph.resolve(gates)), x)[-1], ref)
        assert torch.equal(run_stages(bb.graph.split(bb.candidate_cuts()), x)[-1], ref)


def test_factory_module_not_importable():
    with pytest.raises(SpecError) as ei:
        build_backbone("dgate_no_such_module_xyz:fn")
    msg = str(ei.value)
    assert "dgate_no_such_module_xyz" in msg and "PYTHONPATH" in msg and "\n" not in msg


def test_factory_missing_attribute(factory_module):
    with pytest.raises(SpecError) as ei:
        build_backbone(f"{factory_module}:missing")
    assert "'missing'" in str(ei.value) and "no callable" in str(ei.value)
    with pytest.raises(SpecError, match="no callable 'NOT_CALLABLE'"):
        build_backbone(f"{factory_module}:NOT_CALLABLE")


def test_factory_returning_non_module(factory_module):
    with pytest.raises(SpecError) as ei:
        build_backbone(f"{factory_module}:not_a_model")
    msg = str(ei.value)
    assert "returned dict" in msg and "torch.nn.Module" in msg


def test_factory_bad_kwargs(factory_module):
    with pytest.raises(SpecError) as ei:
        build_backbone(f"{factory_module}:make", model_kwargs={"depth": 3})
    msg = str(ei.value)
    assert "depth" in msg and "--model-kwargs" in msg and "\n" not in msg


def test_spec_errors_are_value_errors_and_dgate_errors():
    with pytest.raises(ValueError):
        parse_model_spec("resnet5000")
    with pytest.raises(DgateError):
        parse_model_spec("resnet18", "[1]")


# -- the registry ----------------------------------------------------------------------------------


def test_register_rejects_duplicates_and_empty_types():
    with pytest.raises(ValueError, match="already registered"):
        register(Family("resnet", (nn.Linear,), lambda m: [], lambda m: []))
    with pytest.raises(ValueError, match="no module types"):
        register(Family("dgate_test_empty", (), lambda m: [], lambda m: []))
