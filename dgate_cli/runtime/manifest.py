"""The gated-model manifest (``dgate.json``): schema version, permitted and required keys, validation.

Readers reject an unknown major ``schema_version``, a missing required key and any field of the
wrong type or range (NaN thresholds, a weights file outside the directory, negative costs); they
ignore keys they do not know (a newer minor writer may add some). Writers write only permitted
keys (tested).

Two hashes are recorded: ``weights.sha256`` of ``model.safetensors``, and ``content_sha256`` of the
manifest's own content (canonical JSON of every other key). Together they detect corruption and
edits made after export. They are not signatures: whoever can rewrite the directory can rewrite the
hashes. What makes opening a directory safe is that nothing in it is executed: the weights are
safetensors, the manifest is validated data, and a model factory it names is imported only when the
caller passes ``trust_code=True`` (``--trust-code``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from .._io import sha256_text
from ..data.preprocess import Preprocess
from ..errors import ManifestError, SpecError
from ..gates.pooling import LAYOUTS
from ..gates.scores import SCORES
from .plan import SOURCES

SCHEMA_VERSION = 2  # 2: the execution plan ("steps"); version 1 manifests are migrated on read
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
    "steps": list,
}
OPTIONAL = {
    "source_weights": (dict, type(None)),
    "loss": str,
    "target": str,
    "channels_last_family": bool,
    "calibration": dict,
    "frontier": list,
    "content_sha256": str,
    "members": list,
    "policies": list,
    "cascade": dict,
}
CONTENT_KEY = "content_sha256"
PERMITTED = set(REQUIRED) | set(OPTIONAL)
GATE_KEYS = {"name", "layout", "pooling", "features", "cost"}
MEMBER_KEYS = {"name", "model", "preprocess", "input_size", "gates"}


def validate(data: Any, source: str = MANIFEST) -> dict[str, Any]:
    """Check a parsed manifest field by field; return it, or raise :class:`ManifestError` naming the problem.

    Nothing in a manifest is trusted: numbers must be finite where they are costs, thresholds are
    numbers or ``"inf"`` / ``"-inf"`` (never NaN), names are unique strings, the weights file is a
    plain file name inside the model directory.
    """
    if not isinstance(data, dict):
        raise ManifestError(f"{source} is not a JSON object; re-export the model with `dgate export`")
    version = data.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool):
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
    for key, kind in OPTIONAL.items():
        if key in data and not isinstance(data[key], kind):
            raise ManifestError(
                f"{source}: '{key}' has the wrong type ({type(data[key]).__name__}); re-export the model"
            )
    G = len(data["gates"])
    weights = data["weights"]
    for key in ("file", "sha256"):
        if not isinstance(weights.get(key), str):
            raise ManifestError(f"{source}: weights.{key} is missing; re-export the model")
    name = weights["file"]
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ManifestError(
            f"{source}: weights.file {name!r} is not a file name inside the model directory; re-export the model"
        )
    _check(source, "model.spec", data["model"].get("spec"), str)
    _check(source, "model.kwargs", data["model"].get("kwargs"), dict)
    names: set[str] = set()
    for i, gate in enumerate(data["gates"]):
        if not isinstance(gate, dict) or not set(gate) >= GATE_KEYS:
            raise ManifestError(f"{source}: gate {i} needs keys {sorted(GATE_KEYS)}; re-export the model")
        _check(source, f"gates[{i}].name", gate["name"], str)
        if not gate["name"] or gate["name"] in names:
            raise ManifestError(f"{source}: gates[{i}].name {gate['name']!r} is empty or repeated; re-export the model")
        names.add(gate["name"])
        if gate["layout"] not in LAYOUTS:
            raise ManifestError(
                f"{source}: gates[{i}].layout must be one of {', '.join(LAYOUTS)}, got {gate['layout']!r}; re-export the model"
            )
        _check(source, f"gates[{i}].pooling", gate["pooling"], dict)
        _check_list(source, f"gates[{i}].pooling.sizes", gate["pooling"].get("sizes"), int, None, positive=True)
        _check_list(source, f"gates[{i}].pooling.ops", gate["pooling"].get("ops"), str, None)
        if (
            not gate["pooling"]["sizes"]
            or not set(gate["pooling"]["ops"]) <= {"avg", "max"}
            or not gate["pooling"]["ops"]
        ):
            raise ManifestError(f"{source}: gates[{i}].pooling is not a valid pooling; re-export the model")
        _number(source, f"gates[{i}].features", gate["features"], integer=True, positive=True)
        _number(source, f"gates[{i}].cost", gate["cost"])
        if "score" in gate and gate["score"] not in SCORES:
            raise ManifestError(
                f"{source}: gates[{i}].score must be one of {', '.join(SCORES)}, got {gate['score']!r}; re-export the model"
            )
    _check_members(source, data)
    _check_policies(source, data.get("policies"), G)
    _check_steps(source, data["steps"], G)
    if data["score"] not in SCORES:
        raise ManifestError(
            f"{source}: score must be one of {', '.join(SCORES)}, got {data['score']!r}; re-export the model"
        )
    _check(source, "costs.unit", data["costs"].get("unit"), str)
    _check_list(source, "costs.reach", data["costs"].get("reach"), (int, float), G + 1, finite=True)
    _check_list(source, "costs.gates", data["costs"].get("gates"), (int, float), G, finite=True)
    if "reference" in data["costs"]:
        _number(source, "costs.reference", data["costs"]["reference"], positive=True)
    reach = data["costs"]["reach"]
    if any(b < a for a, b in zip(reach, reach[1:], strict=False)) or reach[-1] <= 0:
        raise ManifestError(f"{source}: costs.reach must grow to a positive backbone cost; re-export the model")
    _check_list(source, "classes", data["classes"], str, None)
    if not data["classes"] or len(set(data["classes"])) != len(data["classes"]):
        raise ManifestError(f"{source}: classes must be a non-empty list of distinct names; re-export the model")
    _number(source, "input_size", data["input_size"], integer=True, positive=True)
    if len(data["thresholds"]) != G:
        raise ManifestError(f"{source} has {len(data['thresholds'])} thresholds for {G} gates; re-export the model")
    for i, t in enumerate(data["thresholds"]):
        _threshold(source, f"thresholds[{i}]", t)
    try:
        Preprocess.from_dict(data["preprocess"])
    except (SpecError, TypeError, ValueError) as exc:
        raise ManifestError(f"{source}: preprocess is invalid ({exc}); re-export the model") from None
    for i, point in enumerate(data.get("frontier", [])):
        where = f"frontier[{i}]"
        if not isinstance(point, dict) or not isinstance(point.get("thresholds"), list):
            raise ManifestError(f"{source}: {where} is not an operating point; re-export the model")
        if len(point["thresholds"]) != G:
            raise ManifestError(
                f"{source}: {where} has {len(point['thresholds'])} thresholds for {G} gates; re-export the model"
            )
        for j, t in enumerate(point["thresholds"]):
            _threshold(source, f"{where}.thresholds[{j}]", t)
        for key in ("accuracy", "mean_cost", "cost_ratio"):
            _number(source, f"{where}.{key}", point.get(key))
        _check_list(source, f"{where}.exit_fractions", point.get("exit_fractions"), (int, float), G + 1, finite=True)
        if point.get("target") is not None:
            _number(source, f"{where}.target", point["target"])
    return data


def _check_steps(source: str, steps: list[Any], G: int) -> None:
    """Every step names its kind and what it is; gates follow in order, the last step has none."""
    gates = []
    for i, step in enumerate(steps):
        if not isinstance(step, dict) or not isinstance(step.get("kind"), str) or not isinstance(step.get("name"), str):
            raise ManifestError(f"{source}: steps[{i}] needs a 'kind' and a 'name'; re-export the model")
        if step.get("source", "previous") not in SOURCES:
            raise ManifestError(f"{source}: steps[{i}].source must be {' or '.join(SOURCES)}; re-export the model")
        gates.append(step.get("gate"))
    if gates != [*range(G), None]:
        raise ManifestError(
            f"{source}: steps must run each of the {G} gates once, in order, then end without one; re-export the model"
        )


def _check_members(source: str, data: dict[str, Any]) -> None:
    """A cascade's members: each with a model, its own preprocessing and gates; as many networks
    as the plan starts from the input."""
    members = data.get("members")
    if members is None:
        return
    starts = sum(1 for i, s in enumerate(data["steps"]) if i == 0 or s.get("source") == "input")
    if len(members) < 2 or len(members) != starts:
        raise ManifestError(
            f"{source}: a cascade needs two or more members, one per network its steps start; re-export the model"
        )
    for k, m in enumerate(members):
        if not isinstance(m, dict) or not set(m) >= MEMBER_KEYS:
            raise ManifestError(f"{source}: members[{k}] needs keys {sorted(MEMBER_KEYS)}; re-export the model")
        _check(
            source, f"members[{k}].model.spec", m["model"].get("spec") if isinstance(m["model"], dict) else None, str
        )
        _check_list(source, f"members[{k}].gates", m["gates"], str, None)
        _number(source, f"members[{k}].input_size", m["input_size"], integer=True, positive=True)
        try:
            Preprocess.from_dict(m["preprocess"])
        except (SpecError, TypeError, ValueError, AttributeError) as exc:
            raise ManifestError(f"{source}: members[{k}].preprocess is invalid ({exc}); re-export the model") from None


def _check_policies(source: str, policies: Any, G: int) -> None:
    """Learned exit policies: one entry per gate, each None or with a finite bias."""
    if policies is None:
        return
    if len(policies) != G:
        raise ManifestError(f"{source} has {len(policies)} policies for {G} gates; re-export the model")
    for i, p in enumerate(policies):
        if p is None:
            continue
        bias = p.get("bias") if isinstance(p, dict) else None
        if not isinstance(bias, (int, float)) or isinstance(bias, bool) or not math.isfinite(bias):
            raise ManifestError(f"{source}: policies[{i}].bias must be a finite number; re-export the model")


def migrate(data: dict[str, Any]) -> dict[str, Any]:
    """A manifest of an older schema in today's form (1 -> 2: the plan of a single network)."""
    if data.get("schema_version") == 1 and isinstance(data.get("gates"), list):
        names = [g.get("name") if isinstance(g, dict) else None for g in data["gates"]]
        steps = [{"kind": "stage", "name": n, "source": "previous", "gate": i} for i, n in enumerate(names)]
        steps.append({"kind": "stage", "name": "head", "source": "previous", "gate": None})
        data = {**data, "schema_version": SCHEMA_VERSION, "steps": steps}
    return data


