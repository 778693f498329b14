"""Session routing with several replicas: the stages' router (`services.app.SESSION_ROUTER`,
Serve's consistent-hash router without fallback replicas) sends every call of one session id to
one replica, and different session ids to different replicas. Every service test runs one
replica per stage, where a router that ignored the id would pass too (README, "Stage-to-stage
calls ..."); this deploys a probe with the same router and two replicas beside the service."""

from __future__ import annotations

import uuid

from ray import serve

from services.app import SESSION_ROUTER

PROBE_APP = "routing-probe"


@serve.deployment(
    num_replicas=2, request_router_config=SESSION_ROUTER, ray_actor_options={"num_cpus": 0}
)
class Probe:
    def __init__(self) -> None:
        self.name = uuid.uuid4().hex

    async def who(self, _: int) -> str:
        return self.name


def test_a_sessions_calls_reach_one_replica_and_sessions_spread(service) -> None:
    serve.run(Probe.bind(), name=PROBE_APP, route_prefix=None)
    try:
        handle = serve.get_app_handle(PROBE_APP)
        seen: dict[str, set[str]] = {}
        for s in range(12):
            session = f"session-{s}"
            calls = [handle.options(session_id=session).who.remote(i) for i in range(6)]
            seen[session] = {call.result(timeout_s=60) for call in calls}
        assert all(len(replicas) == 1 for replicas in seen.values()), seen
        used = set().union(*seen.values())
        assert len(used) == 2, f"12 sessions all on one replica of 2: {seen}"
    finally:
        serve.delete(PROBE_APP)
