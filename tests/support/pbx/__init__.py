"""Real-PBX test tools: Asterisk 22 and SIPp run from a Debian sid root folder.

One module per tool:

- ``asterisk``: ``Pbx``, one Asterisk running the shipped dialplan; the root folder
  (``pbx_root_path``, ``root_ready``); ``cdr_pgsql``, the keywords for a PBX that
  writes its CDRs into the gateway's table;
- ``sipp``: ``Sipp``, one SIPp phone or trunk for one call, and ``CallResult``, what it saw;
- ``siptrace``: ``SipMessage`` and ``parse_message_trace``, SIPp's message trace parsed;
- ``ports``: free ports on 127.0.0.1, each handed out once per run;
- ``transactions``: SIP requests Asterisk left unanswered on a port, and a sink that
  answers them before a new SIPp binds the port;
- ``processes``: ``PbxError`` and the registry that kills every started process at exit;
- ``fixtures``: the pytest fixtures ``pbx_root`` and ``make_pbx`` (a plugin loaded by
  ``tests/conftest.py``).

docs/dialplan.md says what these tools proved.
"""

from .asterisk import (
    DEFAULT_PBX_ROOT,
    DIALPLAN_DIR,
    REPO,
    Pbx,
    cdr_pgsql,
    pbx_root_path,
    root_ready,
)
from .ports import free_port
from .processes import PbxError
from .sipp import CallResult, Sipp
from .siptrace import SipMessage, parse_message_trace

__all__ = [
    "DEFAULT_PBX_ROOT",
    "DIALPLAN_DIR",
    "REPO",
    "CallResult",
    "Pbx",
    "PbxError",
    "SipMessage",
    "Sipp",
    "cdr_pgsql",
    "free_port",
    "parse_message_trace",
    "pbx_root_path",
    "root_ready",
]
