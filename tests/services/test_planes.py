"""Who can reach what: the service's listeners bind to the configured host (127.0.0.1 by
default), a local Ray runs with token authentication, and a session's control RPCs need the
session's own token."""

from __future__ import annotations

import ipaddress
import os
import stat
from pathlib import Path

import grpc
import pytest
from ray._private.authentication.authentication_utils import is_token_auth_enabled

from protos.histream.v1 import api_pb2
from tests.services.service_calls import PROMPT, grpc_stub


def listeners(port: int) -> set[str]:
    """Local addresses listening on TCP `port`, read from /proc/net/tcp{,6}."""
    found = set()
    for name in ("tcp", "tcp6"):
        table = Path(f"/proc/net/{name}")
        if not table.exists():
            continue
        for line in table.read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state != "0A" or int(hex_port, 16) != port:  # 0A: LISTEN
                continue
            raw = bytes.fromhex(address)
            # /proc prints each 32-bit word little-endian
            raw = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            ip = ipaddress.ip_address(raw)
            found.add(str(getattr(ip, "ipv4_mapped", None) or ip))  # ::ffff:127.0.0.1 is IPv4
    return found


def test_http_and_grpc_listen_on_loopback_only(service):
    assert listeners(service.settings.http_port) == {"127.0.0.1"}
    assert listeners(service.settings.grpc_port) == {"127.0.0.1"}


def test_the_local_ray_requires_its_token(service):
    assert is_token_auth_enabled()
    token = Path(os.path.expanduser("~")) / ".ray" / "auth_token"
    assert token.is_file() and stat.S_IMODE(token.stat().st_mode) == 0o600


def test_session_control_needs_the_sessions_token(service):
    stub, md = grpc_stub(service)
    request = api_pb2.StreamSessionRequest(prompt=PROMPT, size="128x64", num_frames=201)
    call = stub.StreamSession(request, metadata=md, timeout=120)
    started = next(e for e in call if e.WhichOneof("event") == "started").started
    sid, token = started.session_id, started.session_token
    try:
        update = api_pb2.UpdateSessionPromptRequest(session_id=sid, prompt="a cat")
        with pytest.raises(grpc.RpcError) as err:  # no token: the client's mistake
            stub.UpdateSessionPrompt(update, metadata=md)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "session_token is required" in err.value.details()
        for rpc, message in (
            (stub.UpdateSessionPrompt, update),
            (stub.CloseSession, api_pb2.CloseSessionRequest(session_id=sid)),
        ):
            message.session_token = "somebody-elses-guess"
            with pytest.raises(grpc.RpcError) as err:  # as if the session did not exist
                rpc(message, metadata=md)
            assert err.value.code() == grpc.StatusCode.NOT_FOUND
        close = api_pb2.CloseSessionRequest(session_id=sid, session_token=token)
        assert stub.CloseSession(close, metadata=md).closed
        kinds = [e.WhichOneof("event") for e in call]
        assert kinds[-1] == "ended"
    finally:
        call.cancel()
