"""Shared helpers for the benchmark scripts: where the real data is, and printing tables or strict JSON."""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DGATE_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR = SHARED / "cifar10-jpeg"
CHECKPOINTS = SHARED / "checkpoints" / "cifar-resnet"

Rows = list[dict[str, Any]]


def require_shared() -> None:
    if not CIFAR.is_dir():
        sys.exit(
            f"real data not found at {SHARED}; set DGATE_SHARED_DATA to the folder with cifar10-jpeg/ and checkpoints/"
        )


def strict(v: Any) -> Any:
    """``v`` with every float JSON cannot hold replaced: NaN by None, infinities by "inf" / "-inf"
    (as dgate writes thresholds)."""
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {str(k): strict(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [strict(x) for x in v]
    return v


def dumps(obj: Any) -> str:
    """Strict JSON (no NaN or Infinity tokens)."""
    return json.dumps(strict(obj), indent=2, allow_nan=False)


def emit(tables: dict[str, tuple[str, Rows]], as_json: bool, info: dict[str, Any] | None = None) -> None:
    """Print each ``name: (title, rows)`` as an aligned text table, then ``info`` as ``key: value``
    lines; or everything as one JSON object (``info``'s keys, then each table's rows by name)."""
    if as_json:
        print(dumps({**(info or {}), **{name: rows for name, (_title, rows) in tables.items()}}))
        return
    for i, (title, rows) in enumerate(tables.values()):
        if i:
            print()
        print(title)
        if rows:
            print(table(rows))
    for k, v in (info or {}).items():
        print(f"{k}: {_fmt(v)}")


def table(rows: Rows) -> str:
    """An aligned text table of ``rows`` (columns: every key, in order of first appearance)."""
    cols = list(dict.fromkeys(k for r in rows for k in r))
    cells = [[_fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
