"""``dgate fit``: one linear gate per cached position, fitted on the train split; written atomically.

::

    RUN_DIR/gates.safetensors   <gate>.weight (K, D) and <gate>.bias (K,) on raw features
                                (the standardisation is folded in)
    RUN_DIR/gates.json          loss, targets, C per gate and how it was chosen, accuracies, the
                                identity of the cache they were fitted on
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .. import _io, cache
from .._version import __version__
from ..errors import CacheMismatchError, MissingFileError, NotFittedError, SpecError
from ..gates.linear import DEFAULT_C_GRID, LOSSES, LinearGate, choose_C

GATES_JSON = "gates.json"
GATES_TENSORS = "gates.safetensors"
TARGETS = ("label", "backbone")
DEFAULT_SCORE = {"hinge": "margin", "ce": "softmax"}

ProgressFn = Callable[[str, int, int], None]


@dataclass(frozen=True)
class GateFit(_io.AsDict):
    """How one gate was fitted and how well it does.

    Attributes:
        gate: position name.
        features: feature vector length.
        C: the regularisation used.
        C_grid, C_holdout_accuracy: the candidates tried and their held-out accuracy (empty if C was given).
        train_accuracy: accuracy on the train split (against the labels).
        val_accuracy: accuracy on the val split, if it was extracted.
        agreement: agreement with the backbone's prediction on val (or train).
        seconds: fit time (C search included).
        iterations: L-BFGS iterations of the final fit.
    """

    gate: str
    features: int
    C: float
    C_grid: list[float]
    C_holdout_accuracy: list[float]
    train_accuracy: float
    val_accuracy: float | None
    agreement: float
    seconds: float
    iterations: int


@dataclass
class FitResult:
    run_dir: Path
    loss: str
    target: str
    gates: list[GateFit]
    seconds: float
    device: str
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "loss": self.loss,
            "target": self.target,
            "seconds": round(self.seconds, 3),
            "device": self.device,
            "gates": [g.to_dict() for g in self.gates],
            "notes": self.notes,
        }


@dataclass(frozen=True)
class FittedGates:
    """Gates read back from a run directory."""

    loss: str
    score: str
    target: str
    names: list[str]
    weights: dict[str, torch.Tensor]
    biases: dict[str, torch.Tensor]
    identity: str
    meta: dict[str, Any]

    def outputs(self, gate: str, features: torch.Tensor) -> torch.Tensor:
        """Gate outputs ``(N, K)`` for raw features ``(N, D)``."""
        return torch.addmm(self.biases[gate], features.float(), self.weights[gate].t())


def _targets(split: cache.SplitFeatures, target: str) -> torch.Tensor:
    return split.labels if target == "label" else split.logits.argmax(1)


def fit(
    run_dir: str | Path,
    *,
    loss: str = "hinge",
    C: float | None = None,
    C_grid: tuple[float, ...] = DEFAULT_C_GRID,
    holdout: float = 0.1,
    target: str = "label",
    device: str = "auto",
    max_iter: int = 500,
    progress: ProgressFn | None = None,
) -> FitResult:
    """Fit one gate per cached position on the train split and write them to ``run_dir``.

    Args:
        run_dir: a run directory with an extracted ``train`` split.
        loss: ``hinge`` (one-vs-all squared hinge: the d-gate) or ``ce`` (softmax cross-entropy).
        C: inverse regularisation; None chooses it per gate on a held-out part of train.
        C_grid: the candidates when choosing C.
        holdout: fraction of train held out to choose C.
        target: fit to the ``label`` (the paper) or to the ``backbone``'s own prediction.
        device: where to solve: ``auto`` (cuda if available, else cpu), ``cpu`` or ``cuda``.
        max_iter: L-BFGS iterations at most per fit.
        progress: called as ``progress(gate, done, total)``.

    Example:
        >>> result = fit("runs/r56")  # doctest: +SKIP
        >>> [round(g.val_accuracy, 3) for g in result.gates]  # doctest: +SKIP
        [0.521, 0.667]
    """
    t0 = time.perf_counter()
    if loss not in LOSSES:
        raise SpecError(f"--loss must be one of {', '.join(LOSSES)}, got '{loss}'")
    if target not in TARGETS:
        raise SpecError(f"--target must be one of {', '.join(TARGETS)}, got '{target}'")
    if not 0.0 < holdout < 0.5:
        raise SpecError(f"--holdout must be between 0 and 0.5, got {holdout}")
    from .._device import resolve_device

    dev = resolve_device(device)
    run_dir = Path(run_dir)
    config = cache.read_run(run_dir)
    with cache.locked(run_dir, "fit"):
        return _fit(run_dir, config, loss, C, C_grid, holdout, target, dev, max_iter, progress, t0)


def _fit(
    run_dir: Path,
    config: cache.RunConfig,
    loss: str,
    C: float | None,
    C_grid: tuple[float, ...],
    holdout: float,
    target: str,
    dev: torch.device,
    max_iter: int,
    progress: ProgressFn | None,
    t0: float,
) -> FitResult:
    train = cache.load_split(run_dir, "train")
    val = cache.load_split(run_dir, "val") if _complete(run_dir, "val") else None
    K = config.num_classes
    y = _targets(train, target)
    fits: list[GateFit] = []
    tensors: dict[str, torch.Tensor] = {}
    notes: list[str] = []
    for i, name in enumerate(config.gates):
        if progress:
            progress("fit gates", i, len(config.gates))
        g0 = time.perf_counter()
        X = train.features[name]
        search = None
        if C is None:
            search = choose_C(X, y, loss=loss, grid=C_grid, holdout=holdout, num_classes=K, device=str(dev))
            chosen = search.C
        else:
            chosen = C
        gate = LinearGate(loss=loss, C=chosen, max_iter=max_iter, device=str(dev)).fit(X, y, num_classes=K)
        if gate.n_iter_ >= max_iter:
            notes.append(
                f"gate {name}: L-BFGS stopped at --max-iter {max_iter}; its fit may be improved by more iterations"
            )
        W, b = gate.folded()
        tensors[f"{name}.weight"] = W
        tensors[f"{name}.bias"] = b
        check = val if val is not None else train
        pred_check = torch.addmm(b, check.features[name].float(), W.t()).argmax(1)
        fits.append(
            GateFit(
                gate=name,
                features=int(X.shape[1]),
                C=float(chosen),
                C_grid=list(search.grid) if search else [],
                C_holdout_accuracy=list(search.holdout_accuracy) if search else [],
                train_accuracy=gate.score(X, train.labels),
                val_accuracy=float((pred_check == val.labels).double().mean()) if val is not None else None,
                agreement=float((pred_check == check.logits.argmax(1)).double().mean()),
                seconds=time.perf_counter() - g0,
                iterations=gate.n_iter_,
            )
        )
    if progress:
        progress("fit gates", len(config.gates), len(config.gates))
    meta = {
        "format_version": 1,
        "dgate_version": __version__,
        "loss": loss,
        "score": DEFAULT_SCORE[loss],
        "target": target,
        "identity": config.identity(),
        "train_fingerprint": cache.read_index(run_dir, "train").fingerprint,  # type: ignore[union-attr]
        "gates": [asdict(f) for f in fits],
    }
    _io.save_tensors(run_dir / GATES_TENSORS, tensors, metadata={"dgate_version": __version__})
    _io.write_json(run_dir / GATES_JSON, meta)
    return FitResult(run_dir, loss, target, fits, time.perf_counter() - t0, str(dev), notes)


def _complete(run_dir: Path, split: str) -> bool:
    index = cache.read_index(run_dir, split)
    return index is not None and index.complete


def read_gates(run_dir: str | Path) -> FittedGates:
    """Read fitted gates; a clear error if they are missing or from another cache."""
    run_dir = Path(run_dir)
    meta_path, tensor_path = run_dir / GATES_JSON, run_dir / GATES_TENSORS
    if not meta_path.is_file() or not tensor_path.is_file():
        raise NotFittedError(f"{run_dir} has no fitted gates; run `dgate fit {run_dir}` first")
    config = cache.read_run(run_dir)
    try:
        meta = _io.read_json(meta_path)
        tensors = load_file(str(tensor_path))
    except (ValueError, SafetensorError, OSError) as exc:
        raise CacheMismatchError(
            f"the gates in {run_dir} are unreadable ({exc}); run `dgate fit {run_dir}` again"
        ) from exc
    if not isinstance(meta, dict) or meta.get("identity") != config.identity():
        raise CacheMismatchError(
            f"the gates in {run_dir} were fitted on an older cache; run `dgate fit {run_dir}` again"
        )
    train = cache.read_index(run_dir, "train")
    if train is None or meta.get("train_fingerprint") != train.fingerprint:
        raise CacheMismatchError(
            f"the gates in {run_dir} were fitted on other train images (the train split was extracted again "
            f"since); run `dgate fit {run_dir}` again"
        )
    names = [g["gate"] for g in meta["gates"]]
    missing = [n for n in names if f"{n}.weight" not in tensors]
    if missing:
        raise MissingFileError(f"{tensor_path} lacks gate {missing[0]}; run `dgate fit {run_dir}` again")
    return FittedGates(
        loss=meta["loss"],
        score=meta["score"],
        target=meta["target"],
        names=names,
        weights={n: tensors[f"{n}.weight"] for n in names},
        biases={n: tensors[f"{n}.bias"] for n in names},
        identity=meta["identity"],
        meta=meta,
    )
