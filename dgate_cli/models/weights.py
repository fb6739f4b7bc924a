"""Reading checkpoints safely and loading them into a model with every mismatch named."""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn

from ..errors import MissingFileError, WeightsError

_CONTAINER_KEYS = ("state_dict", "model", "model_state_dict", "module")
_PREFIXES = ("module.", "_orig_mod.")


def read_state_dict(path: str | os.PathLike[str]) -> dict[str, torch.Tensor]:
    """Read a state dict from ``.safetensors`` or a ``torch.save`` file (``weights_only=True``).

    The state dict may sit at the top level or under ``state_dict`` / ``model``; a ``module.``
    prefix (``nn.DataParallel``) or ``_orig_mod.`` prefix (``torch.compile``) is removed.

    Example:
        >>> sd = read_state_dict("resnet56-4bfd9763.th")  # doctest: +SKIP
    """
    p = Path(path)
    if not p.is_file():
        raise MissingFileError(
            f"weights file {p} does not exist; pass an existing .safetensors, .pt or .th file to --weights"
        )
    if p.suffix == ".safetensors":
        try:
            obj: object = load_file(str(p))
        except (SafetensorError, OSError, ValueError) as exc:
            raise WeightsError(
                f"{p} is not a readable safetensors file ({exc}); re-export it or pass another file"
            ) from exc
    else:
        try:
            obj = torch.load(str(p), map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            if "weights_only" in str(exc) or "Unsupported global" in str(exc):
                raise WeightsError(
                    f"{p} holds Python objects that dgate will not unpickle (only tensors and plain containers are "
                    "loaded safely); save model.state_dict() instead, or convert it to .safetensors"
                ) from exc
            raise WeightsError(f"{p} is not a torch checkpoint ({_first_line(exc)}); check the file") from exc
        except Exception as exc:  # the unpickler raises many kinds of errors on garbage
            raise WeightsError(
                f"{p} is not a readable torch checkpoint ({type(exc).__name__}: {_first_line(exc)}); check the file"
            ) from exc
    sd = _find_state_dict(obj, p)
    return _strip_prefixes(sd)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _find_state_dict(obj: object, p: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, Mapping):
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj)
        for key in _CONTAINER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping) and inner and all(isinstance(v, torch.Tensor) for v in inner.values()):
                return dict(inner)
    if isinstance(obj, nn.Module):  # only reachable if a caller allowed full unpickling
        return obj.state_dict()
    keys = list(obj.keys())[:6] if isinstance(obj, Mapping) else type(obj).__name__
    raise WeightsError(
        f"{p} holds no state dict (top-level keys: {keys}); dgate looks at the top level and under "
        f"{', '.join(_CONTAINER_KEYS)}: save model.state_dict()"
    )


def _strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in _PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix) :]: v for k, v in sd.items()}
    return sd


def _head_hint(model: nn.Module, key: str, got: torch.Size, want: torch.Size) -> str:
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if linears and key.startswith(linears[-1] + ".") and len(got) >= 1 and got[0] != want[0]:
        return (
            f"; the checkpoint is for {got[0]} classes and the model has {want[0]}: "
            f"""pass --model-kwargs '{{"num_classes": {got[0]}}}'"""
        )
    return ""


def load_into(model: nn.Module, sd: Mapping[str, torch.Tensor], model_name: str, source: str) -> None:
    """Load ``sd`` into ``model`` strictly; name every missing, unexpected or mis-shaped key.

    Raises:
        WeightsError: if the keys or shapes do not match (nothing is loaded then).
    """
    own = model.state_dict()
    missing = [k for k in own if k not in sd and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in sd if k not in own]
    wrong = [(k, tuple(sd[k].shape), tuple(own[k].shape)) for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or wrong:
        parts = []

        def names(ks: list[str]) -> str:
            return ", ".join(ks[:4]) + (f" and {len(ks) - 4} more" if len(ks) > 4 else "")

        if wrong:
            parts.append("wrong shape: " + ", ".join(f"{k} {g} vs model {w}" for k, g, w in wrong[:3]))
        if missing:
            parts.append(f"missing {len(missing)}: {names(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {names(unexpected)}")
        hint = _head_hint(model, wrong[0][0], torch.Size(wrong[0][1]), torch.Size(wrong[0][2])) if wrong else ""
        if not hint:
            hint = f"; is {source} a checkpoint of {model_name}? check --model and --model-kwargs"
        raise WeightsError(f"{source} does not fit {model_name} ({'; '.join(parts)}){hint}")
    model.load_state_dict(sd, strict=False)
