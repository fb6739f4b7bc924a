"""Building a frozen backbone from a model spec (:mod:`.specs`): the module, its weights, its
preprocessing and its stage graph, with the default gate positions.

Weights come from a ``.safetensors`` or ``torch.save`` file (read with ``weights_only=True``), or a
torchvision weights name such as ``torchvision:DEFAULT`` or ``torchvision:IMAGENET1K_V2``."""

from __future__ import annotations

import importlib
import json
import os
import types
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
import torchvision.models as tvm
from torch import nn

from .._io import sha256_file
from ..data.preprocess import Preprocess, from_torchvision_weights
from ..errors import SpecError, UntrustedCodeError, WeightsError
from ..gates.pooling import DEFAULT_BUDGET
from .cifar_resnet import cifar_resnet
from .cost_defaults import END_FRACTION, CostProfile, DefaultGate, profile_cuts, spread_by_cost
from .families import Family, family_of
from .specs import ModelSpec, WeightsRef, parse_model_spec
from .staging import Cut, StageGraph, eval_mode
from .weights import load_into, read_state_dict

CIFAR_PREPROCESS = Preprocess()  # 32x32 as is, ImageNet mean/std (the checkpoints' training recipe)


def _instantiate(spec: ModelSpec, trust_code: bool, factory: Any = None, origin: str | None = None) -> nn.Module:
    """Build the module a spec names.

    A ``package.module:factory`` spec imports and calls user code, so it runs only when the caller
    trusts it (``trust_code``) or hands over the factory itself (``factory``: the callable, or the
    Python module that holds it). ``origin`` names the file the spec came from, for the error.
    """
    try:
        if spec.source == "cifar_resnet":
            return cifar_resnet(int(spec.name), **spec.kwargs)
        if spec.source == "torchvision":
            return tvm.get_model(spec.name, weights=None, **spec.kwargs)
        if spec.source == "demo":
            from .demo_cnn import demo_cnn

            return demo_cnn(**spec.kwargs)
    except TypeError as exc:
        raise SpecError(
            f"cannot build {spec} with --model-kwargs {json.dumps(spec.kwargs)} ({exc}); check the argument names"
        ) from exc
    module_name, _, attr = spec.name.partition(":")
    if factory is not None:
        fn = getattr(factory, attr, None) if isinstance(factory, types.ModuleType) else factory
    elif not trust_code:
        where = f"{origin} names" if origin else "the spec names"
        raise UntrustedCodeError(
            f"{where} the model factory '{spec.name}', which dgate imports and runs only when asked: "
            "pass --trust-code (trust_code=True in Python) if you trust it, or pass the factory itself"
        )
    else:
        try:
            fn = getattr(importlib.import_module(module_name), attr, None)
        except ImportError as exc:
            raise SpecError(
                f"cannot import '{module_name}' for model '{spec.name}' ({exc}); install it or add its folder to PYTHONPATH"
            ) from exc
    if not callable(fn):
        raise SpecError(f"'{module_name}' has no callable '{attr}' for model '{spec.name}'; check the factory name")
    try:
        model = fn(**spec.kwargs)
    except TypeError as exc:
        raise SpecError(
            f"cannot call {spec.name} with --model-kwargs {json.dumps(spec.kwargs)} ({exc}); check the argument names"
        ) from exc
    if not isinstance(model, nn.Module):
        raise SpecError(
            f"{spec.name} returned {type(model).__name__}, not a torch.nn.Module; return the model from the factory"
        )
    return model


def _torchvision_weights(spec: ModelSpec, tag: str) -> Any:
    if spec.source != "torchvision":
        raise SpecError(f"--weights torchvision:{tag} is only for torchvision models, not {spec}; pass a weights file")
    enum = tvm.get_model_weights(spec.name)
    try:
        return enum[tag]
    except KeyError:
        names = ", ".join(f"torchvision:{k}" for k in enum.__members__)
        raise SpecError(f"{spec.name} has no torchvision weights '{tag}'; choose one of {names}") from None


def _load_torchvision_weights(weights: Any) -> tuple[dict[str, torch.Tensor], str]:
    hub = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(weights.url)
    if not hub.is_file():
        try:
            weights.get_state_dict(progress=False, check_hash=True)
        except Exception as exc:  # urllib, hash and IO errors all mean the same here
            raise WeightsError(
                f"cannot download {weights} ({type(exc).__name__}); on a machine with network access fetch "
                f"{weights.url} and pass it with --weights FILE (or place it at {hub})"
            ) from exc
    return read_state_dict(hub), str(hub)


