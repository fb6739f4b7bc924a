"""Stage splitting: every registered family (and the generic fallback) splits into stages that
chain, bit for bit, to ``model(x)``; StageGraph errors name the problem; the model is left as found."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision
from conftest import CIFAR, R20, needs_shared, test_threads
from torch import nn

from dgate_cli.errors import SpecError
from dgate_cli.gates.pooling import Pooling, layout_of, pool
from dgate_cli.models.backbone import build_backbone
from dgate_cli.models.families import FAMILIES, GENERIC, family_of
from dgate_cli.models.staging import StageGraph, run_stages

# One representative per registered family: (spec, model_kwargs, input size in px).
# The cheapest variant, random init; the smallest input each model supports comfortably.
FAMILY_REPS: dict[str, tuple[str, dict, int]] = {
    "cifar_resnet": ("cifar_resnet20", {}, 32),
    "resnet": ("resnet18", {}, 64),
    "densenet": ("densenet121", {}, 64),
    "mobilenet": ("mobilenet_v3_small", {}, 64),
    "efficientnet": ("efficientnet_b0", {}, 64),
    "regnet": ("regnet_y_400mf", {}, 64),
    "convnext": ("convnext_tiny", {}, 64),
    "swin": ("swin_t", {}, 64),
    "vgg": ("vgg11", {"num_classes": 10}, 64),
    "vit": ("vit_b_16", {"image_size": 32, "num_classes": 10}, 32),
    "demo_cnn": ("demo_cnn", {}, 32),
}
# Families with more than one module type get an extra representative for the other types.
EXTRA_REPS: dict[str, tuple[str, dict, int]] = {"mobilenet_v2": ("mobilenet", {}, 64)}

FAMILY_NAMES = [f.name for f in FAMILIES]


def _build(spec: str, kwargs: dict, seed: int = 0):
    torch.manual_seed(seed)
    return build_backbone(spec, model_kwargs=kwargs)


def _chain(stages, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return run_stages(stages, x)[-1]


def _reference(backbone, x: torch.Tensor) -> torch.Tensor:
    assert not backbone.module.training, "build_backbone must return the model in eval mode"
    with torch.no_grad():
        return backbone.module(x)


def test_every_registered_family_has_a_representative():
    missing = [name for name in FAMILY_NAMES if name not in FAMILY_REPS]
    assert not missing, f"families without a representative model in FAMILY_REPS: {missing}"
    stale = [name for name in FAMILY_REPS if name not in FAMILY_NAMES]
    assert not stale, f"FAMILY_REPS names families that are not registered: {stale}"


def test_every_registered_module_type_is_exercised():
    """A family covering several classes (MobileNetV2 and V3) gets a model of each class."""
    from dgate_cli.models.backbone import _instantiate
    from dgate_cli.models.specs import parse_model_spec

    for family in FAMILIES:
        if len(family.types) < 2:
            continue  # its one type is checked by test_family_is_detected
        specs = [FAMILY_REPS[family.name][:2]] + [(s, kw) for s, (f, kw, _) in EXTRA_REPS.items() if f == family.name]
        built = {type(_instantiate(parse_model_spec(s, kw), trust_code=False)) for s, kw in specs}
        for t in family.types:
            assert any(issubclass(b, t) for b in built), f"no test model of type {t.__name__} ({family.name})"


@pytest.fixture(scope="module", params=FAMILY_NAMES + list(EXTRA_REPS))
def rep(request):
    """(family name, backbone, input, model(input)) for one family's representative; built once per module."""
    key = request.param
    if key in FAMILY_NAMES:
        if key not in FAMILY_REPS:
            pytest.fail(f"registered family '{key}' has no representative model in FAMILY_REPS")
        spec, kwargs, px = FAMILY_REPS[key]
        family = key
    else:
        spec = key
        family, kwargs, px = EXTRA_REPS[key]
    bb = _build(spec, kwargs)
    torch.manual_seed(1)
    x = torch.randn(2, 3, px, px)
    torch.set_num_threads(test_threads(request.module))  # the tests' kernels: compared bit for bit
    ref = _reference(bb, x)
    assert ref.dim() == 2 and ref.shape[0] == 2
    return family, bb, x, ref


def test_family_is_detected(rep):
    family, bb, _, _ = rep
    assert bb.family.name == family
    assert family_of(bb.module) is bb.family
    assert bb.family is not GENERIC


