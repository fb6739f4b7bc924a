"""The run directory and its feature cache: run.json, shards and their index, the lock.

::

    RUN_DIR/run.json                        what was extracted: model, weights sha256, gates, pooling,
                                            preprocessing, classes, stage and gate costs
    RUN_DIR/cache/<split>/index.json        data spec, file-list fingerprint, shards done so far
    RUN_DIR/cache/<split>/shard-NNNNN.safetensors
                                            features.<gate> (N, D), logits (N, K), labels (N,), index (N,)
    RUN_DIR/gates.safetensors, gates.json   written by ``dgate fit``
    RUN_DIR/calibration.json                written by ``dgate calibrate``
    RUN_DIR/.dgate.lock                     held by the dgate process writing the directory

Every file is written to a temporary name and renamed, and ``index.json`` lists a shard only after
the shard is complete, so an interrupted extraction resumes from its last complete shard."""

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
