"""``dgate export`` and :func:`load`: a gated model as ``model.safetensors`` + ``dgate.json``.

``model.safetensors`` holds the backbone's state dict under ``backbone.`` and each gate as
``gates.<i>.weight`` (K, D) and ``gates.<i>.bias`` (K,), on raw pooled features. ``dgate.json``
holds everything needed to rebuild the model and to explain it (see :mod:`dgate_cli.manifest`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from . import _io, cache, manifest
from ._version import __version__
from .calibrate import read_calibration
from .cpu_fusion import fuse_pointwise
from .errors import CacheMismatchError, ManifestError, MissingFileError, NotFittedError, SpecError
from .features import Pooling
from .fit import FittedGates, read_gates
from .models import build_backbone, parse_model_spec, read_weights
from .models.weights import load_into
from .runtime import GatedModel, fuse_batchnorm
from .thresholds import OperatingPoint


@dataclass(frozen=True)
class ExportResult:
    out_dir: Path
    manifest: dict[str, Any]
    weights_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return {"out_dir": str(self.out_dir), "weights_bytes": self.weights_bytes, "manifest": self.manifest}


def export(run_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> ExportResult:
    """Write the calibrated gated model of ``run_dir`` to ``out_dir``.

    The backbone's weights are read from the checkpoint the run was extracted with (checked
    against its sha256); no model code is imported or run.

    Example:
        >>> export("runs/r56", "models/r56-gated")  # doctest: +SKIP
        >>> model = load("models/r56-gated")  # doctest: +SKIP
    """
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    config = cache.read_run(run_dir)
    with cache.locked(run_dir, "export"):
        fitted = read_gates(run_dir)
        calib = read_calibration(run_dir)
        return _export(run_dir, out_dir, config, fitted, calib, overwrite)


def _export(
    run_dir: Path, out_dir: Path, config: cache.RunConfig, fitted: FittedGates, calib: dict[str, Any], overwrite: bool
) -> ExportResult:
    if out_dir.exists() and not out_dir.is_dir():
        raise SpecError(f"--out {out_dir} is a file; choose a new or empty directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / manifest.MANIFEST).is_file():
        raise MissingFileError(f"{out_dir} exists and is not a dgate export; choose a new or empty --out directory")
    if (out_dir / manifest.MANIFEST).is_file() and not overwrite:
        raise CacheMismatchError(f"{out_dir} already holds an exported model; pass --overwrite to replace it")
    source = (config.weights or {}).get("source")
    if source is None:
        raise NotFittedError(
            f"{run_dir} was extracted with a randomly initialised backbone, whose weights were not saved; "
            "extract it again with --weights FILE"
        )
    state, path, _ = read_weights(parse_model_spec(config.model["spec"], config.model["kwargs"]), source)
    if _io.sha256_file(path) != config.weights["sha256"]:  # type: ignore[index]
        raise CacheMismatchError(
            f"{source} changed since `dgate extract` (sha256 differs); run extract, fit and calibrate again on the current weights"
        )
    names = calib["gates"]
    idx = [config.gates.index(n) for n in names]
    data: dict[str, Any] = {
        "schema_version": manifest.SCHEMA_VERSION,
        "dgate_version": __version__,
        "model": config.model,
        "weights": {"file": manifest.WEIGHTS, "sha256": ""},
        "source_weights": config.weights,
        "gates": [
            {
                "name": n,
                "layout": config.layouts[i],
                "pooling": config.gate_pooling[i],
                "features": config.feature_sizes[i],
                "cost": calib["costs"]["gates"][k],
            }
            for k, (n, i) in enumerate(zip(names, idx, strict=True))
        ],
        "pooling": config.pooling,
        "score": calib["score"],
        "loss": fitted.loss,
        "target": fitted.target,
        "classes": config.classes,
        "preprocess": config.preprocess,
        "input_size": config.input_size,
        "thresholds": calib["chosen"]["thresholds"],
        "costs": {
            "unit": calib["costs"]["unit"],
            "reach": calib["costs"]["reach"],
            "gates": calib["costs"]["gates"],
            "stages": config.costs["stages"],
        },
        "calibration": {
            k: calib[k]
            for k in ("split", "num_samples", "target", "target_accuracy", "backbone_accuracy", "chosen", "sequential")
        },
        "frontier": calib["frontier"],
    }
    return write_export(
        out_dir,
        state,
        [fitted.weights[n] for n in names],
        [fitted.biases[n] for n in names],
        data,
    )


def write_export(
    out_dir: str | Path,
    backbone_state: dict[str, torch.Tensor],
    gate_weights: list[torch.Tensor],
    gate_biases: list[torch.Tensor],
    data: dict[str, Any],
) -> ExportResult:
    """Write ``model.safetensors`` and ``dgate.json`` (``data``: the manifest without the weights' sha256).

    Written into a temporary directory beside ``out_dir`` and renamed (or its files moved into an
    existing ``out_dir``), so a failure leaves nothing half-written.
    """
    out_dir = Path(out_dir)
    tensors = {f"backbone.{k}": v for k, v in backbone_state.items()}
    for i, (w, b) in enumerate(zip(gate_weights, gate_biases, strict=True)):
        tensors[f"gates.{i}.weight"] = w
        tensors[f"gates.{i}.bias"] = b
    data = {**data, "weights": {"file": manifest.WEIGHTS, "sha256": ""}}
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=_io.INCOMPLETE_SUFFIX, dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o777 & ~_io.umask())  # mkdtemp makes it 0700; a directory gets the umask's mode, as mkdir
        _io.save_tensors(
            tmp / manifest.WEIGHTS,
            tensors,
            metadata={"format": "dgate", "schema_version": str(manifest.SCHEMA_VERSION)},
        )
        data["weights"]["sha256"] = _io.sha256_file(tmp / manifest.WEIGHTS)
        data = manifest.seal(data)
        manifest.validate(data)
        _io.write_json(tmp / manifest.MANIFEST, data)
        if out_dir.exists():
            for name in (manifest.WEIGHTS, manifest.MANIFEST):
                os.replace(tmp / name, out_dir / name)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ExportResult(out_dir, data, (out_dir / manifest.WEIGHTS).stat().st_size)


def load(
    directory: str | Path,
    device: str | torch.device = "cpu",
    verify: bool = True,
    channels_last: bool = True,
    fuse: bool = True,
    *,
    trust_code: bool = False,
    factory: Any = None,
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
        fuse: fold BatchNorm into the convolutions before it (faster inference, same results to
            float rounding); on a CPU also run each convolution and the ReLU and residual add
            after it as one oneDNN call on batches (:mod:`.cpu_fusion`; the same results).
        trust_code: for a backbone built by your own ``package.module:factory``: import and call
            the factory the manifest names. Off by default: a manifest must not run code.
        factory: or pass that factory yourself (the callable, or the Python module holding it).

    Example:
        >>> model = load("models/r56-gated")  # doctest: +SKIP
        >>> out = model(images)  # doctest: +SKIP
        >>> out.pred, out.exit  # doctest: +SKIP
    """
    from ._device import resolve_device

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
    cuts = backbone.graph.resolve(names)
    if [c.name for c in cuts] != names:
        raise ManifestError(
            f"{directory}: gates {names} do not resolve in execution order in {backbone.spec}; re-export the model"
        )
    stages = backbone.graph.split(cuts)
    dev = resolve_device(device)
    if fuse:
        with torch.no_grad():
            stages = [fuse_batchnorm(s) for s in stages]
        if dev.type == "cpu":
            stages = [fuse_pointwise(s) for s in stages]
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
    )
    model.to(dev)
    if channels_last:
        model.stages.to(memory_format=torch.channels_last)
    return model
