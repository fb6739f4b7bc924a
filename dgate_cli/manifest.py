"""The gated-model manifest (``dgate.json``): schema version, permitted and required keys, validation.

Readers reject an unknown major ``schema_version`` and a missing required key; they ignore keys
they do not know (a newer minor writer may add some). Writers write only permitted keys (tested).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import ManifestError

SCHEMA_VERSION = 1
MANIFEST = "dgate.json"
WEIGHTS = "model.safetensors"

REQUIRED = {
    "schema_version": int,
    "dgate_version": str,
    "model": dict,
    "weights": dict,
    "gates": list,
    "pooling": dict,
    "score": str,
    "classes": list,
    "preprocess": dict,
    "input_size": int,
    "thresholds": list,
    "costs": dict,
}
OPTIONAL = {
    "source_weights": (dict, type(None)),
    "loss": str,
    "target": str,
    "channels_last_family": bool,
    "calibration": dict,
    "frontier": list,
}
PERMITTED = set(REQUIRED) | set(OPTIONAL)
GATE_KEYS = {"name", "layout", "pooling", "features", "cost"}


def validate(data: Any, source: str = MANIFEST) -> dict[str, Any]:
    """Check a parsed manifest; return it, or raise :class:`ManifestError` naming the problem."""
    if not isinstance(data, dict):
        raise ManifestError(f"{source} is not a JSON object; re-export the model with `dgate export`")
    version = data.get("schema_version")
    if not isinstance(version, int):
        raise ManifestError(f"{source} has no integer schema_version; re-export the model with `dgate export`")
    if version != SCHEMA_VERSION:
        raise ManifestError(
            f"{source} has schema_version {version}, this dgate reads {SCHEMA_VERSION}; upgrade dgate or re-export the model"
        )
    for key, kind in REQUIRED.items():
        if key not in data:
            raise ManifestError(f"{source} lacks the required key '{key}'; re-export the model with `dgate export`")
        if not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
            raise ManifestError(
                f"{source}: '{key}' must be {kind.__name__}, got {type(data[key]).__name__}; re-export the model"
            )
    for i, gate in enumerate(data["gates"]):
        if not isinstance(gate, dict) or not set(gate) >= GATE_KEYS:
            raise ManifestError(f"{source}: gate {i} needs keys {sorted(GATE_KEYS)}; re-export the model")
    if len(data["thresholds"]) != len(data["gates"]):
        raise ManifestError(
            f"{source} has {len(data['thresholds'])} thresholds for {len(data['gates'])} gates; re-export the model"
        )
    for key in ("file", "sha256"):
        if not isinstance(data["weights"].get(key), str):
            raise ManifestError(f"{source}: weights.{key} is missing; re-export the model")
    G = len(data["gates"])
    _check(source, "model.spec", data["model"].get("spec"), str)
    _check(source, "model.kwargs", data["model"].get("kwargs"), dict)
    for i, gate in enumerate(data["gates"]):
        _check(source, f"gates[{i}].pooling", gate["pooling"], dict)
        _check_list(source, f"gates[{i}].pooling.sizes", gate["pooling"].get("sizes"), int, None)
        _check_list(source, f"gates[{i}].pooling.ops", gate["pooling"].get("ops"), str, None)
    _check(source, "costs.unit", data["costs"].get("unit"), str)
    _check_list(source, "costs.reach", data["costs"].get("reach"), (int, float), G + 1)
    _check_list(source, "costs.gates", data["costs"].get("gates"), (int, float), G)
    _check_list(source, "classes", data["classes"], str, None)
    for i, t in enumerate(data["thresholds"]):
        if not (isinstance(t, (int, float)) and not isinstance(t, bool)) and t not in ("inf", "-inf"):
            raise ManifestError(
                f"{source}: thresholds[{i}] must be a number, 'inf' or '-inf', got {t!r}; re-export the model"
            )
    return data


def _check(source: str, name: str, value: Any, kind: type | tuple[type, ...]) -> None:
    if not isinstance(value, kind):
        raise ManifestError(
            f"{source}: '{name}' is missing or not {getattr(kind, '__name__', 'a number')}; re-export the model"
        )


def _check_list(source: str, name: str, value: Any, kind: type | tuple[type, ...], length: int | None) -> None:
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise ManifestError(f"{source}: '{name}' is missing or has entries of the wrong type; re-export the model")
    if length is not None and len(value) != length:
        raise ManifestError(f"{source}: '{name}' has {len(value)} entries, expected {length}; re-export the model")


def read(directory: str | Path) -> dict[str, Any]:
    """Read and validate ``DIR/dgate.json``."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{directory} has no {MANIFEST}; pass a directory written by `dgate export`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path} is corrupt ({exc}); re-export the model with `dgate export`") from exc
    return validate(data, str(path))
