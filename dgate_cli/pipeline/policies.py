"""``dgate fit CASCADE_RUN``: learned exit policies (:mod:`dgate_cli.gates.policy`) for a cascade.

::

    CASCADE_RUN/policies.safetensors   per variant (how the answers combine, trade-off lambda):
                                       <variant>/oof (N, G) out-of-fold scores on the split,
                                       <variant>/<g>.weight (F,) the policy at exit g (fitted on all of it)
    CASCADE_RUN/policies.json          biases, the variants, the split, folds and what they were fitted on

The members' gates were fitted on ``train``, where their scores are over-confident, so the policies
are fitted on the calibration split (``val``) by cross-fitting: each sample's score comes from
policies fitted on the other folds, and calibration chooses thresholds on those scores.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from .. import _io, cache
from .._version import __version__
from ..errors import CacheMismatchError, NotFittedError, SpecError
from ..gates.policy import DEFAULT_LAMBDAS, FittedPolicy, cross_fit_scores, fit_policies
from ..thresholds.outcomes import GateOutcomes
from .cascade import CASCADE_JSON, Member, identity, is_cascade, read_cascade, read_members
from .exits import ExitTable, ensemble_options, load_outputs, outputs_of, table
from .fit import GATES_TENSORS, FittedGates, read_gates

POLICIES_JSON = "policies.json"
POLICIES_TENSORS = "policies.safetensors"
DEFAULT_FOLDS = 5

ProgressFn = Callable[[str, int, int], None]


def variant_key(ensemble: Sequence[bool], lam: float) -> str:
    """The name of one variant: how the members' answers combine (``0``/``1`` per member) and lambda."""
    return "".join("1" if e else "0" for e in ensemble) + f"@{lam:g}"


@dataclass(frozen=True)
class PolicyFit(_io.AsDict):
    """Learned policies of a cascade: the variants fitted, on which split, and how long it took."""

    run_dir: str
    split: str
    num_samples: int
    folds: int
    lambdas: list[float]
    variants: list[str]
    exits: dict[str, list[str]]
    seconds: float


def fit_exit_policies(
    run_dir: str | Path,
    *,
    split: str = "val",
    lambdas: Sequence[float] = DEFAULT_LAMBDAS,
    folds: int = DEFAULT_FOLDS,
    seed: int = 0,
    C: float = 1.0,
    progress: ProgressFn | None = None,
) -> PolicyFit:
    """Fit the exit policies of a cascade (every way its answers may combine) or of a single
    network's fitted gates (``dgate fit --policies``), for every trade-off in ``lambdas``, with
    ``folds``-fold cross-fitting on ``split`` (not the gates' own ``train``).

    Example:
        >>> fit_exit_policies("runs/r20-r56").variants  # doctest: +SKIP
        ['00@0.01', ...]
    """
    run_dir = Path(run_dir)
    if is_cascade(run_dir):
        members = read_members(run_dir)
        if split not in read_cascade(run_dir)["splits"]:
            raise NotFittedError(f"the members of {run_dir} do not all have split '{split}'; extract it on each")
    else:
        members = [network_member(run_dir)]
        index = cache.read_index(run_dir, split)
        if index is None or not index.complete:
            raise NotFittedError(
                f"policies are fitted on '{split}', which {run_dir} has not extracted; "
                f"run `dgate extract {run_dir} --{split} DATA`"
            )
    return _fit(run_dir, members, split, lambdas, folds, seed, C, progress)


def network_member(run_dir: Path, config: cache.RunConfig | None = None, fitted: FittedGates | None = None) -> Member:
    """A single network's run directory as the one member of its exit table (``config`` and
    ``fitted``: as already read, else read here)."""
    fitted = fitted or read_gates(run_dir)
    return Member(
        run_dir.name,
        run_dir,
        config or cache.read_run(run_dir),
        fitted,
        list(fitted.names),
        _io.sha256_file(run_dir / GATES_TENSORS),
    )


def _fit(
    run_dir: Path,
    members: list[Member],
    split: str,
    lambdas: Sequence[float],
    folds: int,
    seed: int,
    C: float,
    progress: ProgressFn | None,
) -> PolicyFit:
    t0 = time.perf_counter()
    if folds < 2:
        raise SpecError(f"--folds must be at least 2, got {folds}")
    if not lambdas or any(lam < 0 for lam in lambdas):
        raise SpecError(f"--lambdas must be non-negative trade-offs, e.g. 0.1,0.3,1; got {list(lambdas)}")
    with cache.locked(run_dir, "fit"):
        outputs = load_outputs(members, split)
        tensors: dict[str, torch.Tensor] = {}
        biases: dict[str, list[float]] = {}
        exits: dict[str, list[str]] = {}
        options = ensemble_options(len(members))
        total, done = len(options) * len(lambdas), 0
        for ens in options:
            t = table(members, outputs, ens)
            feats = [t.features(g) for g in range(len(t.exits))]
            correct = t.outcomes().all_correct()
            costs = t.exit_costs()
            for lam in lambdas:
                if progress:
                    progress("fit policies", done, total)
                key = variant_key(ens, lam)
                tensors[f"{key}/oof"] = cross_fit_scores(feats, correct, costs, lam, folds=folds, seed=seed, C=C)
                policies = fit_policies(feats, correct, costs, lam, C=C)
                for g, p in enumerate(policies):
                    tensors[f"{key}/{g}.weight"] = p.weight
                biases[key] = [p.bias for p in policies]
                exits[key] = t.names
                done += 1
        if progress:
            progress("fit policies", total, total)
        meta = {
            "format_version": 1,
            "dgate_version": __version__,
            "identity": identity(members),
            "split": split,
            "split_fingerprint": cache.read_index(members[0].run_dir, split).fingerprint,  # type: ignore[union-attr]
            "folds": folds,
            "seed": seed,
            "C": C,
            "lambdas": list(lambdas),
            "biases": biases,
            "exits": exits,
        }
        _io.save_tensors(run_dir / POLICIES_TENSORS, tensors, metadata={"dgate_version": __version__})
        _io.write_json(run_dir / POLICIES_JSON, meta)
    return PolicyFit(
        str(run_dir), split, len(outputs[0].labels), folds, list(lambdas), list(biases), exits, time.perf_counter() - t0
    )


