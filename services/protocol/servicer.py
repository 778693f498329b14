"""How Serve's gRPC proxy registers `histream.v1.HiStream` (`GRPC_SERVICERS` in app.py).

The generated `add_HiStreamServicer_to_server` parses each request in the proxy and answers
bytes that do not parse with a bare error before the gateway sees them. This one registers the
same methods with a tolerant parser: undecodable bytes (garbage, invalid UTF-8 in a string)
reach the gateway as an `UndecodableRequest`, which answers INVALID_ARGUMENT naming the problem.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass

from protos.histream.v1 import api_pb2

SERVICE = api_pb2.DESCRIPTOR.services_by_name["HiStream"]


@dataclass(frozen=True)
class UndecodableRequest:
    """A request whose bytes are not a valid message of the method's request type."""

    type_name: str  # e.g. "histream.v1.CreateVideoRequest"
    reason: str


def tolerant(cls: type[Message]) -> Callable[[bytes], Message | UndecodableRequest]:
    def parse(data: bytes) -> Message | UndecodableRequest:
        try:
            return cls.FromString(data)
        except Exception as err:  # DecodeError, or invalid UTF-8 in a string field
            return UndecodableRequest(cls.DESCRIPTOR.full_name, str(err) or type(err).__name__)

    return parse


def add_HiStreamServicer_to_server(servicer: object, server: grpc.Server) -> None:
    handlers = {}
    for method in SERVICE.methods:
        request, response = map(GetMessageClass, (method.input_type, method.output_type))
        kind = (
            grpc.unary_stream_rpc_method_handler
            if method.server_streaming
            else (grpc.unary_unary_rpc_method_handler)
        )
        handlers[method.name] = kind(
            getattr(servicer, method.name),
            request_deserializer=tolerant(request),
            response_serializer=response.SerializeToString,
        )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE.full_name, handlers),)
    )
