"""Bad input over every transport, as a hostile but honest client sends it: each case is refused
with the same error (status, code, `param`) whatever the transport, nothing reaches a stage, and
no request ever answers 500."""

from __future__ import annotations

import json

import grpc
import httpx
import pytest
from websockets.sync.client import connect

from protos.histream.v1 import api_pb2
from tests.services.service_calls import PROMPT, grpc_stub, held_sessions, metric, stage_calls

# (fields, param, words of the message): invalid on every transport that carries the field
BAD_FIELDS = [
    ({"seconds": True}, "seconds", "must be a whole number, got a boolean"),
    ({"seconds": 5.0}, "seconds", "must be a whole number, got a number with a fraction"),
    ({"seconds": "5.0"}, "seconds", "written with the digits 0-9"),
    ({"seconds": "1_0"}, "seconds", "written with the digits 0-9"),
    ({"seconds": "\u0665"}, "seconds", "written with the digits 0-9"),  # Arabic-Indic five
    ({"seconds": "9" * 40}, "seconds", "at most 19"),
    ({"seed": True}, "seed", "must be a whole number, got a boolean"),
    ({"seed": 1.5}, "seed", "got a number with a fraction"),
    ({"seed": "-1"}, "seed", "written with the digits 0-9"),
    ({"size": "\uff11\uff19\uff12x128"}, "size", "must look like 'WIDTHxHEIGHT'"),  # full width
    ({"size": "32x32"}, "size", "too small for mode 'histream+'"),
    ({"size": "32x16", "mode": "no-drc"}, "size", "too small for mode 'no-drc'"),
    ({"size": 192}, "size", "must be a string, got int"),
    ({"prompt": "a red\x00 fox"}, "prompt", "control character U+0000"),
    ({"prompt": "a red\x1b[31m fox"}, "prompt", "control character U+001B"),
    ({"prompt": "\ud800 fox"}, "prompt", "lone surrogate"),
    ({"prompt": 42}, "prompt", "must be a string, got int"),
    ({"prompt": ["a", "fox"]}, "prompt", "must be a string, got a list"),
    ({"model": {"id": "tiny"}}, "model", "must be a string, got an object"),
    ({"mode": "histream", "model": "no-drc"}, "mode", "contradicts model 'no-drc'"),
]


def body(fields: dict) -> dict:
    return {"prompt": PROMPT, **fields}


def raw_json(fields: dict) -> bytes:
    # json.dumps escapes a lone surrogate as \ud800, which is what a client would send
    return json.dumps(body(fields)).encode()


@pytest.mark.parametrize(("fields", "param", "words"), BAD_FIELDS)
def test_http_json(service, fields, param, words):
    before = stage_calls()
    response = httpx.post(
        f"{service.url}/v1/videos", content=raw_json(fields),
        headers={"content-type": "application/json"},
    )  # fmt: skip
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (
        param,
        "invalid_value",
        "invalid_request_error",
    )
    assert words in error["message"]
    assert stage_calls() == before


FORMABLE = [case for case in BAD_FIELDS if all(isinstance(v, str) for v in case[0].values())]


@pytest.mark.parametrize(("fields", "param", "words"), FORMABLE)
def test_http_multipart(service, fields, param, words):
    form = {k: (None, str(v).encode("utf-8", "surrogatepass")) for k, v in body(fields).items()}
    response = httpx.post(f"{service.url}/v1/videos", files=form)
    assert response.status_code == 400, response.text
    if surrogate(fields):  # not UTF-8 once encoded: refused as bytes
        words = "form field prompt is not valid UTF-8"
    assert response.json()["error"]["param"] == param and words in response.text


@pytest.mark.parametrize(
    ("content", "ctype", "status", "words"),
    [
        (b"[" * 100_000 + b"]" * 100_000, "application/json", 400, "deeper than 16 levels"),
        (b"[1, 2]", "application/json", 400, "must be a JSON object"),
        (b'{"prompt": ', "application/json", 400, "not valid JSON"),
        (b'{"prompt": "\xff"}', "application/json", 400, "not valid UTF-8"),
        (b'{"prompt": "' + b"x" * (2 << 20) + b'"}', "application/json", 413, "limit"),
        (
            b'--B\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nred \xff fox\r\n'
            b"--B--\r\n",
            "multipart/form-data; boundary=B", 400, "form field prompt is not valid UTF-8",
        ),
        (
            b'--B\r\nContent-Disposition: form-data; name="input_reference"; filename="a.png"'
            b"\r\n\r\nPNG\r\n--B--\r\n",
            "multipart/form-data; boundary=B", 400, "files are not supported",
        ),
    ],
)  # fmt: skip
def test_http_bodies(service, content, ctype, status, words):
    before = stage_calls()
    response = httpx.post(
        f"{service.url}/v1/videos", content=content, headers={"content-type": ctype}
    )
    assert response.status_code == status and words in response.json()["error"]["message"]
    assert stage_calls() == before


