"""Faults injected into a training run's spawned processes (imported by them).

``run(fault, proc, cfg, loss)`` stands in for ``train_with_distillation.run_process``: it plants
the fault in this process, then runs the real one. Faults: ``"disk_full"`` (process 0's file
writes fail with ENOSPC after ``FULL_AFTER`` bytes), ``"user_error"`` and ``"bug"`` (process 1
fails when it starts validating, while process 0 waits for it in a collective).
"""

from __future__ import annotations

import errno
import os
from typing import IO, Any

import train_with_distillation
from utils import files
from utils.errors import DataError

FULL_AFTER = 1 << 20
USER_MESSAGE = "a planted data error in process 1; fix nothing"
BUG_MESSAGE = "a planted internal inconsistency"


class _FillingFile:
    """A file whose writes fail with ENOSPC once FULL_AFTER bytes are written, as on a full disk."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f, self._written = f, 0

    def write(self, data: Any) -> int:
        size = memoryview(data).nbytes
        if self._written + size > FULL_AFTER:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self._written += size
        return self._f.write(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._f, name)

    def __enter__(self) -> _FillingFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def _fail_in_validation(error: BaseException) -> None:
    def failing(*args: Any, **kwargs: Any) -> Any:
        raise error

    train_with_distillation.validate = failing


def run(fault: str, proc: Any, cfg: Any, loss: Any) -> None:
    if fault == "disk_full" and proc.rank == 0:
        create = files._create
        files._create = lambda path: _FillingFile(create(path))
    elif fault == "user_error" and proc.rank == 1:
        _fail_in_validation(DataError(USER_MESSAGE))
    elif fault == "bug" and proc.rank == 1:
        _fail_in_validation(ValueError(BUG_MESSAGE))
    train_with_distillation.run_process(proc, cfg, loss)
