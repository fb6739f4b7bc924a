"""``dgate export CASCADE_RUN``: a calibrated cascade as one export directory, read back by :func:`dgate_cli.load`.

``model.safetensors`` holds member ``k``'s backbone under ``members.<k>.``, every exit as
``gates.<i>.weight`` / ``gates.<i>.bias`` (a member's answer is the identity gate on its output),
and learned policies as ``policies.<i>.weight``. ``dgate.json`` is a single network's manifest (its
``model`` is the reference, the last member) plus ``members`` (each one's model, preprocessing and
gates), a plan whose member steps start from the input, per-exit rules and the policies' biases.
The model takes images in one pixel format, scaled to [0, 1] and not normalised (``preprocess``:
mean 0, std 1); each member's first step normalises them its own way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .. import cache
from ..data.preprocess import Preprocess
from ..errors import CacheMismatchError
from ..runtime.plan import Step
from .cascade import Member, read_members
from .cascade_calibrate import read_cascade_calibration
from .exits import HEAD
from .export import ExportResult, check_out_dir, gate_entry, manifest_data, source_state, write_export
from .policies import read_policies


def export_cascade(run_dir: str | Path, out_dir: str | Path, *, overwrite: bool = False) -> ExportResult:
    """Write the calibrated cascade of ``run_dir`` to ``out_dir`` (see the module docstring)."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    with cache.locked(run_dir, "export"):
        members = read_members(run_dir)
        calib = read_cascade_calibration(run_dir)
        check_out_dir(out_dir, overwrite)
        info = calib["cascade"]
        if info.get("policies_sha256"):
            learned = read_policies(run_dir, members)
            if learned is None or learned.sha256 != info["policies_sha256"]:
                raise CacheMismatchError(
                    f"the policies in {run_dir} were refitted after calibration; run `dgate calibrate {run_dir}` again"
                )
        exits = info["exits"]
        extra: dict[str, torch.Tensor] = {}
        for k, m in enumerate(members):
            extra.update({f"members.{k}.{name}": v for name, v in source_state(m.run_dir, m.config).items()})
        weights, biases, gates = [], [], []
        K = len(members[0].config.classes)
        for i, e in enumerate(exits):
            m, cost = members[e["member"]], calib["costs"]["gates"][i]
            if e["kind"] == HEAD:  # a member's answer: the identity gate on its logits
                weights.append(torch.eye(K))
                biases.append(torch.zeros(K))
                pooling = {"sizes": [1], "ops": ["avg"]}
                gates.append({"name": e["name"], "layout": "nc", "pooling": pooling, "features": K, "cost": cost})
            else:
                g = e["name"].split("/", 1)[1]
                weights.append(m.fitted.weights[g])
                biases.append(m.fitted.biases[g])
                gates.append(gate_entry(m.config, g, cost, name=e["name"]))
            gates[-1]["score"] = e["rule"]
        policies = calib.get("policies")
        if policies:
            for i, p in enumerate(policies):
                extra[f"policies.{i}.weight"] = torch.tensor(p["weight"], dtype=torch.float32)
        ref = members[-1]
        data = manifest_data(
            model=ref.config.model,
            gates=gates,
            pooling=ref.config.pooling,
            score="softmax",
            classes=ref.config.classes,
            preprocess=Preprocess.from_dict(ref.config.preprocess).override(mean=[0.0] * 3, std=[1.0] * 3).to_dict(),
            input_size=ref.config.input_size,
            thresholds=calib["chosen"]["thresholds"],
            costs={
                "unit": calib["costs"]["unit"],
                "reach": calib["costs"]["reach"],
                "gates": calib["costs"]["gates"],
                "reference": calib["costs"]["backbone"],
                "stages": ref.config.costs["stages"],
            },
            source_weights=ref.config.weights,
            calibration={
                k: calib[k]
                for k in (
                    "split",
                    "num_samples",
                    "target",
                    "target_accuracy",
                    "backbone_accuracy",
                    "chosen",
                    "sequential",
                )
            },
            frontier=calib["frontier"],
        )
        data["steps"] = [s.to_dict() for s in plan(members, exits, info["variant"]["ensemble"])]
        data["members"] = [_member_entry(m) for m in members]
        data["cascade"] = {k: info[k] for k in ("variant", "variants")}
        if policies:
            data["policies"] = [{"bias": p["bias"]} for p in policies]
        return write_export(out_dir, {}, weights, biases, data, extra)


def plan(members: list[Member], exits: list[dict[str, Any]], ensemble: list[bool]) -> list[Step]:
    """The cascade's plan: each member's stages, the first from the input, each of its gates and
    (but for the last member) its answer as an exit; answers remembered for the members after."""
    steps: list[Step] = []
    g = 0
    for k, m in enumerate(members):
        last = k == len(members) - 1
        for i, name in enumerate(m.gates):
            if exits[g]["name"] != f"{m.name}/{name}":
                raise CacheMismatchError(
                    "the calibration's exits do not follow the members' gates; run `dgate calibrate` on the cascade again"
                )
            steps.append(Step("stage", exits[g]["name"], "input" if i == 0 else "previous", g))
            g += 1
        source = "previous" if m.gates else "input"
        steps.append(
            Step(
                "stage", f"{m.name}/{HEAD}", source, None if last else g, remember=not last, ensemble=bool(ensemble[k])
            )
        )
        if not last:
            g += 1
    return steps


def _member_entry(m: Member) -> dict[str, Any]:
    return {
        "name": m.name,
        "model": m.config.model,
        "preprocess": m.config.preprocess,
        "input_size": m.config.input_size,
        "gates": m.gates,
        "source_weights": m.config.weights,
        "macs": m.backbone_cost,
    }
