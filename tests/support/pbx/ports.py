"""Free ports on 127.0.0.1 for Asterisk, SIPp and the gateway, and whether a UDP port
is bound.

A port is handed out at most once per test run: a port that served one PBX or SIPp
may still receive retransmissions meant for it (Asterisk resends an unanswered
request for 32 s), which a new owner would take for its own traffic (issue 8 item 16).
"""

from __future__ import annotations

import socket
import threading
from pathlib import Path

from .processes import PbxError

__all__ = ["free_port", "free_udp_ports", "udp_port_bound"]

_handed_out: set[int] = set()  # every port free_port() returned in this process
_lock = threading.Lock()


def free_port(kind: str = "tcp") -> int:
    """A port on 127.0.0.1 free right now for ``kind`` ("tcp", "udp" or "both"),
    never one handed out before in this process."""
    for _ in range(200):
        with socket.socket(
            socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
        ) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if kind == "both":
            try:
                with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                    u.bind(("127.0.0.1", port))
            except OSError:
                continue
        with _lock:
            if port in _handed_out:
                continue
            _handed_out.add(port)
        return port
    raise PbxError("no free port")


def free_udp_ports(n: int, taken: set[int]) -> list[int]:
    """``n`` distinct free UDP ports, none of them in ``taken``."""
    ports: list[int] = []
    while len(ports) < n:
        p = free_port("udp")
        if p not in taken and p not in ports:
            ports.append(p)
    return ports


def udp_port_bound(port: int) -> bool:
    """Whether something listens on UDP 127.0.0.1:port, read from /proc/net/udp
    (binding a test socket instead could steal the port from a starting SIPp)."""
    try:
        table = Path("/proc/net/udp").read_text()
    except OSError:
        table = ""
    if table:
        wanted = f"0100007F:{port:04X}"
        return any(line.split()[1] == wanted for line in table.splitlines()[1:] if line.strip())
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False
