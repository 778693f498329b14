"""The gRPC link between stages: a stage's services served over real gRPC (server.py), clients
with the surface of a Serve handle (client.py: one server; replicas.py: the grpc stage transport,
a session's replica found through Serve), and service errors across it (status.py)."""

from services.link.client import GrpcStage, client_credentials
from services.link.server import StageServer, message_limit, tls_credentials

__all__ = ["GrpcStage", "StageServer", "client_credentials", "message_limit", "tls_credentials"]
