"""How a stage's scaling settings become Serve deployment options."""

from __future__ import annotations

import pytest

from services.settings import ServeSettings, StageScaling


def test_equal_min_and_max_replicas_deploy_a_fixed_count_that_can_be_changed_in_place():
    options = StageScaling(min_replicas=2, max_replicas=2, num_cpus=1).deployment_options()
    assert options == {
        "num_replicas": 2,
        "max_ongoing_requests": 16,
        "ray_actor_options": {"num_cpus": 1, "num_gpus": 0.0},
    }


def test_a_replica_range_autoscales():
    scaling = StageScaling(min_replicas=0, max_replicas=4, initial_replicas=1, num_gpus=1)
    options = scaling.deployment_options(default_ongoing=8)
    assert "num_replicas" not in options and options["max_ongoing_requests"] == 8
    assert options["autoscaling_config"] == {
        "min_replicas": 0, "max_replicas": 4, "target_ongoing_requests": 2.0, "initial_replicas": 1,
    }  # fmt: skip
    # scale to zero with no range is still autoscaling (a fixed count of 0 serves nothing)
    idle = StageScaling(min_replicas=0, max_replicas=1).deployment_options()
    assert idle["autoscaling_config"]["min_replicas"] == 0


def test_autoscaling_delays_and_window_pass_through_to_serve():
    from ray.serve.config import AutoscalingConfig

    scaling = StageScaling(
        min_replicas=1, max_replicas=2, target_ongoing_requests=1,
        upscale_delay_s=1, downscale_delay_s=8, look_back_period_s=3,
    )  # fmt: skip
    config = scaling.deployment_options()["autoscaling_config"]
    assert (config["upscale_delay_s"], config["downscale_delay_s"]) == (1, 8)
    parsed = AutoscalingConfig(**config)  # what Serve makes of it
    assert (parsed.upscale_delay_s, parsed.look_back_period_s) == (1, 3)
    assert (
        "upscale_delay_s"
        not in StageScaling(max_replicas=2).deployment_options()["autoscaling_config"]
    )


def test_diagonal_steps_reach_the_served_preset(monkeypatch):
    from services.settings import ServeSettings

    assert ServeSettings().get_preset().options.diagonal_steps == (5, 4, 3, 2)
    monkeypatch.setenv("HISTREAM_DIAGONAL_STEPS", "[4, 3, 1]")
    assert ServeSettings().get_preset().options.diagonal_steps == (4, 3, 1)
    monkeypatch.setenv("HISTREAM_DIAGONAL_STEPS", "[2, 2]")
    with pytest.raises(ValueError, match=r"must decrease strictly: entry 1 \(2\)"):
        ServeSettings()


def test_every_setting_comes_from_the_environment(monkeypatch):
    """README: `HISTREAM_<FIELD>` for the fields of services/settings.py (nested ones with
    `__`), `HISTREAM_STORAGE_<FIELD>` for storage; a bad value is refused naming the field."""
    from services.settings import ServeSettings

    for name, value in {
        "HISTREAM_MAX_SESSIONS_PER_REPLICA": "7", "HISTREAM_TORCH_THREADS": "3",
        "HISTREAM_SESSION_IDLE_TIMEOUT_S": "2.5", "HISTREAM_FPS": "24",
        "HISTREAM_PHASE_BATCH_SIZE": "8", "HISTREAM_DECODE__MAX_REPLICAS": "5",
        "HISTREAM_STORAGE_ENDPOINT": "s3.example:9000", "HISTREAM_STORAGE_BUCKET": "vids",
        "HISTREAM_STORAGE_TIMEOUT_S": "12",
    }.items():  # fmt: skip
        monkeypatch.setenv(name, value)
    s = ServeSettings()
    assert (s.max_sessions_per_replica, s.torch_threads, s.session_idle_timeout_s, s.fps) == (
        7, 3, 2.5, 24,
    )  # fmt: skip
    assert s.phase_batch_size == 8 and s.decode.max_replicas == 5
    assert (s.storage.endpoint, s.storage.bucket, s.storage.timeout_s) == (
        "s3.example:9000", "vids", 12,
    )  # fmt: skip
    monkeypatch.setenv("HISTREAM_MAX_SESSIONS_PER_REPLICA", "0")
    with pytest.raises(ValueError, match="max_sessions_per_replica"):
        ServeSettings()


def test_the_frame_rate_is_the_presets_unless_set(monkeypatch):
    """README: HISTREAM_FPS is the output frame rate, by default the preset's (16 for Wan2.1)."""
    monkeypatch.delenv("HISTREAM_FPS", raising=False)
    assert ServeSettings(preset="wan2.1-1.3b").frame_rate == 16
    monkeypatch.setenv("HISTREAM_FPS", "24")
    assert ServeSettings(preset="wan2.1-1.3b").frame_rate == 24


def test_the_grpc_host_moves_the_grpc_listener_alone():
    settings = ServeSettings(http_host="127.0.0.1", grpc_host="0.0.0.0")
    assert (settings.http_host, settings.grpc_bind_host) == ("127.0.0.1", "0.0.0.0")
    assert ServeSettings(http_host="10.0.0.5").grpc_bind_host == "10.0.0.5"  # none: HTTP's
