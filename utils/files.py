"""Files that are never seen half-written.

A file is written under a temporary name in its own folder, flushed to disk and renamed over
the old one, so a crash or a kill at any moment leaves either the previous complete file or
the new complete file.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from typing import IO


def fsync_dir(folder: str) -> None:
    """Make a rename in folder durable (not possible, nor needed, on every platform)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[IO[bytes]]:
    """A binary file that replaces path only once the ``with`` block has completed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp_path = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
    # Created with mode 0666 less the process's umask, as open() creates files: the result is
    # readable by whoever may read the folder's other outputs.
    fd = os.open(tmp_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise
    fsync_dir(folder)


def atomic_write_text(path: str, text: str) -> None:
    """Replace path's content with text (UTF-8, '\\n' line ends), atomically."""
    with atomic_write(path) as f:
        f.write(text.encode("utf-8"))


def atomic_copy(src: str, dst: str) -> None:
    """Copy a file so that dst is always either its old or its new complete content."""
    with open(src, "rb") as source, atomic_write(dst) as target:
        shutil.copyfileobj(source, target, length=16 << 20)
