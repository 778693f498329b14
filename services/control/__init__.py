"""Control of the application beside the gateway: the session mailbox (one small replica),
through which a session's control calls reach the gateway replica that drives it."""

from services.control.mailbox import Mailbox

__all__ = ["Mailbox"]
