"""Free ports on 127.0.0.1 for Asterisk, SIPp and the gateway, and whether a UDP port
is bound.

SIP ports (Asterisk's transport, each endpoint's SIPp port) come from ``SIP_PORTS`` and
are handed out at most once per test run: a port that served one PBX or SIPp may still
receive retransmissions meant for it (Asterisk resends an unanswered request for
32 s), which a new owner would take for its own traffic (issue 8 item 16). The range
lies outside the kernel's ephemeral ports and below Asterisk's RTP ports (rtp.conf:
20000-30000), so no socket bound to "any free port" (a DNS query, another program)
can take an endpoint's port while its SIPp is not running. SIPp's own control and
media ports come in blocks from ``SIPP_PORTS``, held while that SIPp runs.
"""

from __future__ import annotations

import random
import socket
import threading
import time
from pathlib import Path

from .processes import PbxError

__all__ = ["SIPP_BLOCK", "SIPP_PORTS", "SIP_PORTS", "free_port", "free_sip_port",
           "free_sipp_block", "free_udp_ports", "release_sipp_block", "udp_port_bound"]

SIP_PORTS = range(10000, 20000)
SIPP_PORTS = range(5000, 10000)
#: a SIPp's block: control port at +0, media (RTP echo) at +2 and the ports above it
SIPP_BLOCK = 8

_handed_out: set[int] = set()  # every port free_port() or free_sip_port() returned
#: blocks of SIPps still running -> when the block is free again at the latest (a SIPp
#: killed and never waited for does not release its block)
_sipp_blocks: dict[int, float] = {}
SIPP_BLOCK_HOLD = 600.0
_lock = threading.Lock()
_random = random.SystemRandom()


def free_port(kind: str = "tcp") -> int:
    """A port on 127.0.0.1 free right now for ``kind`` ("tcp", "udp" or "both"),
    never one handed out before in this process."""
    for _ in range(200):
        with socket.socket(
            socket.AF_INET, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM
        ) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if kind == "both" and not _udp_free(port):
            continue
        with _lock:
            if port in _handed_out:
                continue
            _handed_out.add(port)
        return port
    raise PbxError("no free port")


def free_sip_port(taken: set[int] = frozenset()) -> int:
    """A port from ``SIP_PORTS`` free for UDP and TCP, never handed out before in this
    process and not in ``taken``."""
    for _ in range(500):
        port = _random.choice(SIP_PORTS)
        with _lock:
            if port in _handed_out or port in taken:
                continue
            if not (_udp_free(port) and _tcp_free(port)):
                continue
            _handed_out.add(port)
        return port
    raise PbxError(f"no free SIP port in {SIP_PORTS}")


def free_udp_ports(n: int, taken: set[int]) -> list[int]:
    """``n`` distinct SIP ports (``free_sip_port``), none of them in ``taken``."""
    ports: list[int] = []
    while len(ports) < n:
        ports.append(free_sip_port(taken | set(ports)))
    return ports


def free_sipp_block() -> int:
    """The first port of a block of ``SIPP_BLOCK`` UDP ports, all free, for one SIPp;
    held until ``release_sipp_block()``."""
    starts = range(SIPP_PORTS.start, SIPP_PORTS.stop - SIPP_BLOCK + 1, SIPP_BLOCK)
    for _ in range(500):
        start = _random.choice(starts)
        with _lock:
            if _sipp_blocks.get(start, 0.0) > time.monotonic():
                continue
            if not all(_udp_free(p) for p in range(start, start + SIPP_BLOCK)):
                continue
            _sipp_blocks[start] = time.monotonic() + SIPP_BLOCK_HOLD
        return start
    raise PbxError(f"no free block of {SIPP_BLOCK} ports in {SIPP_PORTS}")


def release_sipp_block(start: int) -> None:
    with _lock:
        _sipp_blocks.pop(start, None)


def _udp_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
        try:
            u.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _tcp_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as t:
        try:
            t.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


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
