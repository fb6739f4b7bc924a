"""``RUN_DIR/run.json``: what a run directory's cache was extracted with, its identity and its
format version (the layout is in :mod:`dgate_cli.cache`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import _io
from .._version import __version__
from ..errors import CacheMismatchError, MissingFileError

FORMAT_VERSION = 2


RUN_FILE = "run.json"


# the fields that determine the cached values (with the weights' sha256)
_IDENTITY = ("format_version", "model", "gates", "pooling", "gate_pooling", "preprocess", "input_size", "feature_dtype")


@dataclass
class RunConfig:
    """What a run directory's cache was extracted with (``run.json``).

    ``identity()`` covers everything that changes the cached numbers; two configs with the same
    identity produce interchangeable caches.
    """

    model: dict[str, Any]
    weights: dict[str, str] | None
    gates: list[str]
    pooling: dict[str, Any]
    preprocess: dict[str, Any]
    input_size: int
    feature_dtype: str
    classes: list[str]
    layouts: list[str]
    stage_shapes: list[list[int]]
    feature_sizes: list[int]
    costs: dict[str, Any]
    gate_pooling: list[dict[str, Any]] = field(default_factory=list)
    splits: dict[str, str] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    dgate_version: str = __version__

    def identity(self) -> str:
        """sha256 of the fields that determine the cached values."""
        d = self.to_dict()
        key = {name: d[name] for name in _IDENTITY}
        key["weights_sha256"] = (self.weights or {}).get("sha256")
        return _io.sha256_text(json.dumps(key, sort_keys=True))

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": self.format_version,
            "dgate_version": self.dgate_version,
            "model": self.model,
            "weights": self.weights,
            "gates": self.gates,
            "pooling": self.pooling,
            "gate_pooling": self.gate_pooling,
            "preprocess": self.preprocess,
            "input_size": self.input_size,
            "feature_dtype": self.feature_dtype,
            "classes": self.classes,
            "layouts": self.layouts,
            "stage_shapes": self.stage_shapes,
            "feature_sizes": self.feature_sizes,
            "costs": self.costs,
            "splits": self.splits,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in fields})

    @property
    def num_classes(self) -> int:
        return len(self.classes)


def run_file(run_dir: str | Path) -> Path:
    return Path(run_dir) / RUN_FILE


def read_run(run_dir: str | Path) -> RunConfig:
    """Read ``run.json``; a clear error if the directory has no extracted cache."""
    path = run_file(run_dir)
    if not path.is_file():
        raise MissingFileError(f"{run_dir} has no {RUN_FILE}; run `dgate extract {run_dir} --model ...` first")
    try:
        data = _io.read_json(path)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheMismatchError(f"{path} is corrupt ({exc}); run `dgate extract` again with --overwrite") from exc
    if not isinstance(data, dict):
        raise CacheMismatchError(f"{path} is not a dgate run file; run `dgate extract` again with --overwrite")
    if data.get("format_version") != FORMAT_VERSION:
        raise CacheMismatchError(
            f"{path} has cache format {data.get('format_version')}, this dgate reads {FORMAT_VERSION}; "
            "run `dgate extract` again with --overwrite"
        )
    try:
        return RunConfig.from_dict(data)
    except TypeError as exc:
        raise CacheMismatchError(f"{path} is incomplete ({exc}); run `dgate extract` again with --overwrite") from exc


def write_run(run_dir: str | Path, config: RunConfig) -> None:
    _io.write_json(run_file(run_dir), config.to_dict())
