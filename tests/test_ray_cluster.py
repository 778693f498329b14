"""ray_cluster.yaml stays a valid Ray cluster-launcher config, in step with the Serve config."""

from __future__ import annotations

from pathlib import Path

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTER = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
SERVE = yaml.safe_load((ROOT / "k8s" / "base" / "serve-config.yaml").read_text())


def test_validates_against_the_schema_ray_ships():
    # as `ray up` does: the provider's defaults filled in, then ray/autoscaler/ray-schema.json
    # and ray's own checks (node types, head type, worker bounds)
    validate_config(prepare_config(CLUSTER))


def test_the_image_is_the_ray_version_the_project_pins():
    lines = (ROOT / "pyproject.toml").read_text().splitlines()
    pinned = next(line for line in lines if "ray[serve]==" in line)
    version = pinned.split("==")[1].strip('",')
    assert CLUSTER["docker"]["image"].startswith(f"rayproject/ray:{version}-")


def test_every_stage_replica_has_a_node_type_that_fits_it_and_scales():
    """Each deployment's actor options fit one kind of node; the GPU stages only a GPU
    worker type with room to scale, the gateway and mailbox the head."""
    types = CLUSTER["available_node_types"]
    [app] = SERVE["applications"]
    for deployment in app["deployments"]:
        options = deployment["ray_actor_options"]
        demand = {"CPU": options.get("num_cpus", 1), "GPU": options.get("num_gpus", 0)}
        demand.update(options.get("resources", {}))
        fits = [
            name
            for name, node in types.items()
            if all(node["resources"].get(k, 0) >= v for k, v in demand.items() if v)
        ]
        assert fits, f"{deployment['name']} fits no node type"
        if demand["GPU"]:
            assert len(fits) == 1 and fits[0] != CLUSTER["head_node_type"], deployment["name"]
            node = types[fits[0]]
            replicas = deployment["autoscaling_config"]["max_replicas"]
            assert node["max_workers"] * node["resources"]["GPU"] >= replicas / 2
    assert sum(t.get("max_workers", 0) for t in types.values()) <= CLUSTER["max_workers"]


def test_the_head_deploys_the_projects_serve_config_and_setup_builds_the_stubs():
    start = " ".join(CLUSTER["head_start_ray_commands"])
    assert "serve deploy k8s/base/serve-config.yaml" in start
    setup = " ".join(CLUSTER["setup_commands"])
    assert "pip install --quiet -e ~/histream" in setup and "grpc_tools.protoc" in setup
    assert CLUSTER["file_mounts"] == {"~/histream": "."}