@dataclass(frozen=True)
class LearnedPolicies:
    """Policies read back (see :func:`read_policies`)."""

    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    sha256: str

    @property
    def split(self) -> str:
        return str(self.meta["split"])

    @property
    def lambdas(self) -> list[float]:
        return [float(v) for v in self.meta["lambdas"]]

    def oof(self, ensemble: Sequence[bool], lam: float) -> torch.Tensor:
        """``(N, G)`` out-of-fold scores of one variant on the split the policies were fitted on."""
        return self.tensors[f"{variant_key(ensemble, lam)}/oof"]

    def policies(self, ensemble: Sequence[bool], lam: float) -> list[FittedPolicy]:
        key = variant_key(ensemble, lam)
        return [
            FittedPolicy(self.tensors[f"{key}/{g}.weight"], float(b)) for g, b in enumerate(self.meta["biases"][key])
        ]


def read_policies(run_dir: str | Path, members: list[Member]) -> LearnedPolicies | None:
    """The learned policies of a cascade (None if ``dgate fit`` has not fitted any); an error if
    they were fitted on other members or other images."""
    run_dir = Path(run_dir)
    meta_path, tensor_path = run_dir / POLICIES_JSON, run_dir / POLICIES_TENSORS
    if not meta_path.is_file() or not tensor_path.is_file():
        return None
    try:
        meta = _io.read_json(meta_path)
        tensors = load_file(str(tensor_path))
    except (ValueError, SafetensorError, OSError) as exc:
        raise CacheMismatchError(
            f"the policies in {run_dir} are unreadable ({exc}); run `dgate fit {run_dir}` again"
        ) from exc
    index = cache.read_index(members[0].run_dir, str(meta.get("split")))
    if meta.get("identity") != identity(members) or index is None or meta.get("split_fingerprint") != index.fingerprint:
        raise CacheMismatchError(
            f"the policies in {run_dir} were fitted on other members or images; run `dgate fit {run_dir}` again"
        )
    return LearnedPolicies(meta, tensors, _io.sha256_file(tensor_path))


def check_table(t: ExitTable, learned: LearnedPolicies, ensemble: Sequence[bool]) -> None:
    """The policies of a variant must be for exactly the exits of ``t``."""
    key = variant_key(ensemble, learned.lambdas[0])
    if learned.meta["exits"].get(key) != t.names:
        raise CacheMismatchError(
            f"the policies were fitted for other exits; run `dgate fit` on the cascade again ({CASCADE_JSON} changed)"
        )


def policy_candidates(
    member: Member, data: cache.SplitFeatures, names: list[str], score: str, split: str, policy: str
) -> tuple[LearnedPolicies | None, list[tuple[float, GateOutcomes]]]:
    """The learned policies of a single network (None if there are none or they do not apply) and
    their outcomes on ``split`` per trade-off lambda (cross-fitted scores); ``data``: the split,
    as calibration read it."""
    fitted, run_dir = member.fitted, member.run_dir
    learned = read_policies(run_dir, [member]) if policy != "threshold" else None
    usable = learned is not None and learned.split == split and names == fitted.names and score == fitted.score
    if policy == "learned" and not usable:
        why = (
            "has no learned policies"
            if learned is None
            else f"has policies for all gates, the '{fitted.score}' rule and '{learned.split}'"
        )
        raise NotFittedError(f"{run_dir} {why}; run `dgate fit {run_dir} --policies` (or leave out --policy learned)")
    if not usable:
        return None, []
    t = table([member], [outputs_of(member, data)], (False,))
    return learned, [(lam, t.outcomes(learned.oof((False,), lam))) for lam in learned.lambdas]  # type: ignore[union-attr]


def policy_choice(learned: LearnedPolicies, lam: float | None, tried: list[Any]) -> dict[str, Any]:
    """What calibration records of a single network's choice between its exits' scores and learned
    policies: the choice, and each candidate's cost at the target (``tried``: calibrate's ``Tried``)."""
    return {
        "policy": "threshold" if lam is None else "learned",
        "lambda": lam,
        "variants": [
            {
                "policy": "threshold" if t.key is None else "learned",
                "lambda": t.key,
                "cost_ratio": None if t.point is None else t.point.cost_ratio,
            }
            for t in tried
        ],
        "policies_sha256": learned.sha256 if lam is not None else None,
    }
