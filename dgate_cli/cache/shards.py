"""One split's feature cache (``RUN_DIR/cache/<split>/``): its ``index.json``, the shards written on
a background thread, checks for damaged shards, and reading a split back (the layout is in
:mod:`dgate_cli.cache`)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from .. import _io
from .._version import __version__
from ..errors import CacheMismatchError, NotFittedError
from .run import read_run

CACHE_DIR = "cache"


INDEX_FILE = "index.json"


def split_dir(run_dir: str | Path, split: str) -> Path:
    return Path(run_dir) / CACHE_DIR / split


@dataclass
class SplitIndex:
    """The state of one split's cache (``cache/<split>/index.json``)."""

    identity: str
    data: str
    fingerprint: str
    num_samples: int
    shard_size: int
    classes: list[str]
    shards: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = False
    listing: str | None = None  # which files, without their times (see ImageDataset.listing)

    @property
    def done(self) -> int:
        """Samples in complete shards."""
        return sum(s["count"] for s in self.shards)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SplitIndex:
        fields = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in fields})


def read_index(run_dir: str | Path, split: str) -> SplitIndex | None:
    """The split's index, or None if there is none (or it is unreadable)."""
    path = split_dir(run_dir, split) / INDEX_FILE
    try:
        return SplitIndex.from_dict(_io.read_json(path))
    except (FileNotFoundError, json.JSONDecodeError, TypeError, UnicodeDecodeError):
        return None


def write_index(run_dir: str | Path, split: str, index: SplitIndex) -> None:
    _io.write_json(split_dir(run_dir, split) / INDEX_FILE, index.to_dict())


def reset_split(run_dir: str | Path, split: str) -> None:
    """Delete a split's cache."""
    shutil.rmtree(split_dir(run_dir, split), ignore_errors=True)


def damaged_shards(run_dir: str | Path, split: str, index: SplitIndex, checksums: bool = True) -> str | None:
    """Why the shards the index lists are not usable (None: they are): a missing file, a count or a
    sha256 that differs from the index's record, or shards that do not follow one another."""
    d = split_dir(run_dir, split)
    start = 0
    for shard in index.shards:
        path = d / shard["file"]
        if shard.get("start") != start or not isinstance(shard.get("count"), int):
            return f"{path.name} does not follow the shard before it"
        start += shard["count"]
        if not path.is_file():
            return f"{path.name} is missing"
        if checksums:
            if not shard.get("sha256"):
                return f"{path.name} has no checksum (a cache from an older dgate)"
            if _io.sha256_file(path) != shard["sha256"]:
                return f"{path.name} does not match its checksum (modified or corrupted)"
        try:
            with safe_open(str(path), framework="pt") as f:
                if f.get_slice("labels").get_shape()[0] != shard["count"]:
                    return f"{path.name} holds another number of samples than the index says"
        except (SafetensorError, OSError):
            return f"{path.name} is unreadable"
    if index.complete and start != index.num_samples:
        return f"its shards hold {start} samples, the data has {index.num_samples}"
    return None


def feature_key(gate: str) -> str:
    return f"features.{gate}"


class SplitWriter:
    """Accumulates batches and writes full shards on a background thread.

    At most two shards are held in memory: the one being filled and the one being written.
    """

    def __init__(self, run_dir: str | Path, split: str, index: SplitIndex):
        self.run_dir = Path(run_dir)
        self.split = split
        self.index = index
        self.dir = split_dir(run_dir, split)
        self.dir.mkdir(parents=True, exist_ok=True)
        _io.remove_stale_incomplete(self.dir)
        self._pending: dict[str, list[torch.Tensor]] = {}
        self._count = 0
        self._next_start = index.done
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="dgate-shard")
        self._future: Future[None] | None = None

    def add(self, batch: dict[str, torch.Tensor]) -> None:
        """Add one batch (all tensors with the same first dimension); write shards as they fill."""
        n = next(iter(batch.values())).shape[0]
        for k, v in batch.items():
            self._pending.setdefault(k, []).append(v)
        self._count += n
        while self._count >= self.index.shard_size:
            self._flush(self.index.shard_size)

    def _flush(self, count: int) -> None:
        tensors = {k: torch.cat(v) for k, v in self._pending.items()}
        shard = {k: v[:count] for k, v in tensors.items()}
        rest = {k: [v[count:]] for k, v in tensors.items() if v.shape[0] > count}
        self._pending, self._count = rest, self._count - count
        start = self._next_start
        self._next_start += count
        self._wait()  # the previous shard is listed in the index before this one is named
        entry = {"file": f"shard-{len(self.index.shards):05d}.safetensors", "start": start, "count": count}
        self._future = self._pool.submit(self._write, shard, entry)

    def _write(self, shard: dict[str, torch.Tensor], entry: dict[str, Any]) -> None:
        path = self.dir / entry["file"]
        _io.save_tensors(path, shard, metadata={"dgate_version": __version__, "start": str(entry["start"])})
        entry["sha256"] = _io.sha256_file(path)
        self.index.shards.append(entry)
        write_index(self.run_dir, self.split, self.index)

    def _wait(self) -> None:
        if self._future is not None:
            self._future.result()
            self._future = None

    def close(self) -> None:
        """Write what is left and mark the split complete."""
        try:
            if self._count:
                self._flush(self._count)
            self._wait()
            if self.index.done != self.index.num_samples:
                raise CacheMismatchError(
                    f"the {self.split} cache of {self.run_dir} got {self.index.done} samples for {self.index.num_samples} "
                    f"images; run `dgate extract {self.run_dir}` again"
                )
            self.index.complete = True
            write_index(self.run_dir, self.split, self.index)
        finally:
            self._pool.shutdown(wait=True)

    def abort(self) -> None:
        """Finish the shard being written (it is complete and useful) and stop."""
        try:
            self._wait()
        finally:
            self._pool.shutdown(wait=True)