def _threshold(source: str, name: str, t: Any) -> None:
    ok = t in ("inf", "-inf") if isinstance(t, str) else isinstance(t, (int, float)) and not isinstance(t, bool)
    if not ok or (isinstance(t, float) and math.isnan(t)):
        raise ManifestError(f"{source}: {name} must be a number, 'inf' or '-inf', got {t!r}; re-export the model")


def _number(source: str, name: str, value: Any, integer: bool = False, positive: bool = False) -> None:
    kind = int if integer else (int, float)
    if not isinstance(value, kind) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise ManifestError(
            f"{source}: '{name}' must be a finite non-negative number, got {value!r}; re-export the model"
        )
    if positive and value <= 0:
        raise ManifestError(f"{source}: '{name}' must be positive, got {value!r}; re-export the model")


def _check(source: str, name: str, value: Any, kind: type | tuple[type, ...]) -> None:
    if not isinstance(value, kind):
        raise ManifestError(
            f"{source}: '{name}' is missing or not {getattr(kind, '__name__', 'a number')}; re-export the model"
        )


def _check_list(
    source: str,
    name: str,
    value: Any,
    kind: type | tuple[type, ...],
    length: int | None,
    finite: bool = False,
    positive: bool = False,
) -> None:
    if not isinstance(value, list) or not all(isinstance(v, kind) and not isinstance(v, bool) for v in value):
        raise ManifestError(f"{source}: '{name}' is missing or has entries of the wrong type; re-export the model")
    if length is not None and len(value) != length:
        raise ManifestError(f"{source}: '{name}' has {len(value)} entries, expected {length}; re-export the model")
    if finite and not all(math.isfinite(v) and v >= 0 for v in value):
        raise ManifestError(f"{source}: '{name}' must hold finite non-negative numbers; re-export the model")
    if positive and not all(v > 0 for v in value):
        raise ManifestError(f"{source}: '{name}' must hold positive numbers; re-export the model")


