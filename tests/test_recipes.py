"""The recipe config modules: each loads, passes the script's checks and builds its loss."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

import train_with_distillation as script
from imagenet_train_cfg import cfg as default_cfg
from knowledge_distiller import DISTLoss, DKDLoss, KDLoss, WSLDLoss, build_loss
from utils.config import load_config_file, load_config_module

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

# file -> (loss class, the loss's settings that make the recipe)
RECIPES = {
    "dkd_r34_r18.py": (DKDLoss, dict(temperature=1.0, alpha=1.0, ce_weight=1.0, dkd_alpha=1.0,
                                     dkd_beta=0.5, warmup_epochs=1.0)),
    "dist_r34_r18.py": (DISTLoss, dict(temperature=1.0, alpha=2.0, ce_weight=1.0, beta=1.0,
                                       gamma=1.0)),
    "kd_ls_r34_r18.py": (KDLoss, dict(temperature=2.0, alpha=9.0, ce_weight=1.0,
                                      standardize=True)),
    "kd_r34_r18.py": (KDLoss, dict(temperature=1.0, alpha=0.5, ce_weight=0.5, standardize=False)),
    "original_exact.py": (WSLDLoss, dict(temperature=2.0, alpha=2.5, ce_weight=1.0)),
}


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_builds_its_loss_and_passes_the_config_check(name):
    cfg = script.resolve_config(load_config_file(str(CONFIGS / name)))
    script.check_config(cfg, world_size=8)
    kind, settings = RECIPES[name]
    loss = build_loss(cfg)
    assert type(loss) is kind
    assert {key: getattr(loss, key) for key in settings} == settings


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_holds_only_keys_that_differ_from_the_defaults(name):
    defaults = copy.deepcopy(default_cfg)
    for key, value in load_config_module(str(CONFIGS / name)).overrides.items():
        node = defaults
        *sections, leaf = key.split(".")
        for section in sections:
            node = node[section]
        assert node[leaf] != value, key


def test_schedules_of_the_recipes():
    dkd = load_config_file(str(CONFIGS / "dkd_r34_r18.py"))
    assert (dkd.data.batch_size, dkd.optim.init_lr, dkd.optim.nesterov) == (512, 0.2, False)
    assert (dkd.optim.lr_step_epochs, dkd.train_params.epochs) == (30, 100)
    assert dkd.optim.weight_decay == 1e-4
    dist = load_config_file(str(CONFIGS / "dist_r34_r18.py"))
    assert (dist.data.batch_size, dist.optim.init_lr, dist.train_params.epochs) == (256, 0.1, 100)
    exact = load_config_file(str(CONFIGS / "original_exact.py"))
    assert (exact.distill.teacher_bn, exact.train_params.epochs) == ("batch", 101)
