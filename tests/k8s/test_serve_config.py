"""k8s/base/serve-config.yaml stays valid for Ray Serve and in step with the code."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml
from ray.serve import Application
from ray.serve.schema import ServeDeploySchema

from services.app import APP_NAME, DEPLOYMENTS, GRPC_SERVICERS
from services.settings import ServeSettings

CONFIG = Path(__file__).resolve().parents[2] / "k8s" / "base" / "serve-config.yaml"


def load() -> dict:
    return yaml.safe_load(CONFIG.read_text())


def test_config_validates_against_the_serve_schema():
    schema = ServeDeploySchema.model_validate(load())
    [app] = schema.applications
    assert app.name == APP_NAME and app.route_prefix == "/"
    assert tuple(d.name for d in app.deployments) == DEPLOYMENTS
    assert schema.grpc_options.grpc_servicer_functions == GRPC_SERVICERS


def test_in_a_pod_http_listens_on_every_ipv4_address_and_grpc_on_every_interface():
    """README, *Deploy on Kubernetes*: in a pod the HTTP proxy listens on 0.0.0.0 and Serve's
    gRPC proxy on every interface: its address is not configurable (no host in its options),
    Ray binds it to [::] (this pins the Ray version's behaviour the README states)."""
    import inspect

    from ray.serve._private.grpc_util import start_grpc_server
    from ray.serve.config import gRPCOptions

    schema = ServeDeploySchema.model_validate(load())
    assert (schema.http_options.host, schema.http_options.port) == ("0.0.0.0", 8000)
    assert schema.grpc_options.port == 9000
    assert "host" not in gRPCOptions.model_fields
    assert 'f"[::]:{grpc_options.port}"' in inspect.getsource(start_grpc_server)


def test_import_path_builds_the_application_from_the_args():
    [app] = load()["applications"]
    module, name = app["import_path"].split(":")
    builder = getattr(importlib.import_module(module), name)
    assert isinstance(builder(app["args"]), Application)
    settings = ServeSettings(**app["args"])
    assert settings.preset == "wan2.1-1.3b" and settings.dtype == "bfloat16"


def test_grpc_servicer_function_is_importable():
    for path in GRPC_SERVICERS:
        module, _, name = path.rpartition(".")
        assert callable(getattr(importlib.import_module(module), name))


def test_gpu_stages_ask_for_gpus_and_scale_on_their_own():
    deployments = {d["name"]: d for d in load()["applications"][0]["deployments"]}
    for name in ("StructureStage", "RefineStage", "DecodePool"):
        assert deployments[name]["ray_actor_options"]["num_gpus"] == 1
        assert deployments[name]["autoscaling_config"]["max_replicas"] >= 2
    assert deployments["Gateway"]["ray_actor_options"].get("num_gpus", 0) == 0


def test_the_session_mailbox_is_one_small_replica():
    """Control calls meet in one place; it needs no GPU and next to no CPU."""
    deployments = {d["name"]: d for d in load()["applications"][0]["deployments"]}
    mailbox = deployments["SessionMailbox"]
    assert mailbox["num_replicas"] == 1 and "autoscaling_config" not in mailbox
    assert mailbox["ray_actor_options"] == {"num_cpus": 0}
