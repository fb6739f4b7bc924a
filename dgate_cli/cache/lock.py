"""The run directory's lock (``RUN_DIR/.dgate.lock``): one dgate process writes a run directory at
a time (the layout is in :mod:`dgate_cli.cache`)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from pathlib import Path

from ..errors import BusyError

try:
    import fcntl
except ImportError:  # not POSIX: no lock
    fcntl = None  # type: ignore[assignment]


LOCK_FILE = ".dgate.lock"


@contextlib.contextmanager
def locked(run_dir: str | Path, command: str) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block: one dgate process writes a run directory at a time.

    Two extractions into one directory would write shards of the same names; the second process
    gets a :class:`~dgate_cli.errors.BusyError` that names the process holding the lock. The lock
    is the operating system's (``flock``), so a killed process releases it.
    """
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    path = d / LOCK_FILE
    f = open(path, "a+", encoding="utf-8")  # noqa: SIM115 - held open for the whole block
    try:
        if fcntl is not None:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                raise BusyError(f"{d} is in use by {holder}; wait for it to finish, or use another RUN_DIR") from None
        f.seek(0)
        f.truncate()
        f.write(f"dgate {command} (pid {os.getpid()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
        f.flush()
        yield
    finally:
        f.close()  # releases the lock
