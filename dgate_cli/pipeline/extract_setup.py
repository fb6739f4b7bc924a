"""Before ``dgate extract`` runs a pass: what the run will be (gate cuts, poolings, shapes, costs),
whether the data and this machine can take it, and reconciling a run directory's existing
run.json and caches with the new run's settings."""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .. import cache
from .._device import available_memory, gib
from ..data.datasets import ImageDataset
from ..data.preprocess import Preprocess
from ..errors import CacheMismatchError, DataError, SpecError
from ..gates.pooling import PoolingPolicy, layout_of, pool
from ..models.backbone import Backbone
from ..models.flops import UNIT, gate_macs, stage_costs
from ..models.staging import run_stages

MAX_SIDE = 8192  # pixels: larger inputs are refused up front


def example_input(dataset: ImageDataset, backbone: Backbone) -> torch.Tensor:
    """The first image of ``dataset``, preprocessed as a one-sample batch: what the run is probed with."""
    image, _, _ = dataset[0]
    return backbone.preprocess.normalize(image.unsqueeze(0))


def describe_run(
    backbone: Backbone, gates: list[str] | None, policy: PoolingPolicy, example: torch.Tensor
) -> dict[str, Any]:
    """Resolve gates, probe stage shapes and layouts, and count stage and gate costs."""
    cuts = backbone.resolve_gates(gates)
    stages = backbone.graph.split(cuts)
    with torch.inference_mode():
        outs = run_stages(stages, example)
    layouts = [layout_of(o, backbone.family.channels_last) for o in outs[:-1]]
    for cut, lay in zip(cuts, layouts, strict=True):
        if lay == "unsupported":
            raise SpecError(
                f"gate position '{cut.name}' outputs a {outs[cuts.index(cut)].dim()}-d tensor; choose a position with 2-, 3- or 4-d output"
            )
    poolings = [policy.for_stage(tuple(o.shape[1:]), lay) for o, lay in zip(outs, layouts, strict=False)]
    with torch.inference_mode():
        feats = [pool(o, p, lay) for o, p, lay in zip(outs, poolings, layouts, strict=False)]
    num_classes = int(outs[-1].shape[-1])
    costs = stage_costs(stages, example)
    gates_macs = [
        gate_macs(p.macs(tuple(o.shape[1:])), int(f.shape[1]), num_classes)
        for o, p, f in zip(outs, poolings, feats, strict=False)
    ]
    return {
        "cuts": cuts,
        "stages": stages,
        "layouts": layouts,
        "poolings": poolings,
        "stage_shapes": [list(o.shape[1:]) for o in outs[:-1]],
        "feature_sizes": [int(f.shape[1]) for f in feats],
        "num_classes": num_classes,
        "costs": {
            "unit": UNIT,
            "stages": [c.to_dict() for c in costs],
            "gates": gates_macs,
            "backbone": sum(c.macs for c in costs),
        },
    }


def check_classes(datasets: Mapping[str, ImageDataset], num_classes: int, model: str) -> list[str]:
    """The class names every split shares, refusing splits that differ or a model of another class count."""
    names = list(datasets)
    classes = datasets[names[0]].classes
    for name in names[1:]:
        if datasets[name].classes != classes:
            raise DataError(
                f"{class_difference(name, datasets[name].classes, names[0], classes)}; every split needs the same class folders"
            )
    if len(classes) != num_classes:
        raise DataError(
            f"{model} predicts {num_classes} classes but the data has {len(classes)} class folders; "
            "pass weights and --model-kwargs for the data's classes"
        )
    return list(classes)


def class_difference(name: str, theirs: list[str], reference: str, ours: list[str]) -> str:
    """Say how two class lists differ: the names only one side has, or the first position where
    the order differs (the labels are positions in the sorted list).

    Example:
        >>> class_difference("val", ["cat", "dog", "emu"], "train", ["cat", "dog", "fox"])
        'the val data has classes that train lacks (emu) and lacks some that train has (fox)'
    """
    extra = [c for c in theirs if c not in ours]
    missing = [c for c in ours if c not in theirs]
    if extra or missing:
        parts = []
        if extra:
            parts.append(
                f"has classes that {reference} lacks ({', '.join(extra[:5])}{', ...' if len(extra) > 5 else ''})"
            )
        if missing:
            parts.append(
                f"lacks some that {reference} has ({', '.join(missing[:5])}{', ...' if len(missing) > 5 else ''})"
            )
        return f"the {name} data " + " and ".join(parts)
    i = next(i for i, (a, b) in enumerate(zip(theirs, ours, strict=False)) if a != b)
    return f"the {name} data has class {theirs[i]!r} at label {i}, where {reference} has {ours[i]!r}"