def content_sha256(data: dict[str, Any]) -> str:
    """sha256 of a manifest's content: canonical JSON of every key but ``content_sha256`` itself."""
    body = {k: v for k, v in data.items() if k != CONTENT_KEY}
    return sha256_text(json.dumps(body, sort_keys=True, separators=(",", ":"), allow_nan=False))


def seal(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` with its :func:`content_sha256` recorded, as the export writes it."""
    return {**data, CONTENT_KEY: content_sha256(data)}


def read(directory: str | Path, verify: bool = True) -> dict[str, Any]:
    """Read and validate ``DIR/dgate.json``; with ``verify``, check its content hash too."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        raise ManifestError(f"{directory} has no {MANIFEST}; pass a directory written by `dgate export`")
    try:
        data = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constants)
    except (json.JSONDecodeError, UnicodeDecodeError, ValueError) as exc:
        raise ManifestError(f"{path} is corrupt ({exc}); re-export the model with `dgate export`") from exc
    old_unsealed = isinstance(data, dict) and data.get("schema_version") == 1 and CONTENT_KEY not in data
    sealed = content_sha256(data) if isinstance(data, dict) and CONTENT_KEY in data else None
    data = migrate(data) if isinstance(data, dict) else data
    validate(data, str(path))
    if verify and not old_unsealed:  # a version 1 export from before content hashes: the weights' sha256 only
        recorded = data.get(CONTENT_KEY)
        if not isinstance(recorded, str) or recorded != sealed:
            raise ManifestError(
                f"{path} was changed after export (its content_sha256 does not match); re-export the model, "
                "or load it with verify=False (--no-verify) to accept the edit"
            )
    return data


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")
