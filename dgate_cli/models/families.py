"""Model families: where gates may go and where they go by default.

A family is declared data: the module types it covers, the candidate gate positions (module names,
in execution order) and the default gates. Any module name that is a stage boundary works with
``--gates``; the candidates are the positions ``dgate stages`` lists (whole blocks, not every ReLU).
Models of no known family fall back to the generic rule: their top-level modules are the candidates,
and the default gates are chosen among *all* cut points by cost (:mod:`.cost_defaults`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torchvision.models as tvm
from torch import nn

from .cifar_resnet import CifarResNet

__all__ = [
    "FAMILIES",
    "GENERIC",
    "Family",
    "family_of",
    "register",
]


@dataclass(frozen=True)
class Family:
    """What dgate knows about a family of models.

    Attributes:
        name: short family name, e.g. ``"resnet"``.
        types: the ``nn.Module`` classes of the family.
        candidates: model -> candidate gate positions (module names) in execution order.
        defaults: model -> default gate positions.
        channels_last: 4-d stage outputs are ``(N, H, W, C)`` (Swin) rather than ``(N, C, H, W)``.
    """

    name: str
    types: tuple[type, ...]
    candidates: Callable[[nn.Module], list[str]]
    defaults: Callable[[nn.Module], list[str]]
    channels_last: bool = False


def _children(module: nn.Module, prefix: str) -> list[str]:
    return [f"{prefix}.{n}" for n, _ in module.named_children()]


def _resnet_blocks(model: nn.Module, stages: list[str]) -> list[str]:
    return [name for s in stages for name in _children(getattr(model, s), s)]


def _cifar_resnet_candidates(m: nn.Module) -> list[str]:
    return _resnet_blocks(m, ["layer1", "layer2", "layer3"])[:-1]


def _thirds(m: nn.Module, stages: list[str]) -> list[str]:
    """The blocks ending each third of every stage; in the last stage the block before its end.

    CIFAR ResNet-56 (9 blocks a stage): layer1.2, layer1.5, layer1.8, ..., layer3.5, layer3.7. Gates
    inside stages, not only between them, let samples leave as soon as they are easy enough
    (measured in benchmarks/RESULTS.md).
    """
    names: list[str] = []
    for s_i, s in enumerate(stages):
        n = len(getattr(m, s))
        last = n - 2 if s_i == len(stages) - 1 else n - 1
        for idx in sorted({min(last, max(0, round(n * k / 3) - 1)) for k in (1, 2, 3)}):
            names.append(f"{s}.{idx}")
    return names


def _resnet_candidates(m: nn.Module) -> list[str]:
    return _resnet_blocks(m, ["layer1", "layer2", "layer3", "layer4"])[:-1]


def _densenet_candidates(m: nn.Module) -> list[str]:
    names = [f"features.{n}" for n, _ in m.features.named_children() if n.startswith(("denseblock", "transition"))]
    return names[:-1]


def _densenet_defaults(m: nn.Module) -> list[str]:
    return [n for n in _densenet_candidates(m) if ".denseblock" in n][:3]


def _before_downsampling(m: nn.Module) -> list[str]:
    """MobileNet-style: stage ends are the blocks before each block marked ``_is_cn`` (stride 2)."""
    feats = list(m.features.children())
    ends = [i - 1 for i, b in enumerate(feats) if getattr(b, "_is_cn", False) and i >= 2]
    return [f"features.{i}" for i in ends[-3:]]


def _mobilenet_candidates(m: nn.Module) -> list[str]:
    return [f"features.{i}" for i in range(1, len(m.features) - 1)]


def _efficientnet_defaults(m: nn.Module) -> list[str]:
    return ["features.2", "features.3", "features.5"]


def _efficientnet_candidates(m: nn.Module) -> list[str]:
    return [name for i in range(1, len(m.features) - 1) for name in _children(m.features[i], f"features.{i}")]


def _pairs_defaults(m: nn.Module) -> list[str]:
    return ["features.1", "features.3", "features.5"]


def _features_candidates(m: nn.Module) -> list[str]:
    return [f"features.{i}" for i in range(len(m.features) - 1)]


def _regnet_candidates(m: nn.Module) -> list[str]:
    blocks = list(m.trunk_output.named_children())
    return [f"trunk_output.{s}.{b}" for s, stage in blocks for b, _ in stage.named_children()][:-1]


def _regnet_defaults(m: nn.Module) -> list[str]:
    return [f"trunk_output.{s}" for s, _ in m.trunk_output.named_children()][:3]


def _vgg_candidates(m: nn.Module) -> list[str]:
    return [f"features.{i}" for i, layer in enumerate(m.features) if isinstance(layer, nn.MaxPool2d)][:-1]


def _vgg_defaults(m: nn.Module) -> list[str]:
    return _vgg_candidates(m)[1:4]


def _vit_candidates(m: nn.Module) -> list[str]:
    return [f"encoder.layers.{n}" for n, _ in m.encoder.layers.named_children()][:-1]


def _vit_defaults(m: nn.Module) -> list[str]:
    layers = [f"encoder.layers.{n}" for n, _ in m.encoder.layers.named_children()]
    q = len(layers) // 4
    return [layers[q - 1], layers[2 * q - 1], layers[3 * q - 1]] if q else layers[:1]


FAMILIES: list[Family] = []


def register(family: Family) -> Family:
    """Add a family to the registry (later registrations take precedence for overlapping types)."""
    if any(f.name == family.name for f in FAMILIES):
        raise ValueError(f"family {family.name!r} is already registered")
    if not family.types:
        raise ValueError(f"family {family.name!r} declares no module types")
    FAMILIES.insert(0, family)
    return family


def _fixed(names: list[str]) -> Callable[[nn.Module], list[str]]:
    return lambda m: list(names)


register(
    Family(
        "cifar_resnet", (CifarResNet,), _cifar_resnet_candidates, lambda m: _thirds(m, ["layer1", "layer2", "layer3"])
    )
)
register(Family("resnet", (tvm.ResNet,), _resnet_candidates, _fixed(["layer1", "layer2", "layer3"])))
register(Family("densenet", (tvm.DenseNet,), _densenet_candidates, _densenet_defaults))
register(Family("mobilenet", (tvm.MobileNetV2, tvm.MobileNetV3), _mobilenet_candidates, _before_downsampling))
register(Family("efficientnet", (tvm.EfficientNet,), _efficientnet_candidates, _efficientnet_defaults))
register(Family("regnet", (tvm.RegNet,), _regnet_candidates, _regnet_defaults))
register(Family("convnext", (tvm.ConvNeXt,), _features_candidates, _pairs_defaults))
register(Family("swin", (tvm.SwinTransformer,), _features_candidates, _pairs_defaults, channels_last=True))
register(Family("vgg", (tvm.VGG,), _vgg_candidates, _vgg_defaults))
register(Family("vit", (tvm.VisionTransformer,), _vit_candidates, _vit_defaults))


def _demo_candidates(m: nn.Module) -> list[str]:
    return [name for s in ("stage1", "stage2", "stage3") for name in _children(getattr(m, s), s)][:-1]


def _register_demo() -> None:
    from .demo_cnn import DemoCNN

    register(Family("demo_cnn", (DemoCNN,), _demo_candidates, _demo_candidates))


_register_demo()

GENERIC = Family("generic", (nn.Module,), lambda m: [n for n, _ in m.named_children()][:-1], lambda m: [])


def family_of(model: nn.Module) -> Family:
    """Return the registered family of ``model`` (its exact or a parent class), else the generic one."""
    for family in FAMILIES:
        if isinstance(model, family.types):
            return family
    return GENERIC
