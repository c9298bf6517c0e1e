"""FastAGI wire protocol: request parsing, replies, quoting and an asyncio server.

Knows nothing about rating or billing; routes are plain coroutines taking a session.
"""

from gateway.agi.protocol import (
    AgiCommandError,
    AgiConnectionClosed,
    AgiError,
    AgiProtocolError,
    AgiReply,
    AgiRequest,
    AgiTimeout,
    parse_environment,
    parse_reply,
    quote,
)
from gateway.agi.server import PING_ROUTE, AgiServer, AgiSession, Handler

__all__ = [
    "PING_ROUTE",
    "AgiCommandError",
    "AgiConnectionClosed",
    "AgiError",
    "AgiProtocolError",
    "AgiReply",
    "AgiRequest",
    "AgiServer",
    "AgiSession",
    "AgiTimeout",
    "Handler",
    "parse_environment",
    "parse_reply",
    "quote",
]
