"""``dgate export``: a gated model as ``model.safetensors`` + ``dgate.json`` (read back by :func:`dgate_cli.load`).

``model.safetensors`` holds the backbone's state dict under ``backbone.`` and each gate as
``gates.<i>.weight`` (K, D) and ``gates.<i>.bias`` (K,), on raw pooled features. ``dgate.json``
holds everything needed to rebuild the model and to explain it (see :mod:`dgate_cli.runtime.manifest`)."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import _io, cache
from .._version import __version__
from ..errors import CacheMismatchError, MissingFileError, NotFittedError, SpecError
from ..models.backbone import read_weights
from ..models.specs import parse_model_spec
from ..runtime import manifest
from ..runtime.plan import linear_plan
from .calibrate import read_calibration
from .cascade import is_cascade
from .fit import FittedGates, read_gates


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
    if is_cascade(run_dir):
        from .cascade_export import export_cascade  # it builds on this module's writer

        return export_cascade(run_dir, out_dir, overwrite=overwrite)
    config = cache.read_run(run_dir)
    with cache.locked(run_dir, "export"):
        fitted = read_gates(run_dir)
        calib = read_calibration(run_dir)
        return _export(run_dir, out_dir, config, fitted, calib, overwrite)


def check_out_dir(out_dir: Path, overwrite: bool) -> None:
    """An ``--out`` directory that is new, empty, or an export to be replaced with ``overwrite``."""
    if out_dir.exists() and not out_dir.is_dir():
        raise SpecError(f"--out {out_dir} is a file; choose a new or empty directory")
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / manifest.MANIFEST).is_file():
        raise MissingFileError(f"{out_dir} exists and is not a dgate export; choose a new or empty --out directory")
    if (out_dir / manifest.MANIFEST).is_file() and not overwrite:
        raise CacheMismatchError(f"{out_dir} already holds an exported model; pass --overwrite to replace it")


def source_state(run_dir: Path, config: cache.RunConfig) -> dict[str, torch.Tensor]:
    """The backbone weights ``run_dir`` was extracted with, read from the checkpoint (checked
    against the sha256 recorded then)."""
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
    return state


def _export(
    run_dir: Path, out_dir: Path, config: cache.RunConfig, fitted: FittedGates, calib: dict[str, Any], overwrite: bool
) -> ExportResult:
    check_out_dir(out_dir, overwrite)
    state = source_state(run_dir, config)
    names = calib["gates"]
    data = manifest_data(
        model=config.model,
        gates=[gate_entry(config, n, calib["costs"]["gates"][k]) for k, n in enumerate(names)],
        pooling=config.pooling,
        score=calib["score"],
        classes=config.classes,
        preprocess=config.preprocess,
        input_size=config.input_size,
        thresholds=calib["chosen"]["thresholds"],
        costs={
            "unit": calib["costs"]["unit"],
            "reach": calib["costs"]["reach"],
            "gates": calib["costs"]["gates"],
            "stages": config.costs["stages"],
        },
        source_weights=config.weights,
        loss=fitted.loss,
        target=fitted.target,
        calibration={
            k: calib[k]
            for k in ("split", "num_samples", "target", "target_accuracy", "backbone_accuracy", "chosen", "sequential")
        },
        frontier=calib["frontier"],
    )
    extra = {}
    if calib.get("policies"):  # learned exit policies (``dgate fit --policies``) chosen by calibration
        _check_policies(run_dir, calib)
        extra = {f"policies.{i}.weight": torch.tensor(p["weight"]) for i, p in enumerate(calib["policies"])}
        data["policies"] = [{"bias": p["bias"]} for p in calib["policies"]]
    return write_export(
        out_dir,
        state,
        [fitted.weights[n] for n in names],
        [fitted.biases[n] for n in names],
        data,
        extra,
    )


def _check_policies(run_dir: Path, calib: dict[str, Any]) -> None:
    from .policies import network_member, read_policies

    learned = read_policies(run_dir, [network_member(run_dir)])
    if learned is None or learned.sha256 != (calib.get("policy") or {}).get("policies_sha256"):
        raise CacheMismatchError(
            f"the policies in {run_dir} were refitted after calibration; run `dgate calibrate {run_dir}` again"
        )


def gate_entry(config: cache.RunConfig, gate: str, cost: float, **more: Any) -> dict[str, Any]:
    """The manifest entry of a run's ``gate`` (name, layout, pooling, features, cost; ``more``
    adds or replaces keys)."""
    i = config.gates.index(gate)
    return {
        "name": gate,
        "layout": config.layouts[i],
        "pooling": config.gate_pooling[i],
        "features": config.feature_sizes[i],
        "cost": cost,
        **more,
    }


def manifest_data(
    *,
    model: dict[str, Any],
    gates: list[dict[str, Any]],
    pooling: dict[str, Any],
    score: str,
    classes: list[str],
    preprocess: dict[str, Any],
    input_size: int,
    thresholds: list[float | str],
    costs: dict[str, Any],
    **optional: Any,
) -> dict[str, Any]:
    """The manifest of a single gated network (without the weights' sha256, which
    :func:`write_export` adds): its plan is each gate in order, then the head. ``optional``:
    the manifest's optional fields (``source_weights``, ``calibration``, ``frontier``, ...)."""
    return {
        "schema_version": manifest.SCHEMA_VERSION,
        "dgate_version": __version__,
        "model": model,
        "gates": gates,
        "pooling": pooling,
        "score": score,
        "classes": classes,
        "preprocess": preprocess,
        "input_size": input_size,
        "thresholds": thresholds,
        "steps": [s.to_dict() for s in linear_plan([g["name"] for g in gates])],
        "costs": costs,
        **optional,
    }


def write_export(
    out_dir: str | Path,
    backbone_state: dict[str, torch.Tensor],
    gate_weights: list[torch.Tensor],
    gate_biases: list[torch.Tensor],
    data: dict[str, Any],
    extra: dict[str, torch.Tensor] | None = None,
) -> ExportResult:
    """Write ``model.safetensors`` and ``dgate.json`` (``data``: the manifest without the weights' sha256).

    ``backbone_state`` is stored under ``backbone.``, ``extra`` tensors under their own names (a
    cascade's members and policies). Written into a temporary directory beside ``out_dir`` and
    renamed (or its files moved into an existing ``out_dir``), so a failure leaves nothing half-written.
    """
    out_dir = Path(out_dir)
    tensors = {f"backbone.{k}": v for k, v in backbone_state.items()}
    tensors.update(extra or {})
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
