"""The daemons' configuration files: the shipped examples are valid for their commands, and a
value of the wrong type is an error that names its key."""

from __future__ import annotations

import pytest

from hived.cli import join, serve, train
from hived.config import ConfigError, ModelConfig, TrainConfig, build, read_toml, shipped
from hived.settings import checked
from conftest import hived


@pytest.mark.parametrize("name, command", [("coordinator.toml", serve), ("peer.toml", join)])
def test_the_shipped_configs_are_valid_for_their_commands(name, command):
    values = read_toml(shipped("configs") / name)
    values.pop("model", None)
    assert checked(command, values, name)  # raises ConfigError on any unknown key or wrong type


@pytest.mark.parametrize("line, key", [('lr = "3e-3"', "lr"), ("steps = 1.5", "steps"), ('resume = "yes"', "resume"),
                                       ("port = true", "port"), ('data = [1, 2]', "data")])
def test_a_value_of_the_wrong_type_names_its_key(tmp_path, env, line, key):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(line + "\n")
    proc = hived("train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-ui", env=env, check=False)
    assert proc.returncode == 2 and f"{key} must be" in proc.stderr and "Traceback" not in proc.stderr


def test_a_model_table_of_the_wrong_type_and_a_coordinators_config_are_checked_too():
    with pytest.raises(ConfigError, match="n_layer must be of type int"):
        build(ModelConfig, {"n_layer": "4"}, "[model]")
    with pytest.raises(ConfigError, match="lr must be of type float"):
        build(TrainConfig, {"lr": "3e-3"}, "coordinator config")
    with pytest.raises(ConfigError, match="unknown option"):
        checked(train, {"no_such_option": 1}, "run.toml")
