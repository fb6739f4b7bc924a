"""Default gate positions: declared families keep theirs; other models get gates spread by cost.

The user model here is shaped like the issue's CIFAR DenseNet-BC: its first top-level module (a
block of concatenating layers, one cut after each) holds most of the MACs, so gates placed by count
of top-level modules would all sit late in the network.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import R20_GATES, write_image_folder
from typer.testing import CliRunner

from dgate_cli.cli.app import app
from dgate_cli.errors import DataError, SpecError
from dgate_cli.models.backbone import build_backbone
from dgate_cli.models.cost_defaults import END_FRACTION, CutCost, excluded_because, spread_by_cost
from dgate_cli.models.families import GENERIC
from dgate_cli.models.staging import run_stages
from dgate_cli.pipeline.stages import list_stages

TORCH_THREADS = 1  # batch-1 passes of tiny tensors: two threads spin-wait on a busy two-core machine

MODELS_SOURCE = textwrap.dedent(
    """
    from collections import OrderedDict

    import torch
    from torch import nn


    class Grow(nn.Module):
        '''A DenseNet layer: its input and `growth` new channels, concatenated (one tensor: a cut after it).'''

        def __init__(self, cin, growth):
            super().__init__()
            self.conv = nn.Conv2d(cin, growth, 3, padding=1, bias=False)

        def forward(self, x):
            return torch.cat([x, torch.relu(self.conv(x))], 1)


    def heavy_first(num_classes=10):
        '''block1 (12 layers at full resolution) holds 71% of the MACs.'''
        return nn.Sequential(OrderedDict(
            stem=nn.Conv2d(3, 8, 3, padding=1, bias=False),
            block1=nn.Sequential(*[Grow(8 + 4 * i, 4) for i in range(12)]),
            trans=nn.Sequential(nn.Conv2d(56, 32, 1, bias=False), nn.AvgPool2d(2)),
            block2=nn.Sequential(*[Grow(32 + 8 * i, 8) for i in range(4)]),
            head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, num_classes)),
        ))


    class Tokens(nn.Module):
        '''7 tokens of C channels: no square grid, so `auto` pooling (2x2 for few channels) cannot pool them.'''

        def forward(self, x):
            return x.flatten(2)[:, :, :7].transpose(1, 2)


    def wide_middle(num_classes=10):
        '''The cut nearest 4/9 of the MACs ('wide') has 2048 channels; 'split' outputs a 5-d tensor.'''
        return nn.Sequential(OrderedDict(
            c1=nn.Conv2d(3, 32, 3, padding=1),
            c2=nn.Conv2d(32, 32, 3, padding=1),
            split=nn.Unflatten(1, (2, 16)),
            merge=nn.Flatten(1, 2),
            wide=nn.Conv2d(32, 2048, 1),
            narrow=nn.Conv2d(2048, 32, 1),
            c3=nn.Conv2d(32, 32, 3, padding=1),
            c4=nn.Conv2d(32, 32, 3, padding=1),
            c5=nn.Conv2d(32, 32, 3, padding=1),
            tokens=Tokens(),
            flat=nn.Flatten(),
            fc=nn.Linear(7 * 32, num_classes),
        ))
    """
)
MODELS: dict = {}
exec(compile(MODELS_SOURCE, "<test models>", "exec"), MODELS)  # the same code the CLI tests import


@pytest.fixture(scope="module")
def heavy():
    return build_backbone("user_models:heavy_first", factory=MODELS["heavy_first"], input_size=32)


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """MODELS_SOURCE as an importable module; returns its (test-unique) name."""
    name = f"dgate_default_models_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(MODELS_SOURCE)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name
    sys.modules.pop(name, None)


def invoke(*args: object):
    return CliRunner().invoke(app, [str(a) for a in args], env={"COLUMNS": "400", "DGATE_DEBUG": None})


# -- the rule, on a model whose cost sits in one top-level module --------------------------------------


def test_heavy_first_module_holds_most_of_the_cost(heavy):
    costs = {c.name: c for c in heavy.cut_costs().cuts}
    assert heavy.family is GENERIC
    assert [c.name for c in heavy.candidate_cuts()] == ["stem", "block1", "trans", "block2"]
    assert 0.68 < costs["block1"].fraction - costs["stem"].fraction < 0.75
    assert len([n for n in costs if n.startswith("block1.")]) == 11  # a cut after every layer but the last
    assert costs["block2"].fraction > END_FRACTION  # the old count-based defaults ended here


def test_defaults_spread_by_cost_inside_the_heavy_module(heavy):
    positions = heavy.default_positions()
    names = [g.name for g in positions]
    assert names == [
        "block1.3",
        "block1.5",
        "block1.7",
        "block1.8",
        "block1.9",
        "block1.10",
        "trans.0",
        "block2.1",
    ]
    assert heavy.default_gates() == names
    assert [g.targets for g in positions] == [(k,) for k in range(1, 9)]
    eligible = [c for c in heavy.cut_costs().cuts if not excluded_because(c)]
    for g in positions:
        (k,) = g.targets
        # the nearest eligible cut to k/9, and near it within what the model's cut points allow
        assert g.fraction == min((c.fraction for c in eligible), key=lambda f: abs(f - k / 9))
        assert abs(g.fraction - k / 9) < 0.05, (g.name, g.fraction)
        assert g.fraction <= END_FRACTION
    fractions = [g.fraction for g in positions]
    assert fractions == sorted(fractions) and fractions[0] > 0.1 and fractions[-1] < 0.9
    assert sum(n.startswith("block1.") for n in names) == 6  # the heavy module gets 6 of the 8 gates
    assert positions[1].reason == "nearest cut to 2/9 of the MACs (22.6%)"
    assert heavy.default_reasons()["block2.1"] == "nearest cut to 8/9 of the MACs (89.6%)"


def test_default_gates_split_the_model_exactly(heavy):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    cuts = heavy.resolve_gates(None)
    assert [c.name for c in cuts] == heavy.default_gates()
    with torch.no_grad():
        assert torch.equal(run_stages(heavy.graph.split(cuts), x)[-1], heavy.module(x))


def test_costs_are_counted_once_per_input_size(heavy):
    first = heavy.cut_costs()
    assert heavy.cut_costs() is first and first.input_size == 32
    bb = build_backbone("user_models:heavy_first", factory=MODELS["heavy_first"], input_size=64)
    at64 = bb.cut_costs()
    assert at64.input_size == 64 and at64.total_macs == pytest.approx(4 * first.total_macs, rel=0.01)
    assert bb.default_gates() == heavy.default_gates()  # a CNN's cost shares do not depend on the size


# -- what makes a cut ineligible -------------------------------------------------------------------------


def test_wide_unpoolable_and_late_cuts_are_not_defaults():
    bb = build_backbone("user_models:wide_middle", factory=MODELS["wide_middle"], input_size=16)
    costs = {c.name: c for c in bb.cut_costs().cuts}
    assert costs["wide"].features == 2048 and 0.40 < costs["wide"].fraction < 0.50  # nearest 4/9 of all cuts
    assert "2048 features exceed the 1024-feature budget" in excluded_because(costs["wide"])
    assert costs["split"].features is None and excluded_because(costs["split"]) == "its 5-d output cannot be pooled"
    assert costs["tokens"].shape == (7, 32) and costs["tokens"].features is None
    assert costs["flat"].features == 224 and costs["flat"].fraction > END_FRACTION  # 2-d output: C features
    assert "a gate saves at most" in excluded_because(costs["flat"])
    positions = bb.default_positions()
    assert [g.name for g in positions] == ["merge", "narrow", "c3"]  # merge: as late as c2 at no cost
    assert [g.targets for g in positions] == [(1, 2, 3, 4), (5, 6, 7), (8,)]
    assert "not the nearer wide: its 2048 features exceed the 1024-feature budget" in positions[0].reason
    assert positions[0].reason.startswith("nearest cut to 1/9-4/9 of the MACs (6.0%); ")
    # a wider budget lets the wide cut in
    assert "wide" in [g.name for g in spread_by_cost(list(costs.values()), budget=4096)]


def _cut(name: str, order: int, fraction: float, features: int = 64) -> CutCost:
    return CutCost(name, order, (features, 4, 4), 0, round(fraction * 1000), fraction, features)


def test_end_rule_and_near_duplicates():
    cuts = [
        _cut("a", 0, 0.30),
        _cut("a_bn", 1, 0.31),  # within 1/36 of 'a': one gate, the one nearer its target stays
        _cut("b", 2, 0.70),
        _cut("late", 3, 0.95),  # past 17/18: never a default, though nearest to 8/9
        _cut("end", 4, 1.0),
    ]
    gates = spread_by_cost(cuts)
    assert [g.name for g in gates] == ["a_bn", "b"]
    assert gates[0].targets == (3, 4)
    assert (
        gates[0].reason
        == "nearest cut to 3/9 and 4/9 of the MACs (31.0%); 1/9 and 2/9's nearest cut, a (30.0%), is within 1/36 of it"
    )
    assert gates[1].targets == (5, 6, 7, 8)
    assert spread_by_cost([_cut("late", 0, 0.96), _cut("end", 1, 1.0)]) == []
    assert spread_by_cost([_cut("input", 0, 0.0), _cut("x", 1, 0.5)])[0].name == "x"  # no MACs before 'input'


def test_no_eligible_cut_asks_for_gates():
    bb = build_backbone(
        "user_models:flat",
        factory=lambda: torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 2)),
        input_size=2,
    )
    assert bb.default_gates() == []
    with pytest.raises(SpecError, match="no default gates; pass --gates"):
        bb.resolve_gates(None)


def test_a_model_that_cannot_run_at_the_assumed_size_says_what_to_pass():
    def fixed():  # a Linear layer sized for 8x8 inputs
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(256, 2))

    bb = build_backbone("user_models:fixed", factory=fixed)
    assert bb.input_size == 224
    with pytest.raises(SpecError, match=r"cannot run on a 3x224x224 input .*\(--input-size or --data\)") as ei:
        bb.default_gates()
    assert "\n" not in str(ei.value)
    at8 = build_backbone("user_models:fixed", factory=fixed, input_size=8)
    assert [(g.name, g.targets) for g in at8.default_positions()] == [("1", tuple(range(1, 9)))]


# -- declared families keep their defaults --------------------------------------------------------------


def test_declared_family_keeps_its_defaults():
    bb = build_backbone("cifar_resnet20")
    assert bb.default_gates() == R20_GATES
    assert bb.default_reasons() == dict.fromkeys(R20_GATES, "family default (cifar_resnet)")
    assert "_cut_costs" not in bb.__dict__  # declared defaults cost no counting pass


# -- dgate stages ---------------------------------------------------------------------------------------


def test_list_stages_rows_and_input_size_source(heavy):
    r = list_stages("user_models:heavy_first", factory=MODELS["heavy_first"], input_size=32)
    assert (r.family, r.input_size, r.input_size_source) == ("generic", 32, "--input-size")
    assert r.input_note == "32x32 input (from --input-size)"
    by_name = {row.name: row for row in r.rows}
    # the candidates (top-level modules) and the default positions, in execution order
    assert [row.name for row in r.rows] == [
        "stem", "block1.3", "block1.5", "block1.7", "block1.8", "block1.9", "block1.10", "block1",
        "trans.0", "trans", "block2.1", "block2",
    ]  # fmt: skip
    assert [row.name for row in r.rows if row.default] == heavy.default_gates()
    assert by_name["block1.5"].why == "nearest cut to 2/9 of the MACs (22.6%)"
    assert by_name["block1"].why == "" and not by_name["block1"].default
    # the table's fractions are the ones the defaults were chosen by
    assert by_name["block1.5"].fraction == heavy.default_positions()[1].fraction
    assert sum(row.macs for row in r.rows) == by_name["block2"].cumulative_macs < r.total_macs
    assert list_stages("user_models:heavy_first", factory=MODELS["heavy_first"]).input_size_source == "assumed"
    assert list_stages("cifar_resnet20").input_note == "32x32 input (model default)"


def test_list_stages_input_size_from_data(tmp_path):
    folder = write_image_folder(tmp_path / "imgs", ["a", "b"], 1, size=24)
    r = list_stages("user_models:heavy_first", factory=MODELS["heavy_first"], data=folder)
    assert (r.input_size, r.input_size_source) == (24, "--data")
    assert r.rows[0].shape == [8, 24, 24]
    wins = list_stages("user_models:heavy_first", factory=MODELS["heavy_first"], data=folder, input_size=16)
    assert (wins.input_size, wins.input_size_source) == (16, "--input-size")
    assert wins.rows[0].shape == [8, 16, 16]


def test_list_stages_rejects_data_of_no_square_size(tmp_path):
    from PIL import Image

    (tmp_path / "imgs" / "a").mkdir(parents=True)
    Image.new("RGB", (30, 20)).save(tmp_path / "imgs" / "a" / "0.png")
    with pytest.raises(DataError, match=r"30x20 after preprocessing, not square; pass --input-size"):
        list_stages("user_models:heavy_first", factory=MODELS["heavy_first"], data=tmp_path / "imgs")


def test_stages_cli_shows_the_input_size_source_and_why(user_module, tmp_path):
    spec = f"{user_module}:heavy_first"
    assumed = invoke("stages", spec)
    assert assumed.exit_code == 0, (assumed.stderr, assumed.exception)
    assert "224x224 input (assumed: pass --input-size or --data)" in " ".join(assumed.stdout.split())
    folder = write_image_folder(tmp_path / "imgs", ["a", "b"], 1, size=32)
    result = invoke("stages", spec, "--data", folder)
    assert result.exit_code == 0, (result.stderr, result.exception)
    assert f"{spec} (generic), 32x32 input (from --data)" in " ".join(result.stdout.split())  # the title wraps
    lines = result.stdout.splitlines()
    assert any(
        line.split() == ["block1.5", "nearest", "cut", "to", "2/9", "of", "the", "MACs", "(22.6%)"] for line in lines
    )
    row = next(line for line in lines if " block1.5 " in line and "│" in line)
    assert "*" in row and "32x32" in row and "22.6%" in row
    family = invoke("stages", "cifar_resnet20")
    assert "32x32 input (model default)" in " ".join(family.stdout.split())
    assert "default gate positions, why: family default (cifar_resnet)" in family.stdout


def test_stages_cli_json_has_the_source_and_why(user_module, tmp_path):
    folder = write_image_folder(tmp_path / "imgs", ["a", "b"], 1, size=32)
    result = invoke("stages", f"{user_module}:heavy_first", "--data", folder, "--json")
    assert result.exit_code == 0, (result.stderr, result.exception)
    report = json.loads(result.stdout)
    assert (report["input_size"], report["input_size_source"]) == (32, "--data")
    why = {r["name"]: r["why"] for r in report["rows"] if r["default"]}
    assert list(why) == ["block1.3", "block1.5", "block1.7", "block1.8", "block1.9", "block1.10", "trans.0", "block2.1"]
    assert why["block1.3"] == "nearest cut to 1/9 of the MACs (12.3%)"
    assert all(r["why"] == "" for r in report["rows"] if not r["default"])
    sized = json.loads(invoke("stages", f"{user_module}:heavy_first", "--input-size", "16", "--json").stdout)
    assert (sized["input_size"], sized["input_size_source"]) == (16, "--input-size")
