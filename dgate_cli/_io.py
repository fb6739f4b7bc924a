"""Atomic file writes and hashing: nothing dgate writes is ever left half-written."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

INCOMPLETE_SUFFIX = ".incomplete"


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` only if the block succeeds.

    Example:
        >>> with atomic_path("out.json") as tmp:  # doctest: +SKIP
        ...     tmp.write_text("{}")
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=INCOMPLETE_SUFFIX, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def umask() -> int:
    """The process's umask (read without changing it for longer than a call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def jsonable(obj: Any) -> Any:
    """``obj`` with what strict JSON cannot hold replaced: infinities as ``"inf"`` / ``"-inf"`` (as
    thresholds are written everywhere), NaN as None, tuples as lists, objects by their ``to_dict``.

    Example:
        >>> jsonable({"t": [1.5, float("inf"), float("-inf")], "x": float("nan")})
        {'t': [1.5, 'inf', '-inf'], 'x': None}
    """
    if isinstance(obj, float):
        if obj != obj:
            return None
        if obj in (math.inf, -math.inf):
            return "inf" if obj > 0 else "-inf"
        return obj
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if obj is None or isinstance(obj, (str, int, bool)):
        return obj
    if hasattr(obj, "to_dict"):
        return jsonable(obj.to_dict())
    if hasattr(obj, "tolist"):
        return jsonable(obj.tolist())
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return str(obj)


class AsDict:
    """Mixin for result dataclasses: ``to_dict()`` is the fields as strict-JSON-ready values.

    Example:
        >>> from dataclasses import dataclass
        >>> @dataclass
        ... class R(AsDict):
        ...     t: float
        >>> R(float("inf")).to_dict()
        {'t': 'inf'}
    """

    def to_dict(self) -> dict[str, Any]:
        return jsonable({f.name: getattr(self, f.name) for f in dataclasses.fields(self)})  # type: ignore[arg-type]


def dumps(obj: Any) -> str:
    """Strict, indented JSON text (see :func:`jsonable`): any JSON parser reads it."""
    return json.dumps(jsonable(obj), indent=2, allow_nan=False)


def write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented, strict JSON to ``path`` atomically."""
    write_text(path, dumps(obj) + "\n")


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; let ``FileNotFoundError`` and ``json.JSONDecodeError`` through."""
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_tensors(
    path: str | os.PathLike[str], tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    """Save tensors as safetensors atomically (contiguous CPU copies, no shared storage)."""
    clean = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(clean, str(tmp), metadata=metadata)


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """Return the hex sha256 of a file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    """Return the hex sha256 of a string (UTF-8)."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def remove_stale_incomplete(directory: str | os.PathLike[str]) -> None:
    """Delete ``*.incomplete`` files an interrupted run left in ``directory``."""
    d = Path(directory)
    if d.is_dir():
        for p in d.glob(f"*{INCOMPLETE_SUFFIX}"):
            with contextlib.suppress(OSError):
                p.unlink()
