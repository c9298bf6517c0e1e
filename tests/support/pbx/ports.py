"""Free ports on 127.0.0.1 for Asterisk, SIPp and the gateway, and whether a UDP port
is bound."""

from __future__ import annotations

import socket
from pathlib import Path

from .processes import PbxError

__all__ = ["free_port", "free_udp_ports", "udp_port_bound"]


def free_port(kind: str = "tcp") -> int:
    """A port on 127.0.0.1 free right now for ``kind`` ("tcp", "udp" or "both")."""
    for _ in range(50):
        with socket.socket(
            socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
        ) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if kind != "both":
            return port
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
                u.bind(("127.0.0.1", port))
            return port
        except OSError:
            continue
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
