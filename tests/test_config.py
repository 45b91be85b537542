"""The typed config: YAML bases, --set overrides, and errors that name the key."""
from __future__ import annotations

import pytest

from launch.config import Config, apply_override, load_config
from sparse_comm.schema import ConfigError
from tests.launch_helpers import REPO


def test_quickstart_overrides_its_base():
    cfg = load_config(REPO / "configs/quickstart.yaml")
    assert isinstance(cfg, Config)
    assert cfg.train.epochs == 2 and cfg.model.name == "lenet300" and cfg.train.lr == 0.1
    assert cfg.dgc is None and cfg.sparsity is None


def test_set_overrides_parse_yaml_values():
    cfg = load_config(REPO / "configs/quickstart.yaml",
                      ["train.lr=0.05", "train.max_steps=7", "wandb.group=g", "train.nesterov=true",
                       "out_dir=/tmp/x"])
    assert (cfg.train.lr, cfg.train.max_steps, cfg.wandb.group) == (0.05, 7, "g")
    assert cfg.train.nesterov is True and cfg.out_dir == "/tmp/x"


def test_int_is_accepted_where_float_is_expected_but_not_the_reverse():
    assert load_config(None, ["train.lr=1"]).train.lr == 1.0
    with pytest.raises(ConfigError, match="'train.epochs': must be int, got 2.5"):
        load_config(None, ["train.epochs=2.5"])


def test_a_float_in_exponent_notation_without_a_dot_is_a_float():
    # YAML 1.1 (PyYAML) reads 1e-3 as a string; 1.0e-3 as a float
    cfg = load_config(REPO / "configs/mnist_lenet300_dgc.yaml", ["train.lr=1e-3",
                                                                "dgc.density=5E-4"])
    assert (cfg.train.lr, cfg.dgc.density) == (1e-3, 5e-4)
    with pytest.raises(ConfigError, match="'train.lr': must be float, got 'fast'"):
        load_config(None, ["train.lr=fast"])


@pytest.mark.parametrize("override", ["train.lr=.inf", "train.weight_decay=.nan", "train.lr=nan",
                                      "dgc.density=-.inf", "dgc.density=inf"])
def test_a_float_key_must_be_finite(override):
    with pytest.raises(ConfigError, match="must be a finite number"):
        load_config(REPO / "configs/mnist_lenet300_dgc.yaml", [override])


def test_a_value_cannot_be_treated_as_a_section():
    data = {"train": {"lr": 0.1}}
    with pytest.raises(ConfigError, match="'train.lr': is a value, not a section"):
        apply_override(data, "train.lr.x=1")


def test_circular_base_is_reported(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="circular base"):
        load_config(tmp_path / "a.yaml")


def test_invalid_yaml_is_reported_with_its_line(tmp_path):
    (tmp_path / "bad.yaml").write_text("train:\n  lr: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")


@pytest.mark.parametrize("path", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    """Each config the README names (and any other in configs/) parses and validates."""
    cfg = load_config(path)
    assert cfg.model.name and cfg.train.epochs >= 1
