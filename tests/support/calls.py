"""Stand-ins for the PBX's side of the call service in fast tests: an AGI session that
records the variables set, and an AMI link that records deadline moves and answers the
channel list; the same link as a lease keeper starts and stops it, and a call service
with a lease keeper for one PBX."""

from __future__ import annotations

import asyncio

from gateway.agi import AgiReply, parse_environment
from gateway.ami.events import CoreShowChannel, DialEnd
from gateway.calls.service import CallService

__all__ = ["FakeAmi", "LeasedAmi", "Session", "answer", "leased_process"]


class Session:
    """Stands in for an AgiSession: the request, and the variables set, in order."""

    def __init__(self, script: str, *args: str, uniqueid: str = "1700000000.1",
                 channel: str = "PJSIP/alice-00000001", fail_after: int | None = None):
        lines = [f"agi_network_script: {script}", f"agi_uniqueid: {uniqueid}",
                 f"agi_channel: {channel}", "agi_extension: s"]
        lines += [f"agi_arg_{i + 1}: {a}" for i, a in enumerate(args)]
        self.request = parse_environment([*lines, ""])
        self.variables: list[tuple[str, str]] = []
        # the channel goes away after this many variables (None: never)
        self.fail_after = fail_after

    async def set_variable(self, name: str, value: str) -> None:
        if self.fail_after is not None and len(self.variables) >= self.fail_after:
            raise ConnectionResetError("channel gone")
        self.variables.append((name, value))

    async def set_variables(self, variables: list[tuple[str, str]]) -> AgiReply:
        if self.fail_after is not None:  # one command: all of them or none
            raise ConnectionResetError("channel gone")
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


def answer(uniqueid: str, dest_channel: str) -> DialEnd:
    """The DialEnd event of the callee answering, as the AMI link parses it."""
    return DialEnd.parse({"Event": "DialEnd", "DialStatus": "ANSWER", "Uniqueid": uniqueid,
                          "DestChannel": dest_channel})


class LeasedAmi(FakeAmi):
    """An AMI link a lease keeper starts and stops."""

    def __init__(self, channels=()):
        super().__init__()
        self.channels = list(channels)
        self.started = self.stopped = False
        self.connect_callbacks = []

    async def start(self):
        self.started = True

    async def stop(self):
        self.stopped = True

    def on_connect(self, cb):
        self.connect_callbacks.append(cb)

    def on_events_lost(self, cb):
        pass


def leased_process(rater, recovery, owner: str, ami_factory, *, monotonic=None, **kw):
    from gateway.calls.lease import LeaseKeeper

    svc = CallService(rater, recovery, pbxes=("pbx1",), instance_id=owner, leased=True,
                      **kw)
    extra = {"monotonic": monotonic} if monotonic is not None else {}
    keeper = LeaseKeeper(svc.pbx("pbx1"), recovery, svc.metrics, owner=owner,
                         lease_seconds=6, reconcile_interval=3600,
                         ami_factory=ami_factory, **extra)
    return svc, keeper
