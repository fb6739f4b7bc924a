"""Gates: pooled stage features (pooling), the linear estimators (linear) and the exit rule (scores)."""

from __future__ import annotations

from .linear import (
    DEFAULT_C_GRID,
    LOSSES,
    CSearch,
    LinearGate,
    choose_C,
    holdout_split,
)
from .pooling import (
    AUTO_SIZES,
    DEFAULT_BUDGET,
    LAYOUTS,
    Pooling,
    PoolingPolicy,
    grid_of,
    layout_of,
    pool,
)
from .scores import (
    SCORES,
    gate_scores,
)

__all__ = [
    "AUTO_SIZES",
    "CSearch",
    "DEFAULT_BUDGET",
    "DEFAULT_C_GRID",
    "LAYOUTS",
    "LOSSES",
    "LinearGate",
    "Pooling",
    "PoolingPolicy",
    "SCORES",
    "choose_C",
    "gate_scores",
    "grid_of",
    "holdout_split",
    "layout_of",
    "pool",
]
