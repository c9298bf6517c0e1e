"""AMI wire layer: a logged-in, self-healing Asterisk Manager connection (no billing),
and the events the gateway acts on, parsed into frozen types (``events``)."""

from gateway.ami.client import (
    AMI_ACTION_FAILED,
    AMI_DISCONNECTED,
    AMI_LOGIN_FAILED,
    AMI_PBX_MISMATCH,
    AMI_TIMEOUT,
    AMI_UNREACHABLE,
    AmiClient,
    AmiError,
)
from gateway.ami.events import Cdr, CoreShowChannel, DialEnd, Hangup

__all__ = [
    "AMI_ACTION_FAILED",
    "AMI_DISCONNECTED",
    "AMI_LOGIN_FAILED",
    "AMI_PBX_MISMATCH",
    "AMI_TIMEOUT",
    "AMI_UNREACHABLE",
    "AmiClient",
    "AmiError",
    "Cdr",
    "CoreShowChannel",
    "DialEnd",
    "Hangup",
]
