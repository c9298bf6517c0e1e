"""AMI wire layer: a logged-in, self-healing Asterisk Manager connection (no billing)."""

from gateway.ami.client import (
    AMI_ACTION_FAILED,
    AMI_DISCONNECTED,
    AMI_LOGIN_FAILED,
    AMI_TIMEOUT,
    AMI_UNREACHABLE,
    AmiClient,
    AmiError,
)

__all__ = [
    "AMI_ACTION_FAILED",
    "AMI_DISCONNECTED",
    "AMI_LOGIN_FAILED",
    "AMI_TIMEOUT",
    "AMI_UNREACHABLE",
    "AmiClient",
    "AmiError",
]