@pytest.mark.parametrize(
    ("query", "param", "words"),
    [
        ({"limit": "abc"}, "limit", "written with the digits 0-9"),
        ({"limit": "0"}, "limit", "limit=0 must be in [1, 100]"),
        ({"limit": "101"}, "limit", "limit=101 must be in [1, 100]"),
        ({"order": "up"}, "order", "order 'up' must be 'asc' or 'desc'"),
        ({"after": "video_nope"}, "after", "no video with id 'video_nope'"),
    ],
)
def test_http_list_queries(service, query, param, words):
    response = httpx.get(f"{service.url}/v1/videos", params=query)
    assert response.status_code in (400, 404)
    error = response.json()["error"]
    assert error["param"] == param and words in error["message"]


def ws_url(service) -> str:
    return f"ws://127.0.0.1:{service.settings.http_port}/v1/sessions"


def surrogate(fields: dict) -> bool:
    return any(isinstance(v, str) and "\ud800" in v for v in fields.values())


# a session is as long as `num_frames` says, not `seconds`: the same bad values there
SESSION_FIELDS = [
    ({"num_frames" if k == "seconds" else k: v for k, v in f.items()},
     "num_frames" if p == "seconds" else p, w)
    for f, p, w in BAD_FIELDS
]  # fmt: skip


@pytest.mark.parametrize(("fields", "param", "words"), SESSION_FIELDS)
def test_websocket_start(service, fields, param, words):
    before = stage_calls()
    with connect(ws_url(service)) as ws:
        ws.send(json.dumps({"type": "start", **body(fields)}))
        error = json.loads(ws.recv(timeout=30))
    assert error["type"] == "error" and error["param"] == param and words in error["message"]
    assert stage_calls() == before


@pytest.mark.parametrize(
    ("first", "words"),
    [
        (b"\x00\x01binary", "binary messages are not accepted"),
        ("not json", "not valid JSON"),
        ('{"type": "begin"}', 'the first message must be {"type": "start"'),
    ],
)
def test_websocket_first_message(service, first, words):
    with connect(ws_url(service)) as ws:
        ws.send(first)
        error = json.loads(ws.recv(timeout=30))
    assert error["type"] == "error" and words in error["message"]


def test_websocket_malformed_messages_mid_session_get_errors_and_the_session_completes(service):
    start = {"type": "start", "prompt": PROMPT, "size": "128x64", "num_frames": 33}
    errors, ended = [], None
    with connect(ws_url(service)) as ws:
        ws.send(json.dumps(start))
        sent = False
        while ended is None:
            message = ws.recv(timeout=60)
            if isinstance(message, bytes):
                continue
            event = json.loads(message)
            if event["type"] == "session.started" and not sent:
                sent = True
                ws.send(b"\x00binary")
                ws.send("{not json")
                ws.send(json.dumps({"type": "prompt", "prompt": 5}))
                ws.send(json.dumps({"type": "prompt", "prompt": "a\x00b"}))
                ws.send(json.dumps({"type": "dance"}))
            elif event["type"] == "error":
                errors.append(event)
            elif event["type"] == "session.ended":
                ended = event
    assert ended["reason"] == "completed"
    # prompt updates are answered as they finish, so the order may vary
    params = sorted(str(e.get("param")) for e in errors)
    assert params == ["None", "None", "prompt", "prompt", "type"]
    assert any("binary messages are not accepted" in e["message"] for e in errors)


