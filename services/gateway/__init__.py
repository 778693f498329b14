"""The ingress process: no model. `Gateway` (deployment.py) is a thin Serve deployment that
inherits the HTTP routes (http.py), the WebSocket route (websocket.py) and the gRPC methods
(grpc.py), all over one `GatewayCore` (core.py); bodies.py reads what clients send, requests.py
validates it, metrics.py counts it.

`Gateway` is imported from `services.gateway.deployment` (by `services.app`), not here, so the
core and the transports import without Serve's ingress machinery."""