def prepare_run_dir(run_dir: Path, config: cache.RunConfig, overwrite: bool, notes: list[str]) -> cache.RunConfig:
    """Reconcile ``config`` with what ``run_dir`` already holds; return the config to write."""
    path = cache.run_file(run_dir)
    if not path.exists():
        return config
    try:
        old = cache.read_run(run_dir)
    except CacheMismatchError:
        if not overwrite:
            raise
        old = None
    if old is not None and not overwrite:
        if old.model != config.model or (old.weights or {}).get("sha256") != (config.weights or {}).get("sha256"):
            raise CacheMismatchError(
                f"{run_dir} belongs to {old.model['spec']} with weights {(old.weights or {}).get('source', 'random init')}; "
                "use another RUN_DIR, or pass --overwrite to replace it"
            )
        if old.identity() == config.identity():
            config.splits = {**old.splits, **config.splits}
            return config
        changed = [
            what
            for what, a, b in (
                ("gates", old.gates, config.gates),
                ("pooling", old.pooling, config.pooling),
                ("preprocessing", [old.preprocess, old.input_size], [config.preprocess, config.input_size]),
                ("feature dtype", old.feature_dtype, config.feature_dtype),
            )
            if a != b
        ] or ["settings"]
        removed = [f"the cache of {', '.join(sorted(old.splits))}"] if old.splits else []
        removed += [what for what, name in (("the fitted gates", "gates.json"), ("the calibration", "calibration.json"))
                    if (run_dir / name).exists()]  # fmt: skip
        lost = sorted(set(old.splits) - set(config.splits))
        note = f"{run_dir} was extracted with other {' and '.join(changed)}: removed {', '.join(removed) or 'nothing'}"
        if lost:
            note += f"; the {', '.join(lost)} split{'s are' if len(lost) > 1 else ' is'} not rebuilt: pass " + " ".join(
                f"--{s} DATA" for s in lost
            )
        notes.append(note)
    for p in (run_dir / cache.CACHE_DIR,):
        shutil.rmtree(p, ignore_errors=True)
    for name in ("gates.json", "gates.safetensors", "calibration.json"):
        (run_dir / name).unlink(missing_ok=True)
    return config


def check_input_size(preprocess: Preprocess, batch_size: int) -> None:
    """Refuse an input size whose batches cannot fit in memory (``--crop 100000``) before any work.

    Raises:
        SpecError: naming the size, what a batch would take and what this machine has.
    """
    side = preprocess.crop or preprocess.resize
    if side is None:
        return
    per_image = 3 * side * side * 4 * 2  # the uint8 decode is smaller; the float input and one copy
    avail = available_memory()
    limit = (avail // 2) if avail else 64 << 30
    if side > MAX_SIDE or per_image * batch_size > limit:
        option = "--crop" if preprocess.crop else "--resize"
        raise SpecError(
            f"{option} {side} makes each batch of {batch_size} images {gib(per_image * batch_size)} in memory, more than "
            f"this machine can give ({gib(limit)}"
            + (f", and sides above {MAX_SIDE} px are refused" if side > MAX_SIDE else "")
            + f"); use a smaller {option} or --batch-size"
        )


def check_feature_memory(info: dict[str, Any], sizes: Mapping[str, int], names: list[str]) -> None:
    """Refuse gate features that `dgate fit` could not hold in memory for the largest split."""
    n = max(sizes.values())
    avail = available_memory()
    if not avail:
        return
    for name, d in zip(names, info["feature_sizes"], strict=True):
        need = 4 * d * n * 3  # the features, their standardised copy and the solver's work
        if need > avail:
            raise SpecError(
                f"gate {name} would have {d:,} features: fitting it on {n:,} images needs about {gib(need)}, more "
                f"than this machine's {gib(avail)} available; use a coarser --pool (or --pool-budget) or fewer --gates"
            )
