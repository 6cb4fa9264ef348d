"""Loading weights safely: local checkpoints in their common forms, and torchvision's files.

``torch.load(weights_only=True)`` refuses a checkpoint that would run code before any of it runs.
Keys must match the model exactly; nothing is copied into the model until they do.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Mapping
from typing import Any, Union
from urllib.parse import urlparse

import torch
from torch import Tensor, nn

from utils.errors import DataError, first_line

WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # of every key: DDP / DataParallel, torch.compile
# Keys under which training scripts nest the state dict beside the optimizer, epoch, ...
NESTING_KEYS = ("state_dict", "model")
MAX_LISTED_KEYS = 10

PathOrState = Union[str, "os.PathLike[str]", Mapping[str, Any]]


def read_checkpoint(path: str | os.PathLike[str]) -> Any:
    """The unpickled contents of a checkpoint file, tensors on the CPU; DataError if it cannot be
    read or would run code."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"weights file '{path}' does not exist; check the path")
    if os.path.isdir(path):
        raise DataError(f"weights path '{path}' is a directory; pass the checkpoint file inside it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch.load fails in many ways on damaged files (zip, EOF, OS errors)
        # The weights-only unpickler names the global it refused.
        blocked = isinstance(exc, pickle.UnpicklingError) and (
            re.search(r"GLOBAL ([\w.]+)", str(exc))
            or re.search(r"([\w.]+) was not an allowed global", str(exc)))
        if blocked:
            raise DataError(
                f"refused to load '{path}': it holds a Python object ({blocked[1]}) that could run "
                "code when unpickled; load it only if you trust it and re-save just the tensors "
                "with torch.save(model.state_dict(), path)") from None
        raise DataError(f"cannot read '{path}': not a PyTorch checkpoint, or corrupt "
                        f"({first_line(exc)}); is the file complete?") from None


def extract_state_dict(checkpoint: Any, source: str = "checkpoint") -> dict[str, Tensor]:
    """The parameter tensors of a checkpoint, nested under NESTING_KEYS at any depth or not, with
    WRAPPER_PREFIXES removed."""
    state = checkpoint
    while isinstance(state, Mapping):
        nested = next((state[k] for k in NESTING_KEYS if isinstance(state.get(k), Mapping)), None)
        if nested is None:
            break
        state = nested
    if not isinstance(state, Mapping) or not state:
        raise DataError(f"{source} holds no state dict (found {type(state).__name__}); expected "
                        "tensors by parameter name, or a dict with one under "
                        f"{' or '.join(map(repr, NESTING_KEYS))}")
    not_tensors = [k for k, v in state.items() if not isinstance(v, Tensor)]
    if not_tensors:
        raise DataError(f"{source} is not a state dict: {len(not_tensors)} entries are not tensors "
                        f"({_listed(not_tensors)}); expected tensors by parameter name, or a "
                        f"dict with them under {' or '.join(map(repr, NESTING_KEYS))}")
    state = {str(k): v for k, v in state.items()}
    while prefix := next((p for p in WRAPPER_PREFIXES
                          if all(key.startswith(p) for key in state)), None):
        state = {key[len(prefix):]: value for key, value in state.items()}
    return state


def _listed(keys: list[str]) -> str:
    more = len(keys) - MAX_LISTED_KEYS
    return ", ".join(keys[:MAX_LISTED_KEYS]) + (f", ... ({more} more)" if more > 0 else "")


def check_state_dict(model: nn.Module, state: Mapping[str, Tensor], source: str,
                     name: str = "") -> None:
    """Raise DataError, listing the differences, unless state fits model key for key and shape."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [f"{k} {tuple(state[k].shape)} vs {tuple(v.shape)}"
                  for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [f"{len(keys)} {what} ({_listed(keys)})" for what, keys in (
        ("missing keys", missing), ("unexpected keys", unexpected),
        ("shapes differ, checkpoint vs model", mismatched)) if keys]
    if problems:
        raise DataError(f"{source} does not fit {name or type(model).__name__}: "
                        f"{'; '.join(problems)}; check the model name and cfg.model.num_classes")


def load_weights(model: nn.Module, path_or_state: PathOrState, name: str = "") -> nn.Module:
    """Load a checkpoint file or a state mapping into model, strictly, and return it; on any
    error (a DataError) the model is left as it was."""
    if isinstance(path_or_state, Mapping):
        source, checkpoint = "the given state dict", path_or_state
    else:
        source = f"weights file '{os.fspath(path_or_state)}'"
        checkpoint = read_checkpoint(path_or_state)
    state = extract_state_dict(checkpoint, source)
    check_state_dict(model, state, source, name)
    model.load_state_dict(state, strict=True)
    return model


def official_checkpoint(url: str) -> str:
    """The local path of an official weights file in torch hub's cache, downloaded if absent;
    DataError, naming the file and the folder it belongs in, when it cannot be had (offline)."""
    filename = os.path.basename(urlparse(url).path)
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    path = os.path.join(folder, filename)
    if os.path.isfile(path):
        return path
    match = torch.hub.HASH_REGEX.search(filename)
    try:
        os.makedirs(folder, exist_ok=True)
        # Downloads to a temporary file, checks the hash the name carries, then renames: a failed
        # or concurrent download never leaves a partial file under the final name.
        torch.hub.download_url_to_file(url, path, hash_prefix=match.group(1) if match else None)
    except Exception as exc:  # network, disk and hash errors alike mean: fetch it by hand
        raise DataError(f"cannot download the official weights {filename} ({first_line(exc)}); "
                        f"download {url} elsewhere and put it in {folder} "
                        "(set TORCH_HOME to use another cache)") from None
    return path
