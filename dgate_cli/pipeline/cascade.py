"""``dgate cascade``: a run directory that chains extracted, fitted networks (members) into a cascade.

::

    CASCADE_RUN/cascade.json        the members (run directories, their cache identities and gates'
                                    sha256), the classes and the splits they share
    CASCADE_RUN/policies.*          written by ``dgate fit`` (learned exit policies)
    CASCADE_RUN/calibration.json    written by ``dgate calibrate``

A cascade runs member 0 with its gates, then, for the samples none of its exits took, member 1 from
the image, and so on (Bolukbasi et al. 2017). Each member keeps its own cache: a cascade run
directory holds no features, only what ties the members together (:class:`Member`), and its
calibration reads the members' caches through :mod:`.exits`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import _io, cache
from .._version import __version__
from ..data.datasets import open_dataset
from ..data.preprocess import Preprocess
from ..errors import CacheMismatchError, DataError, DgateError, MissingFileError, NotFittedError, SpecError
from .extract_setup import class_difference
from .fit import GATES_TENSORS, FittedGates, read_gates

CASCADE_JSON = "cascade.json"
FORMAT_VERSION = 1


@dataclass(frozen=True)
class Member:
    """One network of a cascade: its run directory, cache settings and fitted gates.

    Attributes:
        gates: the fitted gates the cascade uses inside this member (all, or none).
        gates_sha256: of its ``gates.safetensors``, read once (what the cascade's identity covers).
    """

    name: str
    run_dir: Path
    config: cache.RunConfig
    fitted: FittedGates
    gates: list[str]
    gates_sha256: str

    @property
    def preprocess(self) -> Preprocess:
        return Preprocess.from_dict(self.config.preprocess)

    @property
    def backbone_cost(self) -> float:
        return float(sum(s["macs"] for s in self.config.costs["stages"]))

    @property
    def input_values(self) -> int:
        """Values in one input image (channels x height x width): what normalising it costs."""
        return 3 * self.config.input_size**2


def is_cascade(run_dir: str | Path) -> bool:
    """Whether ``run_dir`` is a cascade run directory (made by ``dgate cascade``)."""
    return (Path(run_dir) / CASCADE_JSON).is_file()


def create(
    out_run: str | Path, members: list[str | Path], *, member_gates: bool = True, overwrite: bool = False
) -> dict[str, Any]:
    """Write ``out_run/cascade.json`` for the extracted, fitted run directories ``members``
    (cheapest first; the last one is the reference). Returns what was written.

    Raises, with one line naming the fix: fewer than two members, a member not extracted or not
    fitted, members with other classes or class order, splits extracted from other files, members
    that see images at other sizes (a cascade takes one image format; each member normalises it
    its own way), or an ``out_run`` that holds something else.

    Example:
        >>> create("runs/r20-r56", ["runs/r20", "runs/r56"])  # doctest: +SKIP
    """
    out_run = Path(out_run)
    if len(members) < 2:
        raise SpecError(
            f"a cascade needs at least two member run directories, got {len(members)}; "
            "e.g. `dgate cascade runs/r20-r56 runs/r20 runs/r56`"
        )
    paths = [Path(m).resolve() for m in members]
    if len(set(paths)) != len(paths):
        raise SpecError("a cascade's members must be different run directories; each is given once")
    if out_run.resolve() in paths:
        raise SpecError(f"{out_run} is one of the members; give the cascade a new directory")
    if cache.run_file(out_run).is_file():
        raise CacheMismatchError(f"{out_run} is a network's run directory; give the cascade a new directory")
    if is_cascade(out_run) and not overwrite:
        raise CacheMismatchError(f"{out_run} already holds a cascade; pass --overwrite to replace it")
    if out_run.exists() and not out_run.is_dir():
        raise SpecError(f"{out_run} is a file; give the cascade a new directory")
    loaded = [read_member(p) for p in paths]
    first_run, first = paths[0], loaded[0][0]
    for p, (config, _) in zip(paths[1:], loaded[1:], strict=True):
        if config.classes != first.classes:
            raise DataError(
                f"{class_difference(str(p), config.classes, str(first_run), first.classes)}; "
                "a cascade's members must predict the same classes in the same order"
            )
        seen = _view(config)
        if seen != _view(first):
            raise SpecError(
                f"{p} sees images as {_describe(seen)} and {first_run} as {_describe(_view(first))}: a cascade "
                "takes one image format; extract the members with the same --input-size, --resize, --crop and channels"
            )
    splits = _shared_splits(paths)
    data = {
        "format_version": FORMAT_VERSION,
        "dgate_version": __version__,
        "members": [
            {
                "name": _unique_name(p, paths),
                "run_dir": str(p),
                "identity": config.identity(),
                "gates_sha256": _io.sha256_file(p / GATES_TENSORS),
                "gates": list(fitted.names) if member_gates else [],
            }
            for p, (config, fitted) in zip(paths, loaded, strict=True)
        ],
        "classes": first.classes,
        "splits": splits,
    }
    out_run.mkdir(parents=True, exist_ok=True)
    _io.write_json(out_run / CASCADE_JSON, data)
    return data


def read_members(run_dir: str | Path) -> list[Member]:
    """The members of the cascade in ``run_dir``; a clear error if one changed since ``dgate cascade``."""
    run_dir = Path(run_dir)
    path = run_dir / CASCADE_JSON
    try:
        data = _io.read_json(path)
    except FileNotFoundError:
        raise MissingFileError(
            f"{run_dir} is not a cascade; make one with `dgate cascade {run_dir} RUN RUN ...`"
        ) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CacheMismatchError(f"{path} is corrupt ({exc}); run `dgate cascade` again with --overwrite") from exc
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        raise CacheMismatchError(f"{path} is not a cascade file this dgate reads; run `dgate cascade` again")
    members = []
    for entry in data["members"]:
        p = Path(entry["run_dir"])
        config, fitted = read_member(p)
        sha = _io.sha256_file(p / GATES_TENSORS)
        if config.identity() != entry["identity"] or sha != entry["gates_sha256"]:
            raise CacheMismatchError(
                f"member {p} was extracted or fitted again since `dgate cascade`; run "
                f"`dgate cascade {run_dir} ... --overwrite` again"
            )
        members.append(Member(entry["name"], p, config, fitted, list(entry["gates"]), sha))
    return members


def read_cascade(run_dir: str | Path) -> dict[str, Any]:
    """``cascade.json`` as written (see :func:`create`)."""
    return _io.read_json(Path(run_dir) / CASCADE_JSON)


def identity(members: list[Member]) -> str:
    """sha256 of what a cascade's results depend on: each member's cache (settings and the images
    of each split) and gates."""
    key = []
    for m in members:
        splits = {s: getattr(cache.read_index(m.run_dir, s), "fingerprint", None) for s in ("train", "val", "test")}
        key.append([m.config.identity(), splits, m.gates, m.gates_sha256])
    return _io.sha256_text(json.dumps(key))


def read_member(p: Path) -> tuple[cache.RunConfig, FittedGates]:
    """A member's run settings and fitted gates; a clear error if it is not one."""
    if not p.is_dir():
        raise MissingFileError(f"member {p} does not exist; pass run directories made by `dgate extract`")
    if is_cascade(p):
        raise SpecError(f"member {p} is itself a cascade; list its members instead")
    config = cache.read_run(p)
    try:
        fitted = read_gates(p)
    except NotFittedError:
        raise NotFittedError(f"member {p} is not fitted; run `dgate fit {p}` first") from None
    return config, fitted


def _view(config: cache.RunConfig) -> tuple[Any, ...]:
    pre = Preprocess.from_dict(config.preprocess)
    return (config.input_size, pre.resize, pre.crop, pre.interpolation if pre.resize else None, len(pre.mean))


def _describe(view: tuple[Any, ...]) -> str:
    size, resize, crop, interp, channels = view
    steps = [f"resize {resize} ({interp})" if resize else None, f"crop {crop}" if crop else None]
    return f"{size}x{size} px with {channels} channels" + "".join(f", {s}" for s in steps if s)


def _shared_splits(paths: list[Path]) -> dict[str, str]:
    """The splits every member extracted, with their common fingerprint; an error where they differ."""
    shared: dict[str, str] = {}
    for split in ("train", "val", "test"):
        indexes = [cache.read_index(p, split) for p in paths]
        if any(i is None or not i.complete for i in indexes):
            continue
        lists = {_listing(p, i, split) for p, i in zip(paths, indexes, strict=True)}  # type: ignore[arg-type]
        if len(lists) > 1 or len({i.num_samples for i in indexes}) > 1:  # type: ignore[union-attr]
            raise DataError(
                f"the members' '{split}' splits were extracted from different files (their file lists differ); "
                f"extract every member from the same --{split} directory"
            )
        shared[split] = lists.pop()
    if "val" not in shared:
        raise NotFittedError(
            "the members do not all have a complete 'val' split to calibrate on; run `dgate extract RUN --val DATA` on each"
        )
    return shared


def _listing(run_dir: Path, index: cache.SplitIndex, split: str) -> str:
    """Which files a split was extracted from (recorded at extraction; for an older cache, read
    from its data folder now)."""
    if index.listing:
        return index.listing
    try:
        return open_dataset(index.data, Preprocess()).listing()
    except (DgateError, OSError) as exc:
        raise DataError(
            f"cannot tell which files split '{split}' of {run_dir} was extracted from ({exc}); "
            f"run `dgate extract {run_dir} --{split} DATA --overwrite`"
        ) from None


def _unique_name(p: Path, paths: list[Path]) -> str:
    same = [q for q in paths if q.name == p.name]
    return p.name if len(same) == 1 else f"{p.name}{paths.index(p)}"
