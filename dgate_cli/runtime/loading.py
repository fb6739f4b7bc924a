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
from .plan import Policy, steps_from_manifest


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
    origin = str(directory / manifest.MANIFEST)
    names = [g["name"] for g in data["gates"]]
    plan = steps_from_manifest(data["steps"], origin)
    networks = data.get("members") or [{"model": data["model"], "input_size": data["input_size"], "gates": names}]
    stages: list[nn.Module] = []
    for k, net in enumerate(networks):
        prefix = f"members.{k}." if "members" in data else "backbone."
        state = {key[len(prefix) :]: v for key, v in tensors.items() if key.startswith(prefix)}
        built = _network(net, state, str(wpath), origin, fuse, trust_code, factory)
        if "members" in data:  # a cascade member normalises the cascade's [0, 1] input its own way
            pre = Preprocess.from_dict(net["preprocess"])
            built[0] = nn.Sequential(Normalize(pre.mean, pre.std), built[0])
        stages += built
    if len(stages) != len(plan):
        raise ManifestError(f"{directory}: the steps do not match the networks' stages; re-export the model")
    dev = resolve_device(device)
    try:
        weights = [tensors[f"gates.{i}.weight"] for i in range(len(names))]
        biases = [tensors[f"gates.{i}.bias"] for i in range(len(names))]
        policies = [
            None if p is None else Policy(tensors[f"policies.{i}.weight"], p["bias"])
            for i, p in enumerate(data.get("policies") or [None] * len(names))
        ]
    except KeyError as exc:
        raise ManifestError(f"{wpath} lacks {exc.args[0]}; re-export the model") from None
    model = GatedModel(
        stages,
        weights,
        biases,
        [g["layout"] for g in data["gates"]],
        [Pooling.from_dict(g["pooling"]) for g in data["gates"]],
        data["thresholds"],
        score=[g.get("score", data["score"]) for g in data["gates"]],
        gate_names=names,
        reach_costs=data["costs"]["reach"],
        gate_costs=data["costs"]["gates"],
        frontier=[OperatingPoint.from_dict(p) for p in data.get("frontier", [])],
        channels_last=channels_last,
        manifest=data,
        plan=plan,
        preprocess=Preprocess.from_dict(data["preprocess"]),
        policies=policies,
        reference_cost=data["costs"].get("reference"),
    )
    model.to(dev)
    if channels_last:
        model.stages.to(memory_format=torch.channels_last)
    model.backends = default_backends(dev) if backends is None else list(backends)
    return model


def _network(
    net: dict[str, Any],
    state: dict[str, torch.Tensor],
    wpath: str,
    origin: str,
    fuse: bool,
    trust_code: bool,
    factory: Any,
) -> list[nn.Module]:
    """One network's stages, split at its gates, with its weights loaded (and BatchNorm folded)."""
    backbone = build_backbone(
        net["model"]["spec"],
        model_kwargs=net["model"]["kwargs"],
        input_size=net["input_size"],
        trust_code=trust_code,
        factory=factory,
        origin=origin,
    )
    load_into(backbone.module, state, str(backbone.spec), wpath)
    names = list(net["gates"])
    cuts = backbone.graph.resolve(names) if names else []
    if [c.name for c in cuts] != names:
        raise ManifestError(
            f"{origin}: gates {names} do not resolve in execution order in {backbone.spec}; re-export the model"
        )
    stages = backbone.graph.split(cuts)
    if fuse:
        with torch.no_grad():
            stages = [fuse_batchnorm(s) for s in stages]
    return list(stages)


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, on inputs already scaled to [0, 1]: the arithmetic of
    :meth:`~dgate_cli.data.preprocess.Preprocess.normalize` after its ``/ 255``."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


def fuse_batchnorm(stage: nn.Module) -> nn.Module:
    """A copy of ``stage`` with each BatchNorm folded into the convolution before it (eval only).

    Fewer passes over memory; the outputs match the unfused stage to float rounding (about 1e-6).
    """
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(stage.eval())
    except Exception:  # a stage torch.fx cannot re-trace stays as it is
        return stage
