"""In-process stand-ins for Serve deployment handles, for tests without Ray."""

from __future__ import annotations

from typing import Any


class LocalHandle:
    """Serve's deployment-handle surface over an object in this process.

    `options(session_id=...)` pins (the id is recorded with each call); `Method.remote(request)`
    returns what the method returns (a coroutine for the stages' async RPCs), so awaiting it is
    awaiting the call, as with a `DeploymentResponse`.
    """

    def __init__(self, target: Any, calls: list | None = None, session_id: str | None = None):
        self.target = target
        self.calls: list[tuple[str, str | None, tuple]] = [] if calls is None else calls
        self.session_id = session_id

    def options(self, session_id: str | None = None, **_: object) -> LocalHandle:
        return LocalHandle(self.target, self.calls, session_id)

    def __getattr__(self, name: str) -> Any:
        method = getattr(self.target, name)
        handle = self

        class Remote:
            @staticmethod
            def remote(*args: Any) -> Any:
                handle.calls.append((name, handle.session_id, args))
                return method(*args)

        return Remote

    def called(self, name: str) -> list[tuple]:
        """The requests of every call of `name`, in order."""
        return [args for method, _, args in self.calls if method == name]
