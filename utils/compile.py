"""``train_params.compile``: torch.compile for the student and the teacher's forward.

In place (``nn.Module.compile``), so state-dict keys stay torchvision's (no ``_orig_mod.``) and a
run resumes with compilation on or off. Failures surface at the first forward of each new shape
or mode, deep in training, as one line that says how to train without it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from utils.errors import ConfigError, first_line


def backend_of(setting: bool | str) -> str | None:
    """The torch.compile backend a ``train_params.compile`` value asks for; None for none. True
    is inductor (a C++ compiler on the CPU); 'aot_eager' traces the same graphs without
    generating code, a quick check of the path on any machine."""
    if setting is False:
        return None
    if setting is True:
        return "inductor"
    backends = torch._dynamo.list_backends(exclude_tags=())
    if setting in backends:
        return setting
    raise ConfigError("train_params.compile must be True, False or a torch.compile backend "
                      f"({', '.join(backends)}), got {setting!r}")


def compile_in_place(networks: list[nn.Module | None], backend: Any = "inductor") -> None:
    """Compile each network's forward (None entries are skipped), keeping the module itself."""
    for network in networks:
        if network is not None:
            network.compile(backend=backend)


@contextmanager
def compile_failures_as_errors() -> Iterator[None]:
    """Raise ConfigError, one line, for a failed compilation inside the block (only
    torch.compile raises TorchDynamoException, so no other error is relabelled)."""
    try:
        yield
    except torch._dynamo.exc.TorchDynamoException as exc:
        cause = getattr(exc, "inner_exception", None) or exc
        raise ConfigError(f"torch.compile failed ({first_line(cause)}); "
                          "train without it with train_params.compile=False") from None
