"""Configuration: an attribute dictionary, ``key.sub=value`` overrides and config modules.

The config is plain data (numbers, strings, lists, nested dictionaries). It is read once by
``train_with_distillation.py`` and handed down; library modules never import it.
"""

from __future__ import annotations

import ast
import copy
import difflib
import importlib.util
import os
from collections.abc import Iterable, Iterator, Mapping
from types import ModuleType
from typing import Any

from utils.errors import ConfigError

__all__ = ["AttrDict", "ConfigError", "apply_mapping", "apply_overrides", "load_config_file",
           "load_config_module", "require_choice", "set_by_path"]


class AttrDict(dict):
    """A dict whose keys read and write as attributes, nested dicts included."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__()
        for key, value in dict(*args, **kwargs).items():
            self[key] = value

    def __setitem__(self, key: str, value: Any) -> None:
        if isinstance(value, Mapping) and not isinstance(value, AttrDict):
            value = AttrDict(value)
        super().__setitem__(key, value)

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __delattr__(self, name: str) -> None:
        del self[name]

    def to_dict(self) -> dict:
        """Plain nested dicts, lists and scalars, e.g. to store in a checkpoint."""
        return {k: v.to_dict() if isinstance(v, AttrDict) else _plain(v) for k, v in self.items()}


def _plain(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    return value


def flat_keys(cfg: Mapping, prefix: str = "") -> Iterator[str]:
    """Every dotted key of a nested config, leaves and sections alike."""
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        yield dotted
        if isinstance(value, Mapping):
            yield from flat_keys(value, dotted + ".")


def parse_value(text: str) -> Any:
    """A Python literal when the text is one (``0.1``, ``True``, ``[1, 2]``, ``None``), else the
    string."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def set_by_path(cfg: AttrDict, dotted: str, value: Any) -> None:
    """Set an existing key; an unknown key raises ConfigError naming the closest known key."""
    node: Any = cfg
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        if not isinstance(node, Mapping) or part not in node:
            raise ConfigError(_unknown_key_message(cfg, dotted))
        if depth == len(parts) - 1:
            if isinstance(node[part], Mapping) and not isinstance(value, Mapping):
                raise ConfigError(f"config key '{dotted}' is a section; set one of its keys "
                                  f"instead, e.g. {dotted}.{next(iter(node[part]), 'key')}=...")
            if isinstance(node[part], tuple) and isinstance(value, list):
                value = tuple(value)
            node[part] = value
        else:
            node = node[part]


def apply_mapping(cfg: AttrDict, mapping: Mapping[str, Any]) -> AttrDict:
    """Set each dotted key of mapping in cfg (checked as set_by_path checks it); returns cfg."""
    for key, value in mapping.items():
        set_by_path(cfg, key, copy.deepcopy(value))
    return cfg


def require_choice(key: str, value: Any, choices: Iterable[Any]) -> None:
    """Raise ConfigError unless value is one of choices: the one check of every setting that
    takes one of a fixed set of values."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")


def _unknown_key_message(cfg: Mapping, dotted: str) -> str:
    known = list(flat_keys(cfg))
    close = difflib.get_close_matches(dotted, known, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else "; see imagenet_train_cfg.py for the keys"
    return f"unknown config key '{dotted}'{hint}"


def apply_overrides(cfg: AttrDict, overrides: Iterable[str]) -> AttrDict:
    """Apply ``key.sub=value`` arguments in order, in place; returns cfg."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"cannot read override '{item}': write it as key.sub=value")
        set_by_path(cfg, key.strip(), parse_value(text.strip()))
    return cfg


def load_config_module(path: str) -> ModuleType:
    """Execute a config module (a .py file the user writes, as in the original) and return it."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file '{path}' does not exist; pass a path to a .py file "
                          "defining cfg")
    spec = importlib.util.spec_from_file_location(f"_cfg_{abs(hash(os.path.abspath(path)))}", path)
    if spec is None or spec.loader is None:
        raise ConfigError(f"config file '{path}' is not a Python module")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_config_file(path: str) -> AttrDict:
    """Load ``cfg`` from a Python config module (the project's own format, as the original's).

    A module may define ``cfg`` in full, or ``base`` (another config file, relative to it) plus
    ``overrides``, a dict of dotted keys checked against the base like command-line overrides.
    """
    module = load_config_module(path)
    if hasattr(module, "cfg"):
        return copy.deepcopy(AttrDict(module.cfg))
    if hasattr(module, "base"):
        base_path = os.path.join(os.path.dirname(os.path.abspath(path)), module.base)
        return apply_mapping(load_config_file(base_path), getattr(module, "overrides", {}))
    raise ConfigError(f"config file '{path}' defines neither 'cfg' nor 'base'")