def test_default_gates_are_valid_candidates(rep):
    _family, bb, _, _ = rep
    gates = bb.default_gates()
    assert len(gates) >= 1
    assert len(set(gates)) == len(gates)
    cand_names = {c.name for c in bb.candidate_cuts()}
    for g in gates:
        assert g in bb.graph, f"default gate {g} is not a stage boundary"
        # `dgate stages` marks defaults among the candidates it lists: a default must be one of them
        assert g in cand_names, f"default gate {g} is not among the candidates {sorted(cand_names)}"
    # defaults come back canonical and in execution order
    cuts = bb.graph.resolve(gates)
    assert [c.name for c in cuts] == gates
    assert [c.order for c in cuts] == sorted(c.order for c in cuts)
    assert [c.name for c in bb.resolve_gates(None)] == gates


def test_family_candidates_are_all_stage_boundaries(rep):
    """candidate_cuts() silently drops names that are not cuts: make sure none are dropped."""
    _family, bb, _, _ = rep
    names = bb.family.candidates(bb.module)
    assert names, "a family must list candidate positions"
    not_cuts = [n for n in names if n not in bb.graph]
    assert not not_cuts, f"candidates that are not stage boundaries: {not_cuts}"
    cuts = bb.candidate_cuts()
    assert len(cuts) == len({bb.graph.find(n).name for n in names})
    assert [c.order for c in cuts] == sorted(c.order for c in cuts)
    assert [c.name for c in bb.resolve_gates(["all"])] == [c.name for c in cuts]


def test_split_at_default_gates_is_exact(rep):
    _family, bb, x, ref = rep
    cuts = bb.graph.resolve(bb.default_gates())
    stages = bb.graph.split(cuts)
    assert len(stages) == len(cuts) + 1
    assert torch.equal(_chain(stages, x), ref)


def test_split_at_all_candidates_is_exact(rep):
    _family, bb, x, ref = rep
    cuts = bb.candidate_cuts()
    stages = bb.graph.split(cuts)
    assert len(stages) == len(cuts) + 1
    assert torch.equal(_chain(stages, x), ref)


def test_default_stage_outputs_can_be_pooled(rep):
    """Every default gate's output has a layout that pool() understands (Swin: NHWC, ViT: tokens)."""
    family, bb, x, _ = rep
    expected = {"swin": "nhwc", "vit": "nlc"}.get(family, "nchw")
    stages = bb.graph.split(bb.graph.resolve(bb.default_gates()))
    with torch.no_grad():
        h = x
        for stage in stages[:-1]:
            h = stage(h)
            layout = layout_of(h, bb.family.channels_last)
            assert layout == expected
            f = pool(h, Pooling(), layout)
            assert f.dim() == 2 and f.shape[0] == x.shape[0]
            channels = h.shape[-1] if layout in ("nhwc", "nlc", "nc") else h.shape[1]
            assert f.shape[1] == Pooling().feature_size(channels)


@pytest.mark.parametrize("spec", ["cifar_resnet20", "resnet18", "mobilenet_v3_small"])
def test_split_at_every_graph_cut_is_exact(spec):
    bb = _build(spec, {})
    torch.manual_seed(2)
    x = torch.randn(2, 3, 32 if spec.startswith("cifar") else 64, 32 if spec.startswith("cifar") else 64)
    cuts = bb.graph.cuts
    assert len(cuts) >= len(bb.candidate_cuts())
    stages = bb.graph.split(cuts)
    with torch.no_grad():
        outs = [x]
        for s in stages:
            outs.append(s(outs[-1].clone()))  # clone: a later in-place op must not change what we compare
    assert torch.equal(outs[-1], _reference(bb, x))


# -- torchvision models of no registered family: the generic fallback ------------------------------

GENERIC_MODELS = [
    ("googlenet", {"aux_logits": False, "init_weights": False}),
    ("shufflenet_v2_x0_5", {}),
    ("squeezenet1_0", {}),
    ("mnasnet0_5", {}),
]


@pytest.mark.parametrize(("spec", "kwargs"), GENERIC_MODELS, ids=[m[0] for m in GENERIC_MODELS])
def test_generic_fallback_models_split_exactly(spec, kwargs):
    bb = _build(spec, kwargs)
    assert bb.family is GENERIC
    gates = bb.default_gates()
    assert 1 <= len(gates) <= 8  # the cut points nearest each ninth of the MACs (test_defaults.py)
    assert all(g in bb.graph for g in gates)
    top_level = {n for n, _ in bb.module.named_children()}
    assert all(g.split(".")[0] in top_level for g in gates)
    torch.manual_seed(3)
    x = torch.randn(2, 3, 64, 64)
    ref = _reference(bb, x)
    assert torch.equal(_chain(bb.graph.split(bb.graph.resolve(gates)), x), ref)
    cands = bb.candidate_cuts()
    assert cands
    assert torch.equal(_chain(bb.graph.split(cands), x), ref)


