"""A fake Asterisk for the gateway's FastAGI port."""

from __future__ import annotations

import asyncio
import shlex
import uuid
from collections.abc import Sequence

__all__ = ["agi_outbound", "agi_request", "mset_items"]


def mset_items(data: str) -> dict[str, str]:
    """name -> value of MSet's argument ``data``, split as MSet splits it: on commas
    outside parentheses and double quotes, the quotes removed (the dialplan writes
    ``"CHANNEL(hangup_handler_push)=ctx,s,1"``, and so does the gateway's answer)."""
    items, depth, quoted, item = [], 0, False, ""
    for ch in data:
        if ch == '"':
            quoted = not quoted
            continue
        depth += (ch in "([{") - (ch in ")]}")
        if ch == "," and depth == 0 and not quoted:
            items.append(item)
            item = ""
        else:
            item += ch
    items.append(item)
    return dict(item.split("=", 1) for item in items)


async def agi_outbound(port: int, endpoint: str, dialled: str) -> dict[str, str]:
    """Play Asterisk for one outbound AGI request; return the variables the gateway set."""
    return await agi_request(port, "outbound", [dialled, endpoint], endpoint=endpoint,
                             extension=dialled)


async def agi_request(port: int, script: str, args: Sequence[str], *,
                      uniqueid: str | None = None, endpoint: str = "alice",
                      extension: str = "s", within: float = 5.0) -> dict[str, str]:
    """Play Asterisk for one FastAGI session of ``script`` with ``args`` (its channel's
    ``uniqueid``, a new one when not given); return the variables the gateway set."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    env = {"agi_network": "yes", "agi_network_script": script,
           "agi_request": f"agi://127.0.0.1:{port}/{script}",
           "agi_channel": f"PJSIP/{endpoint}-00000001",
           "agi_uniqueid": uniqueid or uuid.uuid4().hex[:12],
           "agi_callerid": endpoint, "agi_extension": extension}
    env.update({f"agi_arg_{i}": a for i, a in enumerate(args, start=1)})
    writer.write(("".join(f"{k}: {v}\n" for k, v in env.items()) + "\n").encode())
    variables: dict[str, str] = {}
    try:
        async with asyncio.timeout(within):
            while line := await reader.readline():
                words = shlex.split(line.decode())
                if words[:2] == ["SET", "VARIABLE"]:
                    variables[words[2]] = words[3]
                elif words[:2] == ["EXEC", "MSet"]:  # the gateway answers in one command
                    variables.update(mset_items(words[2]))
                writer.write(b"200 result=1\n")
    finally:
        writer.close()
    return variables