class Backbone:
    """A frozen, pretrained model, its spec, family, preprocessing and stage graph.

    Build one with :func:`build_backbone`.
    """

    def __init__(
        self, module: nn.Module, spec: ModelSpec, preprocess: Preprocess, weights: WeightsRef | None, input_size: int
    ):
        self.module = module
        self.spec = spec
        self.preprocess = preprocess
        self.weights = weights
        self.input_size = input_size
        self.family: Family = family_of(module)

    @cached_property
    def graph(self) -> StageGraph:
        """The traced stage graph (built on first use)."""
        return StageGraph(self.module, str(self.spec))

    def candidate_cuts(self) -> list[Cut]:
        """The family's candidate gate positions, resolved to cuts, in execution order."""
        seen: dict[str, Cut] = {}
        for name in self.family.candidates(self.module):
            if name in self.graph:
                cut = self.graph.find(name)
                seen.setdefault(cut.name, cut)
        return sorted(seen.values(), key=lambda c: c.order)

    def cut_costs(self) -> CostProfile:
        """The cost up to every cut point, and each one's gate features, at ``input_size`` (counted once per size).

        Raises:
            SpecError: the model cannot run on a ``input_size`` x ``input_size`` input.
        """
        cache: dict[int, CostProfile] = self.__dict__.setdefault("_cut_costs", {})
        if self.input_size not in cache:
            x = torch.zeros(1, 3, self.input_size, self.input_size, device=_device_of(self.module))
            with eval_mode(self.module):
                cache[self.input_size] = profile_cuts(self.graph, x, self.family.channels_last)
        return cache[self.input_size]

    def default_positions(self) -> list[DefaultGate]:
        """The default gate positions, each with why it was chosen, in execution order.

        A family's declared defaults are kept ("family default (NAME)"). A model without declared
        defaults gets gates spread over it by cost: for each ``k/9`` of its MACs the nearest cut point
        that pools to at most 1024 features, none past 17/18 (94.4%) of the MACs
        (:func:`dgate_cli.models.cost_defaults.spread_by_cost`), counted at ``input_size``.

        Example:
            >>> bb = build_backbone("cifar_resnet20")
            >>> bb.default_positions()[0]
            DefaultGate(name='layer1.0', reason='family default (cifar_resnet)', targets=(), fraction=None)
        """
        names = self.family.defaults(self.module)
        if names:
            reason = f"family default ({self.family.name})"
            return [DefaultGate(c.name, reason) for c in self.graph.resolve(names)]
        return spread_by_cost(self.cut_costs().cuts)

    def default_gates(self) -> list[str]:
        """The default gate positions: the family's, else spread by cost (see :meth:`default_positions`)."""
        return [g.name for g in self.default_positions()]

    def default_reasons(self) -> dict[str, str]:
        """Default gate position -> why it was chosen, e.g. ``{"block1.layer.1": "nearest cut to 2/9 of the MACs (19.5%)"}``."""
        return {g.name: g.reason for g in self.default_positions()}

    def resolve_gates(self, gates: list[str] | None) -> list[Cut]:
        """Resolve gate names to cuts in execution order (None: the defaults; ``["all"]``: every candidate)."""
        if gates == ["all"]:
            return self.candidate_cuts() or self.graph.cuts
        if gates:
            return self.graph.resolve(gates)
        defaults = self.default_gates()
        if not defaults:
            raise SpecError(
                f"{self.spec} has no cut point before {END_FRACTION:.1%} of its MACs whose output pools to at most "
                f"{DEFAULT_BUDGET} features, so no default gates; pass --gates (`dgate stages {self.spec} --all` lists the positions)"
            )
        return self.graph.resolve(defaults)

    @cached_property
    def num_classes(self) -> int:
        """Number of outputs of the model (one dummy forward pass)."""
        with torch.inference_mode(), eval_mode(self.module):
            out = self.module(torch.zeros(1, 3, self.input_size, self.input_size, device=_device_of(self.module)))
        return int(out.shape[-1])


def _device_of(module: nn.Module) -> torch.device:
    p = next(module.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def read_weights(spec: ModelSpec, weights: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], str, Any]:
    """Read a checkpoint for ``spec`` without building the model: (state dict, file read, torchvision weights or None)."""
    w = str(weights)
    if w.startswith("torchvision:"):
        tv_weights = _torchvision_weights(spec, w.split(":", 1)[1])
        sd, path = _load_torchvision_weights(tv_weights)
        return sd, path, tv_weights
    return read_state_dict(w), w, None


def build_backbone(
    spec: str | ModelSpec,
    weights: str | os.PathLike[str] | None = None,
    model_kwargs: dict[str, Any] | str | None = None,
    input_size: int | None = None,
    *,
    trust_code: bool = True,
    factory: Any = None,
    origin: str | None = None,
) -> Backbone:
    """Build a backbone from a spec and load its weights (None: random init).

    Args:
        spec: a model spec string or :class:`ModelSpec`.
        weights: a ``.safetensors`` / ``torch.save`` file, or ``torchvision:TAG``.
        model_kwargs: constructor keyword arguments (dict or JSON string).
        input_size: the square input size, where the model's default preprocessing gives none.
        trust_code: import and call a ``package.module:factory`` spec. True for a spec the caller
            wrote; callers that read the spec from a file (a manifest, a run directory) pass False
            unless their user said otherwise.
        factory: the factory itself (a callable, or the Python module holding it) for a factory
            spec: used instead of importing anything.
        origin: the file the spec was read from, for the error when it is not trusted.

    Example:
        >>> bb = build_backbone("cifar_resnet20")
        >>> bb.default_gates()[:3]
        ['layer1.0', 'layer1.1', 'layer1']
    """
    ms = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec, model_kwargs)
    module = _instantiate(ms, trust_code, factory, origin)
    ref: WeightsRef | None = None
    tv_weights = None
    if weights is not None:
        sd, path, tv_weights = read_weights(ms, weights)
        load_into(module, sd, str(ms), path)
        ref = WeightsRef(source=str(weights), sha256=sha256_file(path))
    module.eval()
    if ms.source == "torchvision":
        preprocess = from_torchvision_weights(tv_weights or tvm.get_model_weights(ms.name).DEFAULT)
    elif ms.source in ("cifar_resnet", "demo"):
        preprocess = CIFAR_PREPROCESS
    else:
        preprocess = Preprocess()
    size = input_size or preprocess.input_size(fallback=32 if ms.source in ("cifar_resnet", "demo") else 224)
    return Backbone(module, ms, preprocess, ref, size)
