"""Model specs: the strings that name a backbone, parsed to :class:`ModelSpec`.

- ``cifar_resnet20|32|44|56|110``: CIFAR ResNets with option-A shortcuts;
- ``torchvision:NAME`` or just ``NAME``: any torchvision classification model (``resnet50``, ``vit_b_16``);
- ``package.module:factory``: a user's function returning an ``nn.Module`` (keyword arguments from
  ``model_kwargs``);
- ``demo_cnn``: the small CNN of ``dgate demo``."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

import torchvision.models as tvm

from ..errors import SpecError
from .cifar_resnet import DEPTHS

_CIFAR_RE = re.compile(r"^cifar_resnet(\d+)$")


def list_builtin_models() -> list[str]:
    """Names accepted without a ``torchvision:`` or factory prefix."""
    return [f"cifar_resnet{d}" for d in DEPTHS] + ["demo_cnn"] + sorted(tvm.list_models(module=tvm))


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model spec.

    Attributes:
        source: ``cifar_resnet``, ``torchvision``, ``demo`` or ``factory``.
        name: the model name within the source (``56``, ``resnet50``, ``pkg.mod:fn``).
        kwargs: keyword arguments for the constructor.
    """

    source: str
    name: str
    kwargs: dict[str, Any] = field(default_factory=dict)

    def __str__(self) -> str:
        if self.source == "cifar_resnet":
            return f"cifar_resnet{self.name}"
        if self.source == "torchvision":
            return f"torchvision:{self.name}"
        if self.source == "demo":
            return "demo_cnn"
        return self.name

    def to_dict(self) -> dict[str, Any]:
        return {"spec": str(self), "kwargs": dict(self.kwargs)}


def parse_model_spec(spec: str, kwargs: dict[str, Any] | str | None = None) -> ModelSpec:
    """Parse a model spec string (and JSON or dict keyword arguments).

    Example:
        >>> parse_model_spec("cifar_resnet56")
        ModelSpec(source='cifar_resnet', name='56', kwargs={})
        >>> str(parse_model_spec("resnet50", '{"num_classes": 10}'))
        'torchvision:resnet50'
    """
    if isinstance(kwargs, str):
        try:
            kwargs = json.loads(kwargs) if kwargs.strip() else {}
        except json.JSONDecodeError as exc:
            raise SpecError(
                f"--model-kwargs is not valid JSON ({exc.msg}); write it like '{{\"num_classes\": 10}}'"
            ) from exc
    if kwargs is None:
        kwargs = {}
    if not isinstance(kwargs, dict):
        raise SpecError("--model-kwargs must be a JSON object, like '{\"num_classes\": 10}'")
    kwargs = dict(kwargs)
    spec = spec.strip()
    hint = "run `dgate models` to list built-in names, or pass package.module:factory"
    if m := _CIFAR_RE.match(spec):
        if int(m.group(1)) not in DEPTHS:
            raise SpecError(f"unknown model '{spec}': CIFAR ResNet depths are {', '.join(map(str, DEPTHS))}; {hint}")
        return ModelSpec("cifar_resnet", m.group(1), kwargs)
    if spec == "demo_cnn":
        return ModelSpec("demo", "demo_cnn", kwargs)
    name = spec.removeprefix("torchvision:")
    if name != spec or ":" not in spec:
        if name not in tvm.list_models(module=tvm):
            raise SpecError(f"unknown model '{spec}'; {hint}")
        return ModelSpec("torchvision", name, kwargs)
    module, _, attr = spec.partition(":")
    if not module or not attr or not all(p.isidentifier() for p in [*module.split("."), attr]):
        raise SpecError(f"model spec '{spec}' is not of the form package.module:factory; {hint}")
    return ModelSpec("factory", spec, kwargs)


@dataclass(frozen=True)
class WeightsRef:
    """Where a backbone's weights came from: the source as given and the sha256 of the file read."""

    source: str
    sha256: str

    def to_dict(self) -> dict[str, str]:
        return {"source": self.source, "sha256": self.sha256}
