"""Checkpoints: atomic writes, safe loading, and the random-number state a resumed run needs.

A file is written to a temporary name in its own folder, flushed to disk and renamed over the
old one, so a crash or a kill at any moment leaves either the previous complete file or the
new complete file. Everything stored is tensors and plain containers, numbers and strings, so
``torch.load(path, weights_only=True)`` reads it without running any pickled code.
"""

from __future__ import annotations

import contextlib
import os
import pickle
import random
import shutil
import tempfile
import zipfile
from collections.abc import Iterator, Mapping
from typing import IO, Any

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pth.tar"
BEST_NAME = "model_best.pth.tar"


class CheckpointError(ValueError):
    """A checkpoint that exists but cannot be used; the message is one line."""


def _fsync_dir(folder: str) -> None:
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


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_write(path: str) -> Iterator[IO[bytes]]:
    """A binary file that replaces path only once the ``with`` block has completed."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        os.chmod(tmp_path, 0o666 & ~_current_umask())  # mkstemp's 0600 would hide results from the group
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp_path)
        raise
    _fsync_dir(folder)


def atomic_save(obj: Any, path: str) -> None:
    """torch.save, atomically."""
    with atomic_write(path) as f:
        torch.save(obj, f)


def atomic_copy(src: str, dst: str) -> None:
    """Copy a file so that dst is always either its old or its new complete content."""
    with open(src, "rb") as source, atomic_write(dst) as target:
        shutil.copyfileobj(source, target, length=16 << 20)


def save_checkpoint(state: Mapping[str, Any], output_dir: str, is_best: bool) -> str:
    """Write ``checkpoint.pth.tar`` and, for the best epoch so far, the same bytes as ``model_best.pth.tar``.

    The best file is written first: a crash between the two writes then leaves the previous
    epoch's checkpoint, whose resumed run trains this epoch again and rewrites the best file.
    The other order would leave a checkpoint whose best error names weights never saved.
    """
    path = os.path.join(output_dir, CHECKPOINT_NAME)
    if is_best:
        best_path = os.path.join(output_dir, BEST_NAME)
        atomic_save(dict(state), best_path)
        atomic_copy(best_path, path)
    else:
        atomic_save(dict(state), path)
    return path


def load_checkpoint(path: str) -> dict[str, Any]:
    """Read a checkpoint onto the CPU with ``weights_only=True``; one-line errors for a bad file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint '{path}' not found; check the path (or train first)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise CheckpointError(f"cannot read checkpoint '{path}' ({first_line}); it may be truncated "
                              f"or not a PyTorch file: point to a complete one") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"checkpoint '{path}' holds a {type(obj).__name__}, not a dict of tensors")
    return dict(obj)


def resolve_resume_path(if_resume: bool, resume_path: str, output_dir: str) -> str | None:
    """The checkpoint to resume from, or None to start afresh.

    ``resume_path='auto'`` takes ``<output_dir>/checkpoint.pth.tar`` when it exists (so a
    preempted job can be relaunched unchanged) and starts afresh otherwise; an explicit path
    must exist.
    """
    if resume_path == "auto":
        candidate = os.path.join(output_dir, CHECKPOINT_NAME)
        return candidate if os.path.isfile(candidate) else None
    if not if_resume:
        return None
    if not resume_path:
        raise FileNotFoundError("optim.if_resume=True needs optim.resume_path=<checkpoint file> "
                                "(or optim.resume_path=auto)")
    if not os.path.isfile(resume_path):
        raise FileNotFoundError(f"resume checkpoint '{resume_path}' not found; fix optim.resume_path "
                                f"or use optim.resume_path=auto")
    return resume_path


def capture_rng_state() -> dict[str, Any]:
    """The states of Python's, NumPy's and torch's generators, as tensors and plain numbers."""
    version, internal, gauss_next = random.getstate()
    kind, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    state: dict[str, Any] = {
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Put back the generator states that capture_rng_state returned."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"].tolist()), py["gauss_next"]))
    npy = state["numpy"]
    np.random.set_state((npy["kind"], npy["keys"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
