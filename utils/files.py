"""Files that are never seen half-written: written under a temporary name in their own folder,
flushed to disk and renamed over the old one, so a crash at any moment leaves the old or the new
complete file. A full disk is a one-line ``ConfigError``, and the old file stays.
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from typing import IO, Callable

from utils.errors import ConfigError

# Errors that mean the disk (or the user's quota on it) has no room for what was written.
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def fsync_dir(folder: str) -> None:
    """Make a rename in folder durable (not possible, nor needed, on every platform)."""
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def is_disk_full(exc: BaseException) -> bool:
    """Whether exc, or an error it was raised while handling, says the disk is full (torch.save's
    zip writer answers a full disk with a RuntimeError raised while the OSError is handled)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError) and current.errno in _NO_SPACE:
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def free_bytes(folder: str) -> int:
    """The bytes an unprivileged process may still write on folder's file system."""
    return shutil.disk_usage(folder).free


def _create(path: str) -> IO[bytes]:
    """A new binary file at path (never an existing one), with mode 0666 less the umask, as
    open() creates files: readable by whoever may read the folder's other outputs."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    return os.fdopen(os.open(path, flags, 0o666), "wb")


@contextlib.contextmanager
def atomic_write(path: str, needed: Callable[[], int] | None = None) -> Iterator[IO[bytes]]:
    """A binary file that replaces path only once the ``with`` block has completed. needed,
    called only when the disk is full, gives the file's full size for the message."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp_path = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    try:
        with _create(tmp_path) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException as exc:
        written = 0
        with contextlib.suppress(OSError):
            written = os.path.getsize(tmp_path)
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        if is_disk_full(exc):
            size = f"{needed()} bytes" if needed else f"more than {written} bytes"
            raise ConfigError(f"no space left to write '{path}': it needs {size} and "
                              f"{free_bytes(folder)} bytes are free there; free some space or "
                              f"choose a folder on a larger disk") from None
        raise
    fsync_dir(folder)


def low_space_warning(folder: str, needed: int, what: str) -> str | None:
    """A one-line warning when folder's disk has less than needed bytes free, else None."""
    free = free_bytes(folder)
    if free >= needed:
        return None
    return (f"'{folder}' has {free / 2**20:.0f} MiB free, less than {what} "
            f"({needed / 2**20:.0f} MiB): free some space or choose a folder on a larger disk")


def atomic_write_text(path: str, text: str) -> None:
    """Replace path's content with text (UTF-8, '\\n' line ends), atomically."""
    with atomic_write(path) as f:
        f.write(text.encode("utf-8"))


def atomic_copy(src: str, dst: str) -> None:
    """Copy a file so that dst is always either its old or its new complete content."""
    with open(src, "rb") as source, atomic_write(dst, lambda: os.path.getsize(src)) as target:
        shutil.copyfileobj(source, target, length=16 << 20)
