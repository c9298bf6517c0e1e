"""Stand-ins for the PBX's side of the call service in fast tests: an AGI session that
records the variables set, and an AMI link that records deadline moves and answers the
channel list. (tests/test_calls.py keeps its own copies of these two.)"""

from __future__ import annotations

import asyncio

from gateway.agi import AgiReply, parse_environment
from gateway.ami.events import CoreShowChannel

__all__ = ["FakeAmi", "Session"]


class Session:
    """Stands in for an AgiSession: the request, and the variables set, in order."""

    def __init__(self, script: str, *args: str, uniqueid: str = "1700000000.1",
                 channel: str = "PJSIP/alice-00000001"):
        lines = [f"agi_network_script: {script}", f"agi_uniqueid: {uniqueid}",
                 f"agi_channel: {channel}", "agi_extension: s"]
        lines += [f"agi_arg_{i + 1}: {a}" for i, a in enumerate(args)]
        self.request = parse_environment([*lines, ""])
        self.variables: list[tuple[str, str]] = []

    async def set_variable(self, name: str, value: str) -> None:
        self.variables.append((name, value))

    async def set_variables(self, variables: list[tuple[str, str]]) -> AgiReply:
        self.variables.extend(variables)
        return AgiReply(200, "0", None, "200 result=0")

    @property
    def vars(self) -> dict[str, str]:
        return dict(self.variables)


class FakeAmi:
    """The AMI link: records Setvar actions; ``channels`` is what CoreShowChannels lists."""

    def __init__(self) -> None:
        self.setvars: list[tuple[str, str, str, float]] = []
        self.channels: list[CoreShowChannel] = []
        self.handlers: dict[object, object] = {}

    def on(self, event: object, cb: object) -> None:
        self.handlers[event] = cb

    async def setvar(self, channel: str, variable: str, value: str) -> None:
        self.setvars.append((channel, variable, value, asyncio.get_running_loop().time()))

    async def getvar(self, channel: str, variable: str) -> str:
        return ""

    async def live_channels(self) -> list[CoreShowChannel]:
        return list(self.channels)