# -- StageGraph queries and errors on resnet18 -------------------------------------------------------


@pytest.fixture(scope="module")
def r18() -> StageGraph:
    torch.manual_seed(0)
    return StageGraph(torchvision.models.resnet18().eval(), "resnet18")


def test_unknown_module_name(r18):
    with pytest.raises(SpecError) as ei:
        r18.resolve(["layer9"])
    msg = str(ei.value)
    assert "'layer9'" in msg and "dgate stages resnet18" in msg and "not a module" in msg
    assert "\n" not in msg


def test_unknown_name_suggests_similar_modules(r18):
    with pytest.raises(SpecError, match=r"similar: .*layer1"):
        r18.find("layer1.9")


def test_module_inside_residual_block_is_not_a_boundary(r18):
    with pytest.raises(SpecError) as ei:
        r18.resolve(["layer1.0.conv1"])
    msg = str(ei.value)
    assert "layer1.0.conv1" in msg and "not a stage boundary" in msg and "dgate stages" in msg
    assert "\n" not in msg
    assert "layer1.0.conv1" not in r18


def test_two_aliases_of_one_cut_are_rejected(r18):
    assert r18.find("layer1.1").name == "layer1"
    assert r18.find("layer1.1") == r18.find("layer1")
    with pytest.raises(SpecError) as ei:
        r18.resolve(["layer1", "layer1.1"])
    msg = str(ei.value)
    assert "'layer1'" in msg and "'layer1.1'" in msg and "same place" in msg
    with pytest.raises(SpecError, match="same place"):
        r18.resolve(["layer2", "layer2"])


def test_empty_gate_list(r18):
    with pytest.raises(SpecError, match="no gate positions"):
        r18.resolve([])


def test_resolve_returns_execution_order(r18):
    assert [c.name for c in r18.resolve(["layer3", "layer1"])] == ["layer1", "layer3"]
    assert [c.name for c in r18.resolve(["layer4", "layer2.1", "conv1"])] == ["conv1", "layer2", "layer4"]


def test_cut_names_and_aliases(r18):
    names = [c.name for c in r18.cuts]
    for expected in ["layer1", "layer2", "layer3", "layer4", "layer1.0", "avgpool"]:
        assert expected in names
    assert [c.order for c in r18.cuts] == list(range(len(r18.cuts)))
    for c in r18.cuts:
        assert c.aliases[0] == c.name
        assert list(c.aliases) == sorted(c.aliases, key=lambda p: (p.count("."), len(p), p))
        assert all(a in r18 for a in c.aliases)
    assert r18.find("layer2").aliases[:2] == ("layer2", "layer2.1")
    # the last module produces the logits: no cut there
    assert "fc" not in r18
    with pytest.raises(SpecError):
        r18.resolve(["fc"])


def test_stages_share_parameters_with_the_model(r18):
    stages = r18.split(r18.resolve(["layer2"]))
    model_params = {p.data_ptr() for p in r18.model.parameters()}
    stage_params = [p for s in stages for p in s.parameters()]
    assert stage_params and all(p.data_ptr() in model_params for p in stage_params)
    assert stages[0].get_submodule("conv1") is r18.model.conv1
    assert sum(p.numel() for s in stages for p in s.parameters()) == sum(p.numel() for p in r18.model.parameters())


