"""The one exception family for problems a user can fix, and how any exception is shown in one
line. The entry points turn a ``UserError`` into ``error: <message>`` and exit status 2; any
other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

# How a DataLoader worker's exception comes back to the main process: the same type, its
# message replaced by "Caught <type> in DataLoader worker process N.\nOriginal Traceback ...".
_WORKER_TRACEBACK = "Original Traceback (most recent call last):"


class UserError(Exception):
    """A problem the user can fix; the message is one line that says what to do."""


class ConfigError(UserError):
    """A setting, a combination of settings, or a config file that cannot be used."""


class DataError(UserError):
    """Missing or damaged data: a folder, a list file, an LMDB, an image."""


def one_line(exc: BaseException) -> str:
    """exc's message on one line (its type's name when it has none); of an error raised in a
    DataLoader worker, only the original message, not the worker's traceback."""
    text = str(exc)
    if _WORKER_TRACEBACK in text:
        text = text.strip().splitlines()[-1].removeprefix(f"{type(exc).__name__}: ")
    return " ".join(text.split()) or type(exc).__name__


def first_line(exc: BaseException, limit: int = 200) -> str:
    """``Type: first line of the message``, cut to limit characters: a third-party error quoted
    inside one of ours (torch.load's messages run over many lines)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return f"{type(exc).__name__}: {lines[0][:limit]}" if lines else type(exc).__name__
