"""Choosing gate thresholds: pure tensor maths, no IO.

:mod:`.outcomes` holds what each calibration sample does at each gate, :mod:`.cost` what leaving at
each exit costs, :mod:`.search` the cheapest thresholds for an accuracy target (the algorithm is
described there), :mod:`.frontier` the accuracy/cost frontier and :mod:`.guarantees` thresholds
whose target holds on new data."""

from __future__ import annotations

from .cost import CostModel
from .frontier import (
    DEFAULT_DROPS,
    Frontier,
    frontier,
)
from .guarantees import (
    CONFIDENT_STEP,
    binomial_lower,
    binomial_upper,
    drop_upper_bound,
    reserve,
    search_confident,
    search_reserved,
)
from .outcomes import (
    INF,
    GateOutcomes,
    OperatingPoint,
    between,
    decode_threshold,
    discordant,
    encode_threshold,
    f32,
    subset,
)
from .search import (
    check_promise,
    lagrangian_path,
    max_accuracy,
    search,
    sequential,
)

__all__ = [
    "CostModel",
    "CONFIDENT_STEP",
    "DEFAULT_DROPS",
    "Frontier",
    "GateOutcomes",
    "INF",
    "OperatingPoint",
    "between",
    "binomial_lower",
    "binomial_upper",
    "check_promise",
    "decode_threshold",
    "discordant",
    "drop_upper_bound",
    "encode_threshold",
    "f32",
    "frontier",
    "lagrangian_path",
    "max_accuracy",
    "reserve",
    "search",
    "search_confident",
    "search_reserved",
    "sequential",
    "subset",
]