def test_websocket_close_after_malformed_messages_still_works(service):
    start = {"type": "start", "prompt": PROMPT, "size": "128x64", "num_frames": 201}
    with connect(ws_url(service)) as ws:
        ws.send(json.dumps(start))
        while json.loads(ws.recv(timeout=60))["type"] != "session.started":
            pass
        ws.send(b"\x01")
        ws.send(json.dumps({"type": "close"}))
        reasons = []
        while True:
            message = ws.recv(timeout=60)
            if isinstance(message, str) and json.loads(message)["type"] == "session.ended":
                reasons.append(json.loads(message)["reason"])
                break
    assert reasons == ["closed"]


def grpc_fields(fields: dict) -> dict | None:
    """The case as CreateVideoRequest fields, or None where proto types cannot carry it."""
    out = {}
    for key, value in body(fields).items():
        kind = int if key == "seed" else str
        if not isinstance(value, kind) or isinstance(value, bool):
            return None
        out[key] = value
    return out


# a lone surrogate cannot be put in a proto string: test_grpc_undecodable_bytes sends such bytes
CARRIED = [c for c in BAD_FIELDS if grpc_fields(c[0]) is not None and not surrogate(c[0])]


@pytest.mark.parametrize(("fields", "param", "words"), CARRIED)
def test_grpc_create_video(service, fields, param, words):
    stub, md = grpc_stub(service)
    before = stage_calls()
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateVideo(api_pb2.CreateVideoRequest(**grpc_fields(fields)), metadata=md)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()
    assert stage_calls() == before


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b"\xff\xff\xff\xff", "not a valid histream.v1.CreateVideoRequest"),
        (b"\x0a\x02\xff\xfe", "not a valid histream.v1.CreateVideoRequest"),  # prompt not UTF-8
    ],
)
def test_grpc_undecodable_bytes(service, raw, words):
    channel = grpc.insecure_channel(service.grpc_target)
    call = channel.unary_unary(
        "/histream.v1.HiStream/CreateVideo",
        request_serializer=lambda b: b,
        response_deserializer=api_pb2.Video.FromString,
    )
    with pytest.raises(grpc.RpcError) as err:
        call(raw, metadata=(("application", "histream"),))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and words in err.value.details()


def test_grpc_messages_over_4_mib_are_refused_before_the_gateway(service):
    """README, *gRPC*: messages are limited to gRPC's default 4 MiB."""
    stub, md = grpc_stub(service)
    before = stage_calls()
    request = api_pb2.CreateVideoRequest(prompt="x" * (4 * 1024 * 1024 + 1))
    with pytest.raises(grpc.RpcError) as err:
        stub.CreateVideo(request, metadata=md)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "4194304" in err.value.details()  # the limit, in bytes
    assert stage_calls() == before


def test_grpc_too_small_session_is_invalid_not_internal(service):
    stub, md = grpc_stub(service)
    request = api_pb2.StreamSessionRequest(prompt=PROMPT, size="32x32")
    with pytest.raises(grpc.RpcError) as err:
        list(stub.StreamSession(request, metadata=md))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "too small" in err.value.details()


def test_nothing_left_allocated(service):
    assert held_sessions() == 0
    assert metric(service.url, "histream_active_sessions", '{kind="session"}') == 0


def test_websocket_messages_faster_than_max_message_rate_are_refused(service):
    """The `local` app allows 2 messages a second (bursts of 2): of 3 sent at once the first
    two are acted on (here: refused for their bad prompt), the third is refused for the rate,
    and the session goes on."""
    url = service.local_url.replace("http://", "ws://") + "/v1/sessions"
    start = {"type": "start", "prompt": PROMPT, "size": "128x64", "num_frames": 57}
    events = []
    with connect(url) as ws:
        ws.send(json.dumps(start))
        while json.loads(ws.recv(timeout=60))["type"] != "session.started":
            pass
        for prompt in (5, 6, "a fish"):
            ws.send(json.dumps({"type": "prompt", "prompt": prompt}))
        while not events or events[-1]["type"] != "session.ended":
            message = ws.recv(timeout=60)
            if isinstance(message, str):
                events.append(json.loads(message))
    errors = [e for e in events if e["type"] == "error"]  # in the order they were answered
    bad_prompt = [e for e in errors if e["param"] == "prompt"]
    too_fast = [e for e in errors if e["code"] == "quota_exceeded"]
    assert len(bad_prompt) == 2 and len(too_fast) == 1 and len(errors) == 3, errors
    assert "max_message_rate" in too_fast[0]["message"]
    assert events[-1]["reason"] == "completed"
