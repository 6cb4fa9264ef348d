"""Configuration: an attribute dictionary, ``key.sub=value`` overrides and config modules.

The config is plain data, read once by the script and handed down; the library never imports it.
"""

from __future__ import annotations

import ast
import copy
import difflib
import importlib.util
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from types import ModuleType
from typing import Any

from utils.errors import ConfigError


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

    __setattr__ = __setitem__
    __delattr__ = dict.__delitem__

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to_dict(self) -> dict:
        """Plain nested dicts, lists and scalars, e.g. to store in a checkpoint."""
        return {k: v.to_dict() if isinstance(v, AttrDict) else _plain(v) for k, v in self.items()}


def _plain(value: Any) -> Any:
    return [_plain(v) for v in value] if isinstance(value, (tuple, list)) else value


def flat_keys(cfg: Mapping, prefix: str = "") -> Iterator[str]:
    """Every dotted key of a nested config, leaves and sections alike."""
    for key, value in cfg.items():
        dotted = f"{prefix}{key}"
        yield dotted
        if isinstance(value, Mapping):
            yield from flat_keys(value, dotted + ".")


def parse_value(text: str) -> Any:
    """A Python literal when the text is one, else the string itself."""
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return text


def set_by_path(cfg: AttrDict, dotted: str, value: Any) -> None:
    """Set an existing key; an unknown key raises ConfigError naming the closest known key."""
    *sections, key = dotted.split(".")
    node: Any = cfg
    for section in sections:
        node = node.get(section) if isinstance(node, Mapping) else None
    if not isinstance(node, Mapping) or key not in node:
        close = difflib.get_close_matches(dotted, list(flat_keys(cfg)), n=1, cutoff=0.5)
        hint = (f"; did you mean '{close[0]}'?" if close
                else "; see imagenet_train_cfg.py for the keys")
        raise ConfigError(f"unknown config key '{dotted}'{hint}")
    if isinstance(node[key], Mapping) and not isinstance(value, Mapping):
        raise ConfigError(f"config key '{dotted}' is a section; set one of its keys "
                          f"instead, e.g. {dotted}.{next(iter(node[key]), 'key')}=...")
    if isinstance(node[key], tuple) and isinstance(value, list):
        value = tuple(value)
    node[key] = value


def apply_mapping(cfg: AttrDict, mapping: Mapping[str, Any]) -> AttrDict:
    """Set each dotted key of mapping in cfg (checked as set_by_path checks it); returns cfg."""
    for key, value in mapping.items():
        set_by_path(cfg, key, copy.deepcopy(value))
    return cfg


def require_choice(key: str, value: Any, choices: Sequence[Any]) -> None:
    """The one check of every setting that takes one of a fixed set of values."""
    if value not in choices:
        raise ConfigError(f"{key} must be one of {', '.join(map(str, choices))}, got {value!r}")


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
    """``cfg`` from a config module that defines it in full, or ``base`` (another config file,
    relative to it) plus ``overrides``, dotted keys checked as command-line overrides are."""
    module = load_config_module(path)
    if hasattr(module, "cfg"):
        return copy.deepcopy(AttrDict(module.cfg))
    if hasattr(module, "base"):
        base_path = os.path.join(os.path.dirname(os.path.abspath(path)), module.base)
        return apply_mapping(load_config_file(base_path), getattr(module, "overrides", {}))
    raise ConfigError(f"config file '{path}' defines neither 'cfg' nor 'base'")
