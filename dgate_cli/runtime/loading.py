""":func:`load`: an exported directory (``model.safetensors`` + ``dgate.json``) -> a :class:`GatedModel`.

``model.safetensors`` holds the backbone's state dict under ``backbone.`` and each gate as
``gates.<i>.weight`` (K, D) and ``gates.<i>.bias`` (K,), on raw pooled features. ``dgate.json``
holds everything needed to rebuild the model and to explain it (see :mod:`.manifest`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from .. import _io
from ..data.preprocess import Preprocess
from ..errors import ManifestError
from ..gates.pooling import Pooling
from ..models.backbone import build_backbone
from ..models.weights import load_into
from ..thresholds.outcomes import OperatingPoint
from . import manifest
from .backends import default_backends
from .decisions import Backend
from .model import GatedModel
from .plan import steps_from_manifest


def load(
    directory: str | Path,
    device: str | torch.device = "cpu",
    verify: bool = True,
    channels_last: bool = True,
    fuse: bool = True,
    *,
    trust_code: bool = False,
    factory: Any = None,
    backends: list[Backend] | None = None,
) -> GatedModel:
    """Load an exported gated model.

    Opening a directory is as safe as opening a safetensors file: the manifest is data, checked
    field by field, and no code it names is imported or run unless you say so.

    Args:
        directory: a directory written by ``dgate export``.
        device: where to put the model.
        verify: check ``model.safetensors`` and ``dgate.json`` against the sha256s the export
            recorded (default). They catch corruption and edits, not a forger, who can rewrite them.
        channels_last: run convolutions in channels-last memory format.
        fuse: fold BatchNorm into the convolutions before it (the same results to float rounding).
        backends: faster decision backends to use where they apply (default: those built into
            this install, see :func:`.backends.default_backends`); ``[]`` runs the reference only.
        trust_code: for a backbone built by your own ``package.module:factory``: import and call
            the factory the manifest names. Off by default: a manifest must not run code.
        factory: or pass that factory yourself (the callable, or the Python module holding it).

    Example:
        >>> model = load("models/r56-gated")  # doctest: +SKIP
        >>> out = model(images)  # doctest: +SKIP
        >>> out.pred, out.exit  # doctest: +SKIP
    """
    from .._device import resolve_device

    directory = Path(directory)
    data = manifest.read(directory, verify=verify)
    wpath = directory / data["weights"]["file"]
    if not wpath.is_file():
        raise ManifestError(f"{wpath} is missing; re-export the model with `dgate export`")
    if verify and _io.sha256_file(wpath) != data["weights"]["sha256"]:
        raise ManifestError(
            f"{wpath} does not match the sha256 in {manifest.MANIFEST} (modified or corrupted); re-export the model"
        )
    try:
        tensors = load_file(str(wpath))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ManifestError(f"{wpath} is not a readable safetensors file ({exc}); re-export the model") from exc
    backbone = build_backbone(
        data["model"]["spec"],
        model_kwargs=data["model"]["kwargs"],
        input_size=data["input_size"],
        trust_code=trust_code,
        factory=factory,
        origin=str(directory / manifest.MANIFEST),
    )
    state = {k[len("backbone.") :]: v for k, v in tensors.items() if k.startswith("backbone.")}
    load_into(backbone.module, state, str(backbone.spec), str(wpath))
    names = [g["name"] for g in data["gates"]]
    plan = steps_from_manifest(data["steps"], str(directory / manifest.MANIFEST))
    cuts = backbone.graph.resolve(names) if names else []
    if [c.name for c in cuts] != names:
        raise ManifestError(
            f"{directory}: gates {names} do not resolve in execution order in {backbone.spec}; re-export the model"
        )
    stages = backbone.graph.split(cuts)
    dev = resolve_device(device)
    if fuse:
        with torch.no_grad():
            stages = [fuse_batchnorm(s) for s in stages]
    try:
        weights = [tensors[f"gates.{i}.weight"] for i in range(len(names))]
        biases = [tensors[f"gates.{i}.bias"] for i in range(len(names))]
    except KeyError as exc:
        raise ManifestError(f"{wpath} lacks {exc.args[0]}; re-export the model") from None
    model = GatedModel(
        stages,
        weights,
        biases,
        [g["layout"] for g in data["gates"]],
        [Pooling.from_dict(g["pooling"]) for g in data["gates"]],
        data["thresholds"],
        score=data["score"],
        gate_names=names,
        reach_costs=data["costs"]["reach"],
        gate_costs=data["costs"]["gates"],
        frontier=[OperatingPoint.from_dict(p) for p in data.get("frontier", [])],
        channels_last=channels_last,
        manifest=data,
        plan=plan,
        preprocess=Preprocess.from_dict(data["preprocess"]),
    )
    model.to(dev)
    if channels_last:
        model.stages.to(memory_format=torch.channels_last)
    model.backends = default_backends(dev) if backends is None else list(backends)
    return model


def fuse_batchnorm(stage: nn.Module) -> nn.Module:
    """A copy of ``stage`` with each BatchNorm folded into the convolution before it (eval only).

    Fewer passes over memory; the outputs match the unfused stage to float rounding (about 1e-6).
    """
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(stage.eval())
    except Exception:  # a stage torch.fx cannot re-trace stays as it is
        return stage
