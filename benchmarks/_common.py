"""Shared helpers for the benchmark scripts: where the real data is, and printing tables or JSON."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("DGATE_SHARED_DATA", REPO.parent / "shared" / "data"))
CIFAR = SHARED / "cifar10-jpeg"
CHECKPOINTS = SHARED / "checkpoints" / "cifar-resnet"


def require_shared() -> None:
    if not CIFAR.is_dir():
        sys.exit(
            f"real data not found at {SHARED}; set DGATE_SHARED_DATA to the folder with cifar10-jpeg/ and checkpoints/"
        )


def emit(rows: list[dict[str, Any]], as_json: bool, title: str = "") -> None:
    """Print rows as an aligned text table, or as JSON."""
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    if title:
        print(title)
    if not rows:
        return
    cols = list(rows[0])
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    print("  ".join(c.rjust(w) for c, w in zip(cols, widths, strict=True)))
    for row in cells:
        print("  ".join(v.rjust(w) for v, w in zip(row, widths, strict=True)))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)
