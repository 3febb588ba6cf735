"""The Ray cluster configs that ship in configs/ray pass Ray's own validation, offline (there is
no `ray up --dry-run`): ``prepare_config`` fills in the provider's defaults as `ray up` does, and
``validate_config`` checks the result against Ray's schema."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from ray.autoscaler._private.util import prepare_config, validate_config

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "ray"


@pytest.mark.parametrize("name", ["cluster.yaml", "aws.yaml"])
def test_ray_cluster_configs_pass_rays_validation(name):
    config = yaml.safe_load((CONFIGS / name).read_text())
    validate_config(prepare_config(copy.deepcopy(config)))
    assert any("hived" in command for command in config["setup_commands"])  # every node installs hived
    assert "~/.ray/auth_token" in config["file_mounts"]  # and gets the cluster's token
    broken = {**config, "head_start_ray_commands": "not a list"}
    with pytest.raises(Exception, match="not of type 'array'"):  # the check is real
        validate_config(prepare_config(broken))


def test_the_aws_config_has_a_gpu_worker_type():
    config = yaml.safe_load((CONFIGS / "aws.yaml").read_text())
    workers = {k: v for k, v in config["available_node_types"].items() if k != config["head_node_type"]}
    assert any(v["node_config"]["InstanceType"].startswith(("g", "p")) for v in workers.values())
