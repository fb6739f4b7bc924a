"""``dgate extract``: one frozen pass over each split -> pooled gate features, logits, labels on disk.

This module runs the passes and writes each split's shards; what the run is and the checks made
before any pass are in :mod:`.extract_setup`."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import cache
from .._device import describe, resolve_device, resolve_dtype
from ..data.datasets import ImageDataset, open_dataset
from ..data.loader import iterate, make_loader
from ..errors import DataError, SpecError
from ..gates.pooling import Pooling, PoolingPolicy, pool
from ..models.backbone import Backbone, build_backbone
from ..models.flops import UNIT
from .extract_setup import (
    check_classes,
    check_feature_memory,
    check_input_size,
    describe_run,
    example_input,
    prepare_run_dir,
)

__all__ = [
    "SHARD_BYTES",
    "ExtractResult",
    "ProgressFn",
    "SplitSummary",
    "extract",
]

ProgressFn = Callable[[str, int, int], None]
SHARD_BYTES = 256 << 20


@dataclass(frozen=True)
class SplitSummary:
    """What extraction did for one split."""

    split: str
    data: str
    images: int
    backbone_accuracy: float
    seconds: float
    reused: bool
    resumed_from: int = 0

    @property
    def images_per_second(self) -> float:
        done = self.images - self.resumed_from
        return done / self.seconds if self.seconds > 0 and not self.reused else float("nan")


@dataclass
class ExtractResult:
    """The outcome of :func:`extract`."""

    run_dir: Path
    config: cache.RunConfig
    splits: dict[str, SplitSummary]
    device: str
    seconds: float
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "model": self.config.model["spec"],
            "gates": self.config.gates,
            "feature_sizes": dict(zip(self.config.gates, self.config.feature_sizes, strict=True)),
            "device": self.device,
            "seconds": round(self.seconds, 3),
            "cost_unit": UNIT,
            "backbone_macs": self.config.costs["backbone"],
            "splits": {
                s.split: {
                    "data": s.data,
                    "images": s.images,
                    "backbone_accuracy": s.backbone_accuracy,
                    "seconds": round(s.seconds, 3),
                    "images_per_second": None if s.reused else round(s.images_per_second, 1),
                    "reused": s.reused,
                    "resumed_from": s.resumed_from,
                }
                for s in self.splits.values()
            },
            "notes": self.notes,
        }


def extract(
    run_dir: str | Path,
    model: str,
    splits: Mapping[str, str],
    *,
    weights: str | None = None,
    model_kwargs: dict[str, Any] | str | None = None,
    gates: list[str] | None = None,
    pooling: PoolingPolicy | Pooling | None = None,
    preprocess: Mapping[str, Any] | None = None,
    device: str = "auto",
    batch_size: int = 256,
    workers: int | None = None,
    feature_dtype: str = "float32",
    channels_last: bool = True,
    shard_size: int | None = None,
    overwrite: bool = False,
    progress: ProgressFn | None = None,
    trust_code: bool = True,
    factory: Any = None,
) -> ExtractResult:
    """Run the frozen backbone once over each split and cache pooled gate features.

    Args:
        run_dir: directory for the cache (created if needed).
        model: model spec, e.g. ``"cifar_resnet56"`` or ``"torchvision:resnet50"``.
        splits: split name -> data spec, e.g. ``{"train": "data/train", "val": "data/val"}``.
        weights: checkpoint file or ``torchvision:TAG`` (None: random init).
        model_kwargs: constructor keyword arguments.
        gates: gate positions (module names); None: the family's defaults.
        pooling: how stage outputs are pooled: a :class:`PoolingPolicy` (default: ``auto``, the
            finest of 4x4, 2x2, 1x1 average grids within 1024 features per gate) or one
            :class:`Pooling` for every gate.
        preprocess: overrides of the model's preprocessing (``resize``, ``crop``, ``mean``, ``std``).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        batch_size: images per batch.
        workers: loader processes (None: CPU count, at most 8).
        feature_dtype: ``float32`` (default; exact calibration), ``float16`` or ``bfloat16`` (half the disk).
        channels_last: run convolutions in channels-last memory format (faster on most CPUs and GPUs).
        shard_size: samples per shard (None: about 256 MB per shard, 256 to 8192 samples).
        overwrite: replace a run directory made for another model or weights.
        progress: called as ``progress(split, done, total)`` after each batch.
        trust_code: import and call a ``package.module:factory`` model spec (True: the caller
            wrote the spec; pass False when it was read from a file, such as an earlier run.json).
        factory: for a factory spec, the factory itself (a callable, or the Python module
            holding it), used instead of importing the spec's module.

    Example:
        >>> r = extract("runs/r56", "cifar_resnet56", {"train": "cifar/train", "val": "cifar/val"},
        ...             weights="resnet56-4bfd9763.th")  # doctest: +SKIP
        >>> r.splits["val"].backbone_accuracy  # doctest: +SKIP
        0.8302
    """
    t0 = time.perf_counter()
    run_dir = Path(run_dir)
    if not splits:
        raise SpecError("no data to extract; pass --train and --val (and optionally --test)")
    resolve_dtype(feature_dtype, "feature dtype")
    if batch_size < 1:
        raise SpecError(f"--batch-size must be at least 1, got {batch_size}")
    if isinstance(pooling, Pooling):
        pooling = PoolingPolicy(pooling.sizes, pooling.ops)
    policy = pooling or PoolingPolicy()
    dev = resolve_device(device)
    backbone = build_backbone(
        model,
        weights=weights,
        model_kwargs=model_kwargs,
        trust_code=trust_code,
        factory=factory,
        origin=str(cache.run_file(run_dir)),
    )
    backbone.preprocess = backbone.preprocess.override(**dict(preprocess or {}))
    check_input_size(backbone.preprocess, batch_size)
    notes: list[str] = []
    if weights is None:
        notes.append("no --weights given: the backbone is randomly initialised")
    datasets = {name: open_dataset(spec, backbone.preprocess) for name, spec in splits.items()}
    for name, ds in datasets.items():
        empty = getattr(ds, "empty_classes", [])
        if empty and name == "train":
            raise DataError(
                f"class folder{'s' if len(empty) > 1 else ''} {', '.join(empty[:5])} of the train data {ds.spec} "
                "hold no images; a gate cannot learn a class it never sees: add images or remove the folder"
            )
        if empty:
            notes.append(f"warning: the {name} data has no images of class {', '.join(empty[:5])}")
    example = example_input(next(iter(datasets.values())), backbone)
    backbone.input_size = int(example.shape[-1])  # the data's size: default gates are placed by cost at it
    info = describe_run(backbone, gates, policy, example)
    classes = check_classes(datasets, info["num_classes"], str(backbone.spec))
    check_feature_memory(info, {name: len(ds) for name, ds in datasets.items()}, [c.name for c in info["cuts"]])
    config = cache.RunConfig(
        model=backbone.spec.to_dict(),
        weights=backbone.weights.to_dict() if backbone.weights else None,
        gates=[c.name for c in info["cuts"]],
        pooling=policy.to_dict(),
        gate_pooling=[p.to_dict() for p in info["poolings"]],
        preprocess=backbone.preprocess.to_dict(),
        input_size=int(example.shape[-1]),
        feature_dtype=feature_dtype,
        classes=classes,
        layouts=info["layouts"],
        stage_shapes=info["stage_shapes"],
        feature_sizes=info["feature_sizes"],
        costs=info["costs"],
        splits={name: str(ds.spec) for name, ds in datasets.items()},
    )
    with cache.locked(run_dir, "extract"):
        config = prepare_run_dir(run_dir, config, overwrite, notes)
        cache.write_run(run_dir, config)
        # the stages, not only the model: a stage owns copies of buffers it reads with get_attr
        # (Swin's relative position index), which moving the model leaves behind
        stages = [stage.to(dev) for stage in info["stages"]]
        if channels_last:
            stages = [stage.to(memory_format=torch.channels_last) for stage in stages]
        per_sample = 4 * (sum(config.feature_sizes) + config.num_classes) + 16
        shard = shard_size or max(256, min(8192, SHARD_BYTES // per_sample))
        summaries = {}
        for name, ds in datasets.items():
            summaries[name] = _extract_split(
                run_dir,
                name,
                ds,
                backbone,
                stages,
                config,
                dev,
                batch_size,
                workers,
                channels_last,
                shard,
                progress,
                notes,
            )
    return ExtractResult(run_dir, config, summaries, describe(dev), time.perf_counter() - t0, notes)


def _check_finite(batch: dict[str, torch.Tensor], dataset: ImageDataset, index: torch.Tensor) -> None:
    """Refuse NaN or infinite features or logits: no gate can be fitted on them."""
    for key, v in batch.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            row = int((~torch.isfinite(v.reshape(v.shape[0], -1))).any(1).nonzero()[0])
            what = key.removeprefix("features.")
            raise DataError(
                f"the backbone gives NaN or infinite values {'at ' + what if what != key else 'as ' + key} for image "
                f"{int(index[row])} of {dataset.spec}; check the weights, the preprocessing (--mean/--std) and the "
                "feature dtype (float16 overflows above 65504)"
            )


def _extract_split(
    run_dir: Path,
    split: str,
    dataset: ImageDataset,
    backbone: Backbone,
    stages: list[torch.nn.Module],
    config: cache.RunConfig,
    device: torch.device,
    batch_size: int,
    workers: int | None,
    channels_last: bool,
    shard_size: int,
    progress: ProgressFn | None,
    notes: list[str],
) -> SplitSummary:
    t0 = time.perf_counter()
    identity = config.identity()
    fingerprint = dataset.fingerprint()
    index = cache.read_index(run_dir, split)
    if index is not None and (index.identity != identity or index.fingerprint != fingerprint):
        what = "files" if index.identity == identity else "settings"
        after = {"train": "; fit the gates again", "val": "; calibrate again"}.get(split, "") if index.complete else ""
        notes.append(f"the {split} cache was made from other {what}; rebuilding it{after}")
        cache.reset_split(run_dir, split)
        index = None
    problem = cache.damaged_shards(run_dir, split, index) if index is not None else None
    if problem:
        notes.append(f"the {split} cache is damaged ({problem}); rebuilding it")
        cache.reset_split(run_dir, split)
        index = None
    if index is not None and index.complete:
        cached = cache.load_split(run_dir, split, with_features=False, verify=False)  # just verified
        if progress:
            progress(split, len(cached), len(cached))
        return SplitSummary(
            split, str(dataset.spec), len(cached), cached.backbone_accuracy, time.perf_counter() - t0, reused=True
        )
    if index is None:
        cache.reset_split(run_dir, split)
        index = cache.SplitIndex(
            identity,
            str(dataset.spec),
            fingerprint,
            len(dataset),
            shard_size,
            config.classes,
            listing=dataset.listing(),
        )
        cache.write_index(run_dir, split, index)
    resumed = index.done
    dtype = resolve_dtype(config.feature_dtype)
    poolings = [Pooling.from_dict(p) for p in config.gate_pooling]
    writer = cache.SplitWriter(run_dir, split, index)
    loader = make_loader(dataset, batch_size, workers, pin_memory=device.type == "cuda", start=resumed)
    correct = 0
    done = resumed
    if progress:
        progress(split, done, len(dataset))
    try:
        with torch.inference_mode():
            for images, labels, idx in iterate(loader):
                x = backbone.preprocess.normalize(images.to(device, non_blocking=True))
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                batch: dict[str, torch.Tensor] = {}
                for k, stage in enumerate(stages):
                    x = stage(x)
                    if k < len(config.gates):
                        batch[cache.feature_key(config.gates[k])] = (
                            pool(x, poolings[k], config.layouts[k]).to(dtype).cpu()
                        )
                logits = x.float().cpu()
                batch.update(logits=logits, labels=labels, index=idx)
                _check_finite(batch, dataset, idx)
                correct += int((logits.argmax(1) == labels).sum())
                writer.add(batch)
                done += labels.shape[0]
                if progress:
                    progress(split, done, len(dataset))
    except BaseException:
        writer.abort()
        raise
    writer.close()
    seconds = time.perf_counter() - t0
    if resumed:
        notes.append(f"resumed {split} at image {resumed} of {len(dataset)}")
        accuracy = cache.load_split(run_dir, split, with_features=False, verify=False).backbone_accuracy
    else:
        accuracy = correct / max(1, len(dataset))
    return SplitSummary(split, str(dataset.spec), len(dataset), accuracy, seconds, reused=False, resumed_from=resumed)
