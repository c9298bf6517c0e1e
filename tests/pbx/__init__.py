"""Real-PBX test harness: Asterisk 22 and SIPp run from a Debian sid root folder.

See tests/pbx/harness.py for the API and docs/dialplan.md for what it proved.
"""

from tests.pbx.harness import (
    DEFAULT_PBX_ROOT,
    CallResult,
    Pbx,
    PbxError,
    Sipp,
    free_port,
    pbx_root_path,
    root_ready,
)

__all__ = [
    "DEFAULT_PBX_ROOT",
    "CallResult",
    "Pbx",
    "PbxError",
    "Sipp",
    "free_port",
    "pbx_root_path",
    "root_ready",
]
