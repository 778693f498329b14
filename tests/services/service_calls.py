"""Clients, waits and references for the tests against the running service (the `service`
fixture: a local Ray, apps "histream" and "local"): OpenAI and gRPC clients, stage handles and
their stats, /metrics, and the in-process generator's latents to compare with."""

from __future__ import annotations

import functools
import json
import time
import warnings

import grpc
import httpx
import openai
from ray import serve

from histream_model.components import load_components
from histream_model.generator import HiStreamGenerator
from protos.histream.v1 import api_pb2_grpc
from services.link.replicas import stage_link
from services.sessions import StageHandles

PROMPT = "a red fox running through fresh snow"

OTHER = "a blue whale under the northern lights"

W, H = 192, 128


def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def wait_video(api: openai.OpenAI, video_id: str, timeout: float = 120):
    deadline = time.monotonic() + timeout
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        while True:
            video = api.videos.retrieve(video_id)
            if video.status in ("completed", "failed") or time.monotonic() > deadline:
                return video
            time.sleep(0.2)


def stage(name: str, app: str = "histream"):
    return serve.get_deployment_handle(name, app_name=app)


def stage_calls() -> dict:
    return {
        name: stage(name).stats.remote().result()["calls"]
        for name in ("StructureStage", "RefineStage", "DecodePool")
    }


def held_sessions(app: str = "histream") -> int:
    steps = ("StepStage1", "StepStage2") if app == "histream" else ()
    return sum(
        stage(name, app).stats.remote().result()["sessions"]
        for name in ("StructureStage", "RefineStage", "DecodePool", *steps)
    )


def wait_until(predicate, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.1)
    return predicate()


_COMPONENTS = {}


def in_process(
    mode: str,
    frames: int,
    seed: int = 0,
    prompt_at: int | None = None,
    transition: tuple = (1, "linear"),
):
    """Latents per chunk from the in-process generator; optionally OTHER from chunk `prompt_at`
    on, reached over `transition` (chunks, interpolation[, recache])."""
    if "c" not in _COMPONENTS:
        _COMPONENTS["c"] = load_components("tiny", device="cpu")
    c = _COMPONENTS["c"]
    gen = HiStreamGenerator(c.dit, c.preset, mode)
    state = gen.start(c.text.encode([PROMPT]), H, W, frames, seed)
    out = []
    while not state.done:
        if prompt_at is not None and state.next_chunk == prompt_at:
            gen.set_prompt(state, c.text.encode([OTHER]), *transition)
        out.append(gen.step(state).latents)
    return out


def metric(url: str, name: str, labels: str = "") -> float:
    text = httpx.get(f"{url}/metrics").text
    for line in text.splitlines():
        if line.startswith(name + labels + " ") or line.startswith(f"{name}{labels} "):
            return float(line.split()[-1])
    raise AssertionError(f"{name}{labels} not in /metrics")


OTHER_SEEDS = ["diagonal", "histream-diagonal", "hiar", "histream-hiar"]


def name_field(deployment: str) -> str:
    return {"StructureStage": "structure", "RefineStage": "refine", "DecodePool": "decode"}[
        deployment
    ]


def transport_handles(service, transport: str) -> StageHandles:
    """The stages of app "histream" through Serve's handles, or of app "local" (whose refine
    stage calls its structure stage over gRPC too) through the grpc transport's links."""
    if transport == "handle":
        return StageHandles(stage("StructureStage"), stage("RefineStage"), stage("DecodePool"))
    settings = service.settings.model_copy(update={"stage_transport": "grpc"})
    link = functools.partial(stage_link, settings)
    return StageHandles(
        link(stage("StructureStage", "local"), "DenoiseStage", "TextEncoder"),
        link(stage("RefineStage", "local"), "DenoiseStage"),
        link(stage("DecodePool", "local"), "DecodeStage"),
    )


def ws_events(ws, until: str = "session.ended"):
    """Yield (json message, bytes or None) pairs until a message of type `until`."""
    while True:
        message = json.loads(ws.recv(timeout=60))
        data = ws.recv(timeout=60) if message["type"] in ("init", "chunk") else None
        yield message, data
        if message["type"] == until or message["type"] == "error":
            return


# the two apps: "histream" calls its stages through Serve's handles, "local" over gRPC
TRANSPORT_APPS = {"handle": "histream", "grpc": "local"}


def step_runs() -> list[int]:
    """RunPhase calls each step worker has served."""
    calls = [stage(f"StepStage{w}").stats.remote().result()["calls"] for w in (1, 2)]
    return [c.get("RunPhase", 0) for c in calls]


def grpc_stub(service, app: str = "histream"):
    channel = grpc.insecure_channel(service.grpc_target)
    return api_pb2_grpc.HiStreamStub(channel), (("application", app),)