def test_graph_leaves_training_mode_and_requires_grad_alone():
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    model.train()
    model.layer1.eval()  # a mixed state must survive too
    for p in model.layer2.parameters():
        p.requires_grad_(False)
    modes = {n: m.training for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    StageGraph(model, "resnet18")
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads
    assert model.training and not model.layer1.training and model.layer2.training


def test_graph_restores_mode_even_when_tracing_fails():
    class Untraceable(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x):
            if x.sum() > 0:  # data-dependent control flow
                return self.conv(x)
            return x

    m = Untraceable().train()
    with pytest.raises(SpecError) as ei:
        StageGraph(m, "untraceable")
    assert "cannot be traced" in str(ei.value) and "untraceable" in str(ei.value)
    assert "\n" not in str(ei.value)
    assert m.training and m.conv.training


def test_module_never_called():
    class Unused(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.spare = nn.Conv2d(4, 4, 3)
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            return self.head(self.a(x).mean((2, 3)))

    g = StageGraph(Unused(), "unused")
    with pytest.raises(SpecError, match="never calls"):
        g.resolve(["spare"])
    assert "a" in g


def test_two_inputs_are_rejected():
    class TwoInputs(nn.Module):
        def forward(self, x, y):
            return x + y

    with pytest.raises(SpecError, match="2 inputs"):
        StageGraph(TwoInputs(), "two")


def test_tuple_output_is_rejected_on_split():
    class Pair(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(4, 4, 3)

        def forward(self, x):
            y = self.b(self.a(x))
            return y, y.mean()

    g = StageGraph(Pair(), "pair")
    with pytest.raises(SpecError, match="returns tuple"):
        g.split(g.resolve(["a"]))


def test_input_independent_values_are_recomputed_in_each_stage():
    """A parameter-derived tensor used on both sides of a cut does not block the cut."""

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3, padding=1)
            self.b = nn.Conv2d(4, 4, 3, padding=1)
            self.log_scale = nn.Parameter(torch.tensor([0.3]))
            self.head = nn.Linear(4, 2)

        def forward(self, x):
            k = self.log_scale.exp()
            x = self.a(x) * k
            x = F.relu(self.b(x) * k)
            return self.head(x.mean((2, 3)))

    torch.manual_seed(0)
    m = Scaled().eval()
    g = StageGraph(m, "scaled")
    assert "a" in g and "b" in g  # k is alive across both, but it does not depend on x
    x = torch.randn(2, 3, 8, 8)
    stages = g.split(g.resolve(["a", "b"]))
    with torch.no_grad():
        assert torch.equal(_chain(stages, x), m(x))
        # stage 0 ends at conv a; stage 1 scales it, then runs b; stage 2 scales again
        assert torch.equal(stages[0](x), m.a(x))
        assert torch.equal(stages[1](stages[0](x)), m.b(m.a(x) * m.log_scale.exp()))
    assert sum(n.op == "get_attr" for s in stages[1:] for n in s.graph.nodes) == 2


def test_run_stages_returns_every_stage_output(r18):
    stages = r18.split(r18.resolve(["layer1", "layer3"]))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        outs = run_stages(stages, x)
        assert len(outs) == 3
        assert torch.equal(outs[0], stages[0](x))
        assert torch.equal(outs[1], stages[1](stages[0](x)))
        assert outs[0].shape == (2, 64, 16, 16) and outs[1].shape == (2, 256, 4, 4) and outs[2].shape == (2, 1000)


def test_run_stages_outputs_are_not_overwritten_by_in_place_ops(r18):
    stages = r18.split(r18.resolve(["bn1"]))
    torch.manual_seed(0)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fresh = stages[0](x)
        outs = run_stages(stages, x)
    assert fresh.min() < 0  # a BatchNorm output has negative values
    assert torch.equal(outs[0], fresh)


# -- real data ---------------------------------------------------------------------------------------


@needs_shared
@pytest.mark.shared_data
def test_cifar_resnet20_staged_equals_model_on_real_images():
    from dgate_cli.data.datasets import open_dataset
    from dgate_cli.data.loader import iterate, make_loader

    bb = build_backbone("cifar_resnet20", weights=str(R20))
    ds = open_dataset(str(CIFAR / "val"), bb.preprocess)
    images, labels = [], []
    for img, y, _ in iterate(make_loader(ds, 250, workers=0, stop=500)):
        images.append(img)
        labels.append(y)
    x = bb.preprocess.normalize(torch.cat(images))
    y = torch.cat(labels)
    assert x.shape == (500, 3, 32, 32)
    with torch.no_grad():
        logits = bb.module(x)
        staged = run_stages(bb.graph.split(bb.graph.resolve(bb.default_gates())), x)[-1]
        staged_all = run_stages(bb.graph.split(bb.candidate_cuts()), x)[-1]
    assert torch.equal(staged, logits)
    assert torch.equal(staged_all, logits)
    assert torch.equal(staged.argmax(1), logits.argmax(1))
    # the checkpoint really loaded: far above chance on these images
    assert (logits.argmax(1) == y).float().mean() > 0.6
