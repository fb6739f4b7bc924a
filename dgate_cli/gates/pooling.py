"""Gate features: how a stage output becomes the vector a gate reads.

A :class:`Pooling` pools a stage output with one or more operations (``avg``, ``max``) to one or more
grid sizes (``1`` = global, ``2`` = 2x2, ...) and concatenates the flattened results. Stage outputs
are ``(N, C, H, W)`` (most CNNs), ``(N, H, W, C)`` (Swin: the family says so), ``(N, L, C)`` (ViT
tokens: the patch tokens form the grid; global pooling averages all tokens) or ``(N, C)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import SpecError

LAYOUTS = ("nchw", "nhwc", "nlc", "nc")


@dataclass(frozen=True)
class Pooling:
    """Which pooled views of a stage output a gate reads.

    Attributes:
        sizes: output grid sizes, e.g. ``(1,)`` or ``(1, 2)``.
        ops: pooling operations, ``avg`` and/or ``max``.

    Example:
        >>> Pooling.parse("1,2", "avg+max").feature_size(channels=16)
        160
    """

    sizes: tuple[int, ...] = (1,)
    ops: tuple[str, ...] = ("avg",)

    def __post_init__(self) -> None:
        if not self.sizes or any(s < 1 for s in self.sizes):
            raise SpecError(f"pool sizes must be positive integers like 1, 2 or 4, got {self.sizes}")
        if not self.ops or any(o not in ("avg", "max") for o in self.ops):
            raise SpecError(f"pool operations must be avg, max or avg+max, got {'+'.join(self.ops)}")

    @classmethod
    def parse(cls, sizes: str | int | tuple[int, ...] = "1", ops: str = "avg") -> Pooling:
        """Parse ``"1,2"`` and ``"avg+max"`` style options."""
        if isinstance(sizes, int):
            size_t: tuple[int, ...] = (sizes,)
        elif isinstance(sizes, tuple):
            size_t = sizes
        else:
            try:
                size_t = tuple(int(s) for s in str(sizes).replace("+", ",").split(",") if s.strip())
            except ValueError:
                raise SpecError(f"--pool must be grid sizes like 1, 2, 4 or 1,2; got '{sizes}'") from None
        return cls(tuple(dict.fromkeys(size_t)), tuple(dict.fromkeys(o.strip() for o in ops.split("+"))))

    def __str__(self) -> str:
        return f"{'+'.join(self.ops)}@{','.join(map(str, self.sizes))}"

    def feature_size(self, channels: int, layout: str = "nchw") -> int:
        """Length of the feature vector for a stage output with ``channels`` channels.

        2-d outputs (``nc``) are used as they are, whatever the pooling.
        """
        if layout == "nc":
            return channels
        return channels * len(self.ops) * sum(s * s for s in self.sizes)

    def to_dict(self) -> dict[str, list]:
        return {"sizes": list(self.sizes), "ops": list(self.ops)}

    @classmethod
    def from_dict(cls, d: dict) -> Pooling:
        return cls(tuple(d["sizes"]), tuple(d["ops"]))

    def macs(self, shape: tuple[int, ...]) -> int:
        """MAC-equivalents of pooling one sample of ``shape`` (each input value read once per view;
        2-d outputs are not pooled)."""
        if len(shape) == 1:
            return 0
        return math.prod(shape) * len(self.ops) * len(self.sizes)


AUTO_SIZES = (4, 2, 1)
DEFAULT_BUDGET = 1024


@dataclass(frozen=True)
class PoolingPolicy:
    """How each gate's pooling is chosen: fixed grid sizes, or ``auto`` within a feature budget.

    ``auto`` gives each gate the finest grid of 4x4, 2x2 and 1x1 whose feature vector
    (channels x cells x operations) fits ``budget`` and whose cells the stage output can fill: fine
    grids where channels are few (early stages of small CNNs), global pooling where they are many
    (ImageNet models), so gates stay cheap to fit, store and run.

    Example:
        >>> p = PoolingPolicy.parse("auto")
        >>> p.for_stage((16, 32, 32), "nchw"), p.for_stage((1024, 14, 14), "nchw")
        (Pooling(sizes=(4,), ops=('avg',)), Pooling(sizes=(1,), ops=('avg',)))
    """

    sizes: tuple[int, ...] | None = None
    ops: tuple[str, ...] = ("avg",)
    budget: int = DEFAULT_BUDGET

    def __post_init__(self) -> None:
        Pooling(self.sizes or (1,), self.ops)  # validates
        if self.budget < 1:
            raise SpecError(f"--pool-budget must be a positive number of features, got {self.budget}")

    @classmethod
    def parse(cls, sizes: str = "auto", ops: str = "avg", budget: int = DEFAULT_BUDGET) -> PoolingPolicy:
        """Parse ``--pool auto|1|2|4|1,2`` and ``--pool-op avg|max|avg+max``."""
        auto = str(sizes).strip() == "auto"
        parsed = Pooling.parse("1" if auto else sizes, ops)
        return cls(None if auto else parsed.sizes, parsed.ops, int(budget))

    def for_stage(self, shape: tuple[int, ...], layout: str) -> Pooling:
        """The pooling of a gate on a stage output of ``shape`` (one sample) and ``layout``.

        Raises:
            SpecError: if fixed grid sizes are finer than the stage output (a 1000x1000 grid on a
                32x32 map would only repeat its values, at a million features a channel).
        """
        if layout == "nc":
            return Pooling((1,), self.ops)
        channels, side = grid_of(shape, layout)
        if self.sizes is not None:
            if max(self.sizes) > side:
                raise SpecError(
                    f"--pool {','.join(map(str, self.sizes))} asks for a {max(self.sizes)}x{max(self.sizes)} grid on a "
                    f"stage output of {'x'.join(map(str, shape))}, which has only {side} cells a side; "
                    f"use grid sizes up to {side} (or --pool auto)"
                )
            return Pooling(self.sizes, self.ops)
        for k in AUTO_SIZES:
            pooling = Pooling((k,), self.ops)
            if k <= side and pooling.feature_size(channels) <= self.budget:
                return pooling
        return Pooling((1,), self.ops)

    def __str__(self) -> str:
        if self.sizes is None:
            return f"{'+'.join(self.ops)}@auto (budget {self.budget})"
        return str(Pooling(self.sizes, self.ops))

    def to_dict(self) -> dict:
        return {
            "sizes": "auto" if self.sizes is None else list(self.sizes),
            "ops": list(self.ops),
            "budget": self.budget,
        }

    @classmethod
    def from_dict(cls, d: dict) -> PoolingPolicy:
        sizes = d.get("sizes", "auto")
        return cls(
            None if sizes == "auto" else tuple(sizes),
            tuple(d.get("ops", ("avg",))),
            int(d.get("budget", DEFAULT_BUDGET)),
        )


def grid_of(shape: tuple[int, ...], layout: str) -> tuple[int, int]:
    """``(channels, cells a side)`` of one sample's stage output of ``shape`` in ``layout``.

    Example:
        >>> grid_of((16, 32, 30), "nchw"), grid_of((197, 768), "nlc")
        ((16, 30), (768, 14))
    """
    if layout == "nchw":
        return shape[0], min(shape[1], shape[2])
    if layout == "nhwc":
        return shape[2], min(shape[0], shape[1])
    if layout == "nlc":  # tokens, maybe with a class token
        return shape[1], math.isqrt(shape[0])
    return shape[0], 1


def layout_of(x: torch.Tensor, channels_last: bool = False) -> str:
    """The layout of a stage output from its rank (``channels_last``: 4-d outputs are NHWC)."""
    return {4: "nhwc" if channels_last else "nchw", 3: "nlc", 2: "nc"}.get(x.dim(), "unsupported")


def _as_grid(x: torch.Tensor, layout: str) -> torch.Tensor:
    if layout == "nchw":
        return x
    if layout == "nhwc":
        return x.permute(0, 3, 1, 2)
    if layout == "nlc":
        n, length, c = x.shape
        for drop in (1, 0):  # class token first (ViT), or a plain grid of tokens
            side = math.isqrt(length - drop)
            if side * side == length - drop and side > 0:
                return x[:, drop:].transpose(1, 2).reshape(n, c, side, side)
        raise SpecError(
            f"cannot pool {length} tokens to a grid; use --pool 1 for token outputs that form no square grid"
        )
    raise SpecError(f"cannot pool a stage output of layout {layout}; choose another gate position")


def pool(x: torch.Tensor, pooling: Pooling, layout: str) -> torch.Tensor:
    """Pool one stage output to ``(N, D)`` gate features.

    Example:
        >>> pool(torch.ones(2, 16, 8, 8), Pooling((1, 2)), "nchw").shape
        torch.Size([2, 80])
    """
    if layout == "nc":
        return x.flatten(1).clone()  # a copy: the next stage may modify its input in place
    parts = []
    for op in pooling.ops:
        for size in pooling.sizes:
            if layout == "nlc" and size == 1:
                parts.append(x.mean(1) if op == "avg" else x.amax(1))
                continue
            grid = _as_grid(x, layout)
            y = F.adaptive_avg_pool2d(grid, size) if op == "avg" else F.adaptive_max_pool2d(grid, size)
            parts.append(y.flatten(1))
    return parts[0] if len(parts) == 1 else torch.cat(parts, 1)
