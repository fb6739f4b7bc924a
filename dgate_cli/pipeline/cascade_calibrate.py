"""``dgate calibrate CASCADE_RUN``: a cascade's exit thresholds for a target accuracy -> ``calibration.json``.

Calibration tries every variant of the cascade: each way its members' answers may combine
(:func:`~.exits.ensemble_options`), with threshold exits (each exit's rule) and, where ``dgate
fit`` learned them, with learned policies at every trade-off it fitted (their cross-fitted scores).
It keeps the cheapest variant that reaches the target, with the same search, reserve and
``--confidence`` as a single network; accuracy drops and cost ratios are against the last member
alone (the reference). Every variant's cost is recorded, so the choice can be checked.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import _io, cache
from ..errors import NotFittedError, SpecError, TargetUnreachableError
from ..thresholds.candidates import cheapest, check_target, try_each
from ..thresholds.frontier import DEFAULT_DROPS, Frontier, frontier
from ..thresholds.outcomes import GateOutcomes, OperatingPoint, in_macs
from ..thresholds.search import max_accuracy, sequential
from .calibrate import CALIBRATION_JSON, DEFAULT_RESERVE, CalibrationResult
from .cascade import Member, identity, read_cascade, read_members
from .exits import ExitTable, ensemble_options, load_outputs, table
from .policies import LearnedPolicies, check_table, read_policies

POLICIES = ("auto", "threshold", "learned")
ENSEMBLES = ("auto", "off", "on")
GAINS = (-0.03, -0.02, -0.015, -0.01, -0.005)  # frontier points above the reference: combined answers can beat it
CASCADE_DROPS = GAINS + DEFAULT_DROPS


@dataclass(frozen=True)
class Variant:
    """One way to run a cascade: how the answers combine, and the exit policy (``lam``: learned)."""

    ensemble: tuple[bool, ...]
    policy: str
    lam: float | None
    oc: GateOutcomes
    table: ExitTable

    def describe(self) -> dict[str, Any]:
        return {"ensemble": list(self.ensemble), "policy": self.policy, "lambda": self.lam}


def variants(
    run_dir: Path, members: list[Member], split: str, policy: str = "auto", ensemble: str = "auto"
) -> tuple[list[Variant], LearnedPolicies | None]:
    """Every variant of the cascade in ``run_dir`` (of ``members``) on ``split`` that ``policy``
    and ``ensemble`` allow, and the learned policies they use (None: none)."""
    if policy not in POLICIES:
        raise SpecError(f"--policy must be one of {', '.join(POLICIES)}, got '{policy}'")
    if ensemble not in ENSEMBLES:
        raise SpecError(f"--ensemble must be one of {', '.join(ENSEMBLES)}, got '{ensemble}'")
    if split not in read_cascade(run_dir)["splits"]:
        raise NotFittedError(f"the members of {run_dir} do not all have split '{split}'; extract it on each")
    learned = read_policies(run_dir, members) if policy != "threshold" else None
    if policy == "learned" and learned is None:
        raise NotFittedError(f"{run_dir} has no learned policies; run `dgate fit {run_dir}` first")
    if learned is not None and learned.split != split:
        if policy == "learned":
            raise SpecError(
                f"the policies of {run_dir} were fitted on '{learned.split}'; calibrate on that split (--split {learned.split})"
            )
        learned = None
    outputs = load_outputs(members, split)
    options = ensemble_options(len(members))
    if ensemble != "auto":
        options = [options[-1]] if ensemble == "on" else [options[0]]  # every later member combined, or none
    found: list[Variant] = []
    for ens in options:
        t = table(members, outputs, ens)
        if policy != "learned":
            found.append(Variant(ens, "threshold", None, t.outcomes(), t))
        if learned is not None:
            check_table(t, learned, ens)
            found += [Variant(ens, "learned", lam, t.outcomes(learned.oof(ens, lam)), t) for lam in learned.lambdas]
    return found, learned


def calibrate_cascade(
    run_dir: str | Path,
    *,
    target_acc: float | None = None,
    max_drop: float | None = None,
    split: str = "val",
    confidence: float | None = None,
    reserve: float = DEFAULT_RESERVE,
    policy: str = "auto",
    ensemble: str = "auto",
    gate_overhead: float = 0.0,
) -> CalibrationResult:
    """Choose the cheapest variant and thresholds of a cascade that reach the target on ``split``.

    Args:
        target_acc, max_drop: the target, as for a single network; ``max_drop`` is below the
            reference (the last member alone) and may be 0 or, with combined answers, negative
            targets are reachable through ``target_acc``.
        policy: ``threshold`` (each exit's rule), ``learned`` (the policies ``dgate fit`` learned)
            or ``auto`` (the cheaper at the target).
        ensemble: ``off`` (each member answers alone), ``on`` (every later member averages its
            probabilities with the earlier members') or ``auto`` (every combination; the cheapest).
        gate_overhead: charge each open exit this fraction of the reference's cost while
            choosing, as for a single network (the reported costs stay MACs).

    Example:
        >>> r = calibrate_cascade("runs/r20-r56", max_drop=0.0)  # doctest: +SKIP
        >>> r.chosen.cost_ratio, r.cascade["variant"]  # doctest: +SKIP
    """
    t0 = time.perf_counter()
    check_target(target_acc, max_drop)
    if not 0.0 <= gate_overhead < 1.0:
        raise SpecError(f"--gate-overhead must be a fraction of the reference's cost in [0, 1), got {gate_overhead}")
    run_dir = Path(run_dir)
    with cache.locked(run_dir, "calibrate"):
        members = read_members(run_dir)
        found, learned = variants(run_dir, members, split, policy, ensemble)
        ref_acc = found[0].oc.backbone_accuracy
        goal = ref_acc - max_drop if max_drop is not None else float(target_acc)  # type: ignore[arg-type]
        tried = try_each([(v, v.oc) for v in found], goal, target_acc, max_drop, confidence, reserve, gate_overhead)
        if all(t.point is None for t in tried):
            raise TargetUnreachableError(
                f"no variant of the cascade reaches accuracy {goal:.4f} on '{split}' (reference {ref_acc:.4f}); "
                "lower --target-acc or raise --max-drop",
                best_accuracy=max(max_accuracy(v.oc).accuracy for v in found),
                backbone_accuracy=ref_acc,
            )
        pick = cheapest(tried)  # the first among equals: threshold exits before learned ones
        best, oc, searched = pick.key, pick.macs, pick.searched
        target: dict[str, Any] = {"max_drop": max_drop} if max_drop is not None else {"accuracy": target_acc}
        target.update(
            {"confidence": confidence} if confidence is not None else {"reserve": reserve} if reserve > 0 else {}
        )
        if gate_overhead:
            target["gate_overhead"] = gate_overhead
        info = {
            "members": [m.name for m in members],
            "exits": [e._asdict() for e in best.table.exits],
            "variant": best.describe(),
            "variants": [
                {**t.key.describe(), "cost_ratio": None if t.point is None else t.point.cost_ratio} for t in tried
            ],
            "policies_sha256": learned.sha256 if learned is not None and best.policy == "learned" else None,
        }
        result = CalibrationResult(
            run_dir=run_dir,
            split=split,
            num_samples=oc.num_samples,
            gates=best.table.names,
            score="policy" if best.policy == "learned" else "rule",
            target_accuracy=goal,
            target=target,
            backbone_accuracy=ref_acc,
            chosen=pick.point,  # type: ignore[arg-type]
            sequential=in_macs(oc, sequential(searched, goal), searched),
            frontier=Frontier(
                [in_macs(oc, p, searched) for p in frontier(searched, CASCADE_DROPS, z=reserve, _path=pick.path).points]
            ),
            reach_costs=oc.reach_costs.tolist(),
            gate_costs=oc.gate_costs.tolist(),
            unit="MACs",
            seconds=time.perf_counter() - t0,
            reference_cost=oc.backbone_cost,
            cascade=info,
        )
        payload = result.to_dict()
        if best.lam is not None and learned is not None:
            payload["policies"] = [p.to_dict() for p in learned.policies(best.ensemble, best.lam)]
        payload["identity"] = identity(members)
        payload["split_fingerprint"] = cache.read_index(members[0].run_dir, split).fingerprint  # type: ignore[union-attr]
        _io.write_json(run_dir / CALIBRATION_JSON, payload)
        return result


def read_cascade_calibration(run_dir: str | Path) -> dict[str, Any]:
    """Read a cascade's ``calibration.json``; a clear error if it is missing or stale."""
    run_dir = Path(run_dir)
    path = run_dir / CALIBRATION_JSON
    if not path.is_file():
        raise NotFittedError(f"{run_dir} has no thresholds; run `dgate calibrate {run_dir} --max-drop 0` first")
    data = _io.read_json(path)
    members = read_members(run_dir)
    index = cache.read_index(members[0].run_dir, str(data.get("split")))
    if data.get("identity") != identity(members) or index is None or data.get("split_fingerprint") != index.fingerprint:
        raise NotFittedError(
            f"the thresholds in {run_dir} belong to other members or images; run `dgate calibrate {run_dir}` again"
        )
    return data


def point(data: dict[str, Any], key: str = "chosen") -> OperatingPoint:
    return OperatingPoint.from_dict(data[key])
