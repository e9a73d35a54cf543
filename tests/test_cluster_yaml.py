"""cluster.yaml is a valid Ray cluster-launcher config (checked with Ray's own validator, offline)."""

from __future__ import annotations

import copy

import yaml
from conftest import REPO
from ray.autoscaler._private.util import prepare_config, validate_config


def test_cluster_yaml_passes_rays_validator():
    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    full = prepare_config(copy.deepcopy(raw))  # fills the provider's defaults, as `ray up` does
    validate_config(full)  # raises jsonschema.ValidationError on any schema violation
    types = full["available_node_types"]
    assert full["head_node_type"] == "head_cpu" and set(types) == {"head_cpu", "worker_gpu"}
    assert types["worker_gpu"]["node_config"]["InstanceType"].startswith("g")  # a GPU instance family
    assert types["worker_gpu"]["min_workers"] == 0 and types["worker_gpu"]["max_workers"] >= 1
    assert any("pip install -e /home/ubuntu/metatrain" in c for c in full["setup_commands"])
    assert all("--dashboard-host=127.0.0.1" in c for c in full["head_start_ray_commands"] if "--head" in c)


def test_a_broken_cluster_yaml_is_rejected():
    import jsonschema
    import pytest

    raw = yaml.safe_load((REPO / "cluster.yaml").read_text())
    raw["available_node_types"]["worker_gpu"]["min_workers"] = "two"
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(copy.deepcopy(raw)))
