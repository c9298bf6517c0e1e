"""Typed errors with stable codes, shared by the rater, the HTTP API and the CLI.

The code is the contract: HTTP maps it to a status in one place, logs and tests match on it.
"""

from __future__ import annotations


class GatewayError(Exception):
    """Base error: a stable ``code``, a human message and optionally the offending field."""

    status = 400
    code = "BAD_REQUEST"

    def __init__(self, message: str, *, code: str | None = None, field: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.message = message
        self.field = field

    def as_dict(self) -> dict[str, str]:
        body = {"code": self.code, "message": self.message}
        if self.field:
            body["field"] = self.field
        return body


class InvalidInput(GatewayError):
    """A value that can never be right: malformed, out of range, unknown enumeration."""

    status = 422
    code = "INVALID_INPUT"


class NotFound(GatewayError):
    """A referenced tenant, user, number or call does not exist."""

    status = 404
    code = "NOT_FOUND"


class Conflict(GatewayError):
    """The request is valid but clashes with current state (duplicates, licence limits)."""

    status = 409
    code = "CONFLICT"


class Unavailable(GatewayError):
    """A dependency (database, PBX) cannot be reached."""

    status = 503
    code = "UNAVAILABLE"


class NotOwner(GatewayError):
    """This process does not hold the lease of the PBX a call belongs to (another
    process owns it now, or the lease expired): the write it fenced did not happen."""

    status = 409
    code = "NOT_PBX_OWNER"
