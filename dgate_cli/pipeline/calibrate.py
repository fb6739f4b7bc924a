"""``dgate calibrate``: thresholds for a target accuracy on the calibration split -> ``calibration.json``."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import _io, cache
from .._version import __version__
from ..errors import NotFittedError, SpecError
from ..gates.scores import SCORES, gate_scores
from ..thresholds.candidates import cheapest, check_target, try_each
from ..thresholds.frontier import Frontier, frontier
from ..thresholds.outcomes import GateOutcomes, OperatingPoint, in_macs
from ..thresholds.search import sequential
from .cascade import is_cascade
from .fit import FittedGates, read_gates
from .policies import network_member, policy_candidates, policy_choice

CALIBRATION_JSON = "calibration.json"
DEFAULT_RESERVE = 2.0


def reach_costs(config: cache.RunConfig, names: list[str]) -> torch.Tensor:
    """Backbone MACs from the input to each of ``names`` (cached gate positions), then the whole model."""
    cum = torch.tensor([s["macs"] for s in config.costs["stages"]], dtype=torch.float64).cumsum(0)
    return torch.cat([cum[[config.gates.index(n) for n in names]], cum[-1:]])


def gate_costs(config: cache.RunConfig, names: list[str]) -> torch.Tensor:
    return torch.tensor([config.costs["gates"][config.gates.index(n)] for n in names], dtype=torch.float64)


def outcomes(
    config: cache.RunConfig, gates: FittedGates, split: cache.SplitFeatures, names: list[str], score: str
) -> tuple[GateOutcomes, torch.Tensor]:
    """Per-sample scores and correctness at each gate, and the ``(N, G)`` gate predictions."""
    scores, preds = [], []
    for n in names:
        s, p = gate_scores(gates.outputs(n, split.features[n]), score)
        scores.append(s)
        preds.append(p)
    pred = torch.stack(preds, 1) if preds else torch.empty(len(split), 0, dtype=torch.long)
    oc = GateOutcomes(
        scores=torch.stack(scores, 1) if scores else torch.empty(len(split), 0),
        correct=pred == split.labels[:, None],
        final_correct=split.logits.argmax(1) == split.labels,
        reach_costs=reach_costs(config, names),
        gate_costs=gate_costs(config, names),
    )
    return oc, pred


@dataclass
class CalibrationResult:
    """The thresholds chosen and the accuracy/cost frontier on the calibration split."""

    run_dir: Path
    split: str
    num_samples: int
    gates: list[str]
    score: str
    target_accuracy: float
    target: dict[str, Any]
    backbone_accuracy: float
    chosen: OperatingPoint
    sequential: OperatingPoint
    frontier: Frontier
    reach_costs: list[float]
    gate_costs: list[float]
    unit: str
    seconds: float
    warnings: list[str] = field(default_factory=list)
    reference_cost: float | None = None
    cascade: dict[str, Any] | None = None
    policy: dict[str, Any] | None = None

    @property
    def backbone_cost(self) -> float:
        """The reference's cost (the backbone; a cascade's last member): the denominator of ratios."""
        return self.reach_costs[-1] if self.reference_cost is None else self.reference_cost

    def to_dict(self) -> dict[str, Any]:
        return {
            "format_version": 1,
            "dgate_version": __version__,
            "run_dir": str(self.run_dir),
            "split": self.split,
            "num_samples": self.num_samples,
            "gates": self.gates,
            "score": self.score,
            "target": self.target,
            "target_accuracy": self.target_accuracy,
            "backbone_accuracy": self.backbone_accuracy,
            "chosen": self.chosen.to_dict(),
            "sequential": self.sequential.to_dict(),
            "frontier": self.frontier.to_list(),
            "costs": {
                "unit": self.unit,
                "reach": self.reach_costs,
                "gates": self.gate_costs,
                "backbone": self.backbone_cost,
            },
            "seconds": round(self.seconds, 3),
            "warnings": self.warnings,
            **({"cascade": self.cascade} if self.cascade is not None else {}),
            **({"policy": self.policy} if self.policy is not None else {}),
        }


def calibrate(
    run_dir: str | Path,
    *,
    target_acc: float | None = None,
    max_drop: float | None = None,
    split: str = "val",
    score: str | None = None,
    gates: list[str] | None = None,
    polish: bool = True,
    confidence: float | None = None,
    reserve: float = DEFAULT_RESERVE,
    gate_overhead: float = 0.0,
    policy: str = "auto",
    ensemble: str = "auto",
) -> CalibrationResult:
    """Choose thresholds with the lowest mean cost such that accuracy on ``split`` reaches the target.

    On a cascade run directory (``dgate cascade``) this is :func:`.cascade_calibrate.calibrate_cascade`
    (``ensemble`` applies there; ``score`` and ``gates`` do not).

    Args:
        run_dir: a run directory with fitted gates and the calibration split extracted.
        target_acc: absolute accuracy to reach, in [0, 1].
        max_drop: or: the largest accuracy drop allowed below the backbone's on ``split`` (0.01 = 1 point).
        split: the calibration split (never the one you report on).
        score: exit rule: ``max`` (largest gate output; default for hinge gates), ``margin``,
            ``softmax`` (default for ce gates) or ``entropy``.
        gates: use only these fitted gates (default: all).
        polish: refine the chosen point with pairwise moves.
        reserve: keep this many standard deviations of the discordant-sample noise in reserve,
            so that the target holds on new data in expectation (0: meet it on the calibration
            split exactly, the paper's rule, which overfits the split).
        confidence: choose thresholds so that the target holds on new data from the same
            distribution with this probability (Clopper-Pearson bounds on the calibration split),
            instead of on the calibration split itself.
        gate_overhead: charge every open gate this fraction of the backbone's cost per sample
            that reaches it, on top of its MACs, while choosing: the fixed time a gate costs (a
            pooling, a matrix product and a decision: ~1% of a CIFAR ResNet-56 forward on a CPU,
            ~0.1% of a ResNet-50's at 224 px). Gates that save less than that stay closed. The
            reported costs stay in MACs.
        policy: exit on the rule's score (``threshold``), on the learned policies ``dgate fit
            --policies`` fitted (``learned``: their cross-fitted scores on ``split``), or on
            whichever is cheaper at the target (``auto``, the default; ``threshold`` when there
            are no policies).

    Raises:
        TargetUnreachableError: with the best reachable and the backbone's accuracy.

    Example:
        >>> r = calibrate("runs/r56", max_drop=0.01)  # doctest: +SKIP
        >>> r.chosen.cost_ratio  # doctest: +SKIP
        0.71
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    if is_cascade(run_dir):
        if score is not None or gates is not None:
            raise SpecError("--score and --gates apply to a single network, not to a cascade; leave them out")
        from .cascade_calibrate import calibrate_cascade  # it builds on this module's search

        return calibrate_cascade(
            run_dir,
            target_acc=target_acc,
            max_drop=max_drop,
            split=split,
            confidence=confidence,
            reserve=reserve,
            policy=policy,
            ensemble=ensemble,
            gate_overhead=gate_overhead,
        )
    if ensemble != "auto":
        raise SpecError("--ensemble applies to cascades (`dgate cascade`); leave it out for a single network")
    check_target(target_acc, max_drop)
    if not 0.0 <= gate_overhead < 1.0:
        raise SpecError(
            f"--gate-overhead must be a fraction of the backbone's cost in [0, 1), got {gate_overhead}; e.g. 0.01"
        )
    config = cache.read_run(run_dir)
    with cache.locked(run_dir, "calibrate"):
        return _calibrate(
            run_dir,
            config,
            target_acc,
            max_drop,
            split,
            score,
            gates,
            polish,
            confidence,
            reserve,
            gate_overhead,
            t0,
            policy,
        )


def _calibrate(
    run_dir: Path,
    config: cache.RunConfig,
    target_acc: float | None,
    max_drop: float | None,
    split: str,
    score: str | None,
    gates: list[str] | None,
    polish: bool,
    confidence: float | None,
    reserve: float,
    gate_overhead: float,
    t0: float,
    policy: str = "auto",
) -> CalibrationResult:
    if policy not in ("auto", "threshold", "learned"):
        raise SpecError(f"--policy must be one of auto, threshold, learned, got '{policy}'")
    fitted = read_gates(run_dir)
    score = score or fitted.score
    if score not in SCORES:
        raise SpecError(f"--score must be one of {', '.join(SCORES)}, got '{score}'")
    names = gates or fitted.names
    unknown = [n for n in names if n not in fitted.names]
    if unknown:
        raise SpecError(
            f"gate {unknown[0]} was not fitted in {run_dir} (fitted: {', '.join(fitted.names)}); pass some of those"
        )
    names = [n for n in fitted.names if n in names]  # execution order
    index = cache.read_index(run_dir, split)
    if index is None or not index.complete:
        raise NotFittedError(
            f"split '{split}' of {run_dir} was not extracted; run `dgate extract {run_dir} --{split} DATA` first"
        )
    data = cache.load_split(run_dir, split, gates=names)
    warnings = []
    train_index = cache.read_index(run_dir, "train")
    if split == "train" or (train_index is not None and train_index.fingerprint == index.fingerprint):
        warnings.append(
            f"calibrating on '{split}', the images the gates were fitted on: thresholds will be optimistic; calibrate on a held-out split"
        )
    macs, _pred = outcomes(config, fitted, data, names, score)
    target: dict[str, Any] = {"max_drop": max_drop} if max_drop is not None else {"accuracy": target_acc}
    goal = macs.backbone_accuracy - max_drop if max_drop is not None else float(target_acc)  # type: ignore[arg-type]
    if gate_overhead > 0:
        target["gate_overhead"] = gate_overhead
    target.update({"confidence": confidence} if confidence is not None else {"reserve": reserve} if reserve > 0 else {})
    member = network_member(run_dir, config, fitted)
    learned, candidates = policy_candidates(member, data, names, score, split, policy)
    tried = try_each(
        [(None, macs)] * (policy != "learned") + candidates,
        goal,
        target_acc,
        max_drop,
        confidence,
        reserve,
        gate_overhead,
        polish,
    )
    best = cheapest(tried)
    lam, oc, macs, chosen, path = best.key, best.searched, best.macs, best.found, best.path
    choice = None if learned is None else policy_choice(learned, lam, tried)
    # the policies the thresholds are for go with them (and into the export)
    extra = {} if lam is None else {"policies": [p.to_dict() for p in learned.policies((False,), lam)]}  # type: ignore[union-attr]
    return _finish(
        run_dir,
        split,
        len(data),
        names,
        score,
        goal,
        target,
        oc,
        macs,
        chosen,
        config,
        warnings,
        t0,
        reserve,
        path,
        choice,
        extra,
    )


def _finish(
    run_dir: Path,
    split: str,
    n: int,
    names: list[str],
    score: str,
    goal: float,
    target: dict[str, Any],
    oc: GateOutcomes,
    macs: GateOutcomes,
    chosen: OperatingPoint,
    config: cache.RunConfig,
    warnings: list[str],
    t0: float,
    reserve: float,
    path: list[torch.Tensor],
    choice: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> CalibrationResult:
    result = CalibrationResult(
        run_dir=run_dir,
        split=split,
        num_samples=n,
        gates=names,
        score=score,
        target_accuracy=goal,
        target=target,
        backbone_accuracy=oc.backbone_accuracy,
        chosen=in_macs(macs, chosen, oc),
        sequential=in_macs(macs, sequential(oc, goal), oc),
        frontier=Frontier([in_macs(macs, p, oc) for p in frontier(oc, z=reserve, _path=path).points]),
        reach_costs=macs.reach_costs.tolist(),
        gate_costs=macs.gate_costs.tolist(),
        unit=config.costs["unit"],
        seconds=time.perf_counter() - t0,
        warnings=warnings,
        policy=choice,
    )
    payload = {**result.to_dict(), **(extra or {})}
    payload["identity"] = config.identity()
    payload["gates_sha256"] = _io.sha256_file(run_dir / "gates.safetensors")
    payload["split_fingerprint"] = cache.read_index(run_dir, split).fingerprint  # type: ignore[union-attr]
    _io.write_json(run_dir / CALIBRATION_JSON, payload)
    return result


def read_calibration(run_dir: str | Path) -> dict[str, Any]:
    """Read ``calibration.json``; a clear error if it is missing or stale."""
    run_dir = Path(run_dir)
    path = run_dir / CALIBRATION_JSON
    if not path.is_file():
        raise NotFittedError(f"{run_dir} has no thresholds; run `dgate calibrate {run_dir} --max-drop 0.01` first")
    try:
        data = _io.read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise NotFittedError(f"{path} is corrupt ({exc}); run `dgate calibrate {run_dir}` again") from exc
    if not isinstance(data, dict) or data.get("identity") != cache.read_run(run_dir).identity():
        raise NotFittedError(
            f"the thresholds in {run_dir} belong to an older cache; run `dgate calibrate {run_dir}` again"
        )
    split = data.get("split")
    index = cache.read_index(run_dir, split) if isinstance(split, str) else None
    if index is None or data.get("split_fingerprint") != index.fingerprint:
        raise NotFittedError(
            f"the thresholds in {run_dir} were calibrated on other {split} images (the split was extracted again "
            f"since); run `dgate calibrate {run_dir}` again"
        )
    gates = run_dir / "gates.safetensors"
    if not gates.is_file() or data.get("gates_sha256") != _io.sha256_file(gates):
        raise NotFittedError(
            f"the gates in {run_dir} were refitted after calibration; run `dgate calibrate {run_dir}` again"
        )
    return data
