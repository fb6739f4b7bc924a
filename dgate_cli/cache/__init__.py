"""The run directory and its feature cache: run.json, shards and their index, the lock."""

from __future__ import annotations

from .lock import (
    LOCK_FILE,
    locked,
)
from .run import (
    FORMAT_VERSION,
    RUN_FILE,
    RunConfig,
    read_run,
    run_file,
    write_run,
)
from .shards import (
    CACHE_DIR,
    INDEX_FILE,
    SplitFeatures,
    SplitIndex,
    SplitWriter,
    damaged_shards,
    feature_key,
    load_split,
    read_index,
    reset_split,
    split_dir,
    write_index,
)

__all__ = [
    "CACHE_DIR",
    "FORMAT_VERSION",
    "INDEX_FILE",
    "LOCK_FILE",
    "RUN_FILE",
    "RunConfig",
    "SplitFeatures",
    "SplitIndex",
    "SplitWriter",
    "damaged_shards",
    "feature_key",
    "load_split",
    "locked",
    "read_index",
    "read_run",
    "reset_split",
    "run_file",
    "split_dir",
    "write_index",
    "write_run",
]
