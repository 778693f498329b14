"""The ingress process: no model. `Gateway` (deployment.py) is a thin Serve deployment
composing the HTTP (http.py), WebSocket (websocket.py) and gRPC (grpc.py) adapters over one
`GatewayCore` (core.py); requests are validated in requests.py, counted in metrics.py.

`Gateway` is imported from `services.gateway.deployment` (by `services.app`), not here, so the
adapters and core import without Serve's ingress machinery."""
