"""Configs: every shipped YAML loads; typos, wrong types and bad --set give one line naming the field."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import REPO

from metatrain.pipeline.config import Config, ConfigError, config_from_dict, load_config

CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_the_required_configs_ship():
    names = {p.name for p in CONFIGS}
    assert {"omniglot_maml_5w1s.yaml", "omniglot_fomaml_5w1s.yaml", "omniglot_reptile_5w1s.yaml",
            "omniglot_maml_20w1s.yaml", "sinusoid_maml.yaml"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads_and_round_trips(path):
    cfg = load_config(path)
    assert isinstance(cfg, Config)
    assert config_from_dict(cfg.to_dict()) == cfg


def test_values_of_a_shipped_config():
    cfg = load_config(REPO / "configs" / "omniglot_maml_20w1s.yaml")
    got = (cfg.data.ways, cfg.algorithm.name, cfg.algorithm.inner_steps, cfg.algorithm.inner_lr)
    assert got == (20, "maml", 5, 0.1)
    rep = load_config(REPO / "configs" / "omniglot_reptile_5w1s.yaml")
    assert rep.algorithm.reptile_adam_betas == (0.0, 0.999) and rep.optim.name == "sgd"


def test_overrides():
    cfg = load_config(REPO / "configs" / "omniglot_fomaml_5w1s.yaml",
                      ["train.steps=7", "optim.lr=3e-4", "workers.count=1", "tracking.register=omni",
                       "train.time_budget_s=null", "algorithm.msl_weights=null"])
    assert (cfg.train.steps, cfg.optim.lr, cfg.workers.count, cfg.tracking.register) == (7, 3e-4, 1, "omni")
    assert load_config(None, ["optim.clip_norm=1"]).optim.clip_norm == 1.0


@pytest.mark.parametrize("overrides, message", [
    (["train.stpes=3"], "unknown config key 'train.stpes' \\(did you mean 'train.steps'\\?\\)"),
    (["trian.steps=3"], "unknown config key 'trian' \\(did you mean 'train'\\?\\)"),
    (["train.steps=ten"], "train.steps must be int, got 'ten' \\(str\\)"),
    (["train.steps=2.5"], "train.steps must be int, got 2.5"),
    (["workers.placement=pack"], "workers.placement must be one of .* got 'pack' \\(did you mean 'PACK'\\?\\)"),
    (["algorithm.name=mamll"], "algorithm.name: unknown 'mamll' \\(did you mean 'maml'\\?"),
    (["algorithm.inner_steps=0"], "algorithm.inner_steps: must be >= 1"),
    (["algorithm.inner_lr=-0.1"], "algorithm.inner_lr: must be a finite number > 0"),
    (["optim.lr=0"], "optim.lr must be a positive number"),
    (["data.ways=0"], "data.ways must be >= 1"),
    (["workers.gpus=1.5"], "workers.gpus must be a fraction of one GPU or a whole number"),
    (["train.mode=asynchronous"], "train.mode must be one of 'sync' \\| 'async'"),
    (["trainsteps=3"], "unknown config key 'trainsteps'"),
    (["train.steps"], "invalid --set 'train.steps': expected SECTION.FIELD=VALUE"),
    (["=3"], "invalid --set '=3'"),
    (["train..steps=3"], "invalid --set 'train..steps=3'"),
    (["train.steps.x=1"], "train.steps must be int, got {'x': 1}"),
    (["train=5"], "train must be a mapping, got int"),
    (["model.name=mlp"], "model.name must be 'conv4' for algorithm.name=maml on image data"),
    (["data.dataset=sinusoid"], "model.name must be 'mlp' for data.dataset=sinusoid"),
    (["algorithm.reptile_adam_betas=[0.9]"], "algorithm.reptile_adam_betas must be a list of 2 values"),
])
def test_bad_overrides(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(ConfigError, match="config file .*nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  steps: [1, 2\n")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML at line"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="must hold a mapping of sections"):
        load_config(scalar)
    typo = tmp_path / "typo.yaml"
    typo.write_text("data:\n  wyas: 5\n")
    with pytest.raises(ConfigError, match="unknown config key 'data.wyas' \\(did you mean 'data.ways'\\?\\)"):
        load_config(typo)
    assert Path(typo).read_text() == "data:\n  wyas: 5\n"
    nested = tmp_path / "nested.yaml"
    nested.write_text("train:\n  steps: 5\n")
    with pytest.raises(ConfigError, match="invalid --set 'train.steps.x=1': train.steps is not a section"):
        load_config(nested, ["train.steps.x=1"])


def test_bare_on_and_off_mean_the_words_where_a_field_takes_them(tmp_path):
    # PyYAML reads a bare on/off as true/false; a field whose choices are the words gets the words back.
    assert load_config(None, ["data.rotations=off"]).data.rotations == "off"
    (tmp_path / "c.yaml").write_text("data:\n  rotations: on\n")
    assert load_config(tmp_path / "c.yaml").data.rotations == "on"
    with pytest.raises(ConfigError, match="data.within_alphabet must be bool"):
        load_config(None, ["data.within_alphabet=sometimes"])


def test_augmentation_and_within_alphabet_fields():
    cfg = load_config(None, ["data.augment=true", "data.augment_rotation=5", "data.within_alphabet=true"])
    aug = cfg.data.affine()
    assert (aug.rotation, aug.shear, aug.scale, aug.translate, aug.p) == (5.0, 0.3, 0.2, 2.0, 0.5)
    assert load_config(None, []).data.affine() is None and not load_config(None, []).data.within_alphabet
    for override, message in (("data.augment_scale=1.0", "data.augment_scale must be < 1"),
                              ("data.augment_rotation=-1", "data.augment_rotation must be a finite number >= 0"),
                              ("data.augment_p=2", r"data.augment_p must be in \[0, 1\], got 2")):
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])
    with pytest.raises(ConfigError, match="data.augment needs image episodes; data.dataset=sinusoid has none"):
        load_config(REPO / "configs" / "sinusoid_maml.yaml", ["data.augment=true"])