@dataclass
class SplitFeatures:
    """A split's cached values, in sample order.

    Attributes:
        features: gate name -> (N, D) features.
        logits: (N, K) backbone logits.
        labels: (N,) labels.
        index: (N,) sample index in the dataset.
    """

    features: dict[str, torch.Tensor]
    logits: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def backbone_accuracy(self) -> float:
        return int((self.logits.argmax(1) == self.labels).sum()) / len(self) if len(self) else float("nan")


def load_split(
    run_dir: str | Path,
    split: str,
    gates: Iterable[str] | None = None,
    with_features: bool = True,
    on_shard: Callable[[int, int], None] | None = None,
    verify: bool = True,
) -> SplitFeatures:
    """Read a complete split from the cache (``gates``: only these gates' features).

    Every read checks that the shards follow one another and hold the counts the index records,
    and that the values are finite; ``verify`` also checks each shard's sha256.

    Example:
        >>> sf = load_split("runs/r56", "val")  # doctest: +SKIP
        >>> sf.features["layer1"].shape  # doctest: +SKIP
        torch.Size([5000, 16])
    """
    config = read_run(run_dir)
    index = read_index(run_dir, split)
    if index is None or not index.complete:
        state = "is incomplete" if index else "was not extracted"
        raise NotFittedError(
            f"split '{split}' of {run_dir} {state}; run `dgate extract {run_dir} --{split} DATA` first"
        )
    if index.identity != config.identity():
        raise CacheMismatchError(
            f"split '{split}' of {run_dir} was extracted with other settings; run `dgate extract` again"
        )
    wanted = list(config.gates if gates is None else gates)
    unknown = [g for g in wanted if g not in config.gates]
    if unknown:
        raise CacheMismatchError(
            f"gate {unknown[0]} is not in the cache of {run_dir} (it has {', '.join(config.gates)}); extract it first"
        )
    problem = damaged_shards(run_dir, split, index, checksums=verify)
    if problem:
        raise CacheMismatchError(
            f"the {split} cache of {run_dir} is damaged ({problem}); run `dgate extract {run_dir}` again to rebuild it"
        )
    keys = ["logits", "labels", "index"] + ([feature_key(g) for g in wanted] if with_features else [])
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in keys}
    d = split_dir(run_dir, split)
    for i, shard in enumerate(index.shards):
        path = d / shard["file"]
        try:
            with safe_open(str(path), framework="pt") as f:
                for k in keys:
                    t = f.get_tensor(k)
                    if t.shape[0] != shard["count"]:
                        raise CacheMismatchError(
                            f"{path} holds {t.shape[0]} rows of {k} for {shard['count']} samples; "
                            f"run `dgate extract {run_dir}` again to rebuild it"
                        )
                    parts[k].append(t)
        except (SafetensorError, OSError) as exc:
            raise CacheMismatchError(
                f"{path} is corrupt ({exc}); run `dgate extract {run_dir}` again to rebuild it"
            ) from exc
        if on_shard:
            on_shard(i + 1, len(index.shards))
    cat = {k: torch.cat(v) if v else torch.empty(0) for k, v in parts.items()}
    for k, v in cat.items():
        if v.is_floating_point() and not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v.reshape(v.shape[0], -1))).any(1).sum())
            raise CacheMismatchError(
                f"the {split} cache of {run_dir} holds NaN or infinite {k} for {bad} samples (the backbone produced "
                f"them, or the cache is damaged); check the weights and run `dgate extract {run_dir} --overwrite`"
            )
    return SplitFeatures(
        features={g: cat[feature_key(g)] for g in wanted} if with_features else {},
        logits=cat["logits"],
        labels=cat["labels"],
        index=cat["index"],
    )
