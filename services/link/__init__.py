"""The gRPC link between stages: a stage served over real gRPC outside Ray (server.py), the
handle that calls one as a Serve handle would (client.py), and service errors across it
(status.py)."""

from services.link.client import GrpcStage, client_credentials
from services.link.server import StageServer, message_limit, tls_credentials

__all__ = ["GrpcStage", "StageServer", "client_credentials", "message_limit", "tls_credentials"]
