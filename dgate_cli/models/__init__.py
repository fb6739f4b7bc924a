"""Model specs -> frozen backbones that know their stages."""

from __future__ import annotations

from .backbone import (
    CIFAR_PREPROCESS,
    Backbone,
    build_backbone,
    read_weights,
)
from .cifar_resnet import DEPTHS, cifar_resnet
from .specs import (
    ModelSpec,
    WeightsRef,
    list_builtin_models,
    parse_model_spec,
)

__all__ = [
    "DEPTHS",
    "cifar_resnet",
    "Backbone",
    "CIFAR_PREPROCESS",
    "ModelSpec",
    "WeightsRef",
    "build_backbone",
    "list_builtin_models",
    "parse_model_spec",
    "read_weights",
]
