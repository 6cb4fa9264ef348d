"""Config: attribute access, key=value overrides with literal parsing, config modules."""

from __future__ import annotations

import copy
import json

import pytest

from imagenet_train_cfg import cfg as default_cfg
from utils.config import (
    AttrDict,
    ConfigError,
    apply_overrides,
    flat_keys,
    load_config_file,
    parse_value,
)


@pytest.fixture()
def cfg() -> AttrDict:
    return copy.deepcopy(default_cfg)


def test_attrdict_nests_and_reads_as_attributes():
    d = AttrDict(a=1, b={"c": {"d": 2}})
    assert d.b.c.d == 2
    d.e = {"f": 3}
    assert isinstance(d.e, AttrDict) and d["e"]["f"] == 3
    with pytest.raises(AttributeError):
        _ = d.missing


def test_to_dict_is_plain_json(cfg):
    plain = cfg.to_dict()
    assert type(plain["data"]) is dict
    assert plain["data"]["input_size"] == [3, 224, 224]
    assert json.loads(json.dumps(plain)) == plain


def test_deepcopy_does_not_share_nested_values(cfg):
    other = copy.deepcopy(cfg)
    other.optim.cosine.restart.lr_period.append(640)
    assert cfg.optim.cosine.restart.lr_period[-1] == 320


@pytest.mark.parametrize("text, value", [
    ("0.1", 0.1), ("3", 3), ("True", True), ("None", None), ("[1, 2]", [1, 2]),
    ("(3, 32, 32)", (3, 32, 32)), ("resnet", "resnet"), ("/data/imagenet", "/data/imagenet"),
    ("1e-4", 1e-4), ("'quoted'", "quoted"),
])
def test_parse_value_reads_literals_else_strings(text, value):
    assert parse_value(text) == value


def test_overrides_set_nested_keys_and_keep_tuples(cfg):
    apply_overrides(cfg, ["optim.init_lr=0.2", "data.input_size=[3, 32, 32]", "net_type=mobilenet",
                          "optim.cosine.use_restart=True"])
    assert cfg.optim.init_lr == 0.2
    assert cfg.data.input_size == (3, 32, 32)
    assert cfg.net_type == "mobilenet"
    assert cfg.optim.cosine.use_restart is True


def test_later_override_wins(cfg):
    apply_overrides(cfg, ["data.batch_size=64", "data.batch_size=128"])
    assert cfg.data.batch_size == 128


def test_unknown_key_names_the_nearest(cfg):
    with pytest.raises(ConfigError, match="unknown config key 'optim.init_l'.*'optim.init_lr'"):
        apply_overrides(cfg, ["optim.init_l=0.2"])
    with pytest.raises(ConfigError,
                       match="unknown config key 'data.batch_sise'.*'data.batch_size'"):
        apply_overrides(cfg, ["data.batch_sise=2"])


def test_malformed_override_and_section_assignment_are_errors(cfg):
    with pytest.raises(ConfigError, match="key.sub=value"):
        apply_overrides(cfg, ["optim.init_lr"])
    with pytest.raises(ConfigError, match="is a section"):
        apply_overrides(cfg, ["optim=3"])


def test_every_key_is_overridable(cfg):
    leaves = [k for k in flat_keys(cfg) if not isinstance(_get(cfg, k), dict)]
    assert "optim.cosine.restart.lr_step" in leaves and "dist.timeout_s" in leaves
    for key in leaves:
        apply_overrides(cfg, [f"{key}={_get(cfg, key)!r}"])
    assert cfg.to_dict() == default_cfg.to_dict()


def test_peers_wait_at_least_as_long_as_torch_does_for_nccl():
    """A first-step compilation, cuDNN autotuning or rank 0's checkpoint write keep the others
    waiting in a collective: the default timeout is PyTorch's own NCCL default, 10 minutes."""
    assert default_cfg.dist.timeout_s >= 600
    assert default_cfg.train_params.compile is False


def _get(cfg, dotted):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def test_config_module_in_full(tmp_path):
    path = tmp_path / "my_cfg.py"
    path.write_text("cfg = {'net_type': 'resnet', 'optim': {'init_lr': 0.5}}\n")
    loaded = load_config_file(str(path))
    assert loaded.optim.init_lr == 0.5 and isinstance(loaded, AttrDict)


def test_config_module_with_base_and_overrides(tmp_path):
    (tmp_path / "base_cfg.py").write_text(
        "cfg = {'data': {'batch_size': 256, 'num_workers': 32}}\n")
    child = tmp_path / "child_cfg.py"
    child.write_text("base = 'base_cfg.py'\noverrides = {'data.batch_size': 64}\n")
    loaded = load_config_file(str(child))
    assert loaded.data.batch_size == 64 and loaded.data.num_workers == 32
    child.write_text("base = 'base_cfg.py'\noverrides = {'data.batch': 64}\n")
    with pytest.raises(ConfigError, match="did you mean 'data.batch_size'"):
        load_config_file(str(child))


def test_bad_config_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(str(tmp_path / "nope.py"))
    empty = tmp_path / "empty.py"
    empty.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="neither 'cfg' nor 'base'"):
        load_config_file(str(empty))
