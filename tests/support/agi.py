"""A fake Asterisk for the gateway's FastAGI port."""

from __future__ import annotations

import asyncio
import shlex
import uuid

__all__ = ["agi_outbound"]


async def agi_outbound(port: int, endpoint: str, dialled: str) -> dict[str, str]:
    """Play Asterisk for one outbound AGI request; return the variables the gateway set."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    env = {"agi_network": "yes", "agi_network_script": "outbound",
           "agi_request": f"agi://127.0.0.1:{port}/outbound",
           "agi_channel": f"PJSIP/{endpoint}-00000001", "agi_uniqueid": uuid.uuid4().hex[:12],
           "agi_callerid": endpoint, "agi_extension": dialled,
           "agi_arg_1": dialled, "agi_arg_2": endpoint}
    writer.write(("".join(f"{k}: {v}\n" for k, v in env.items()) + "\n").encode())
    variables: dict[str, str] = {}
    async with asyncio.timeout(5):
        while line := await reader.readline():
            words = shlex.split(line.decode())
            if words[:2] == ["SET", "VARIABLE"]:
                variables[words[2]] = words[3]
            elif words[:2] == ["EXEC", "MSet"]:  # the gateway answers in one command
                variables.update(pair.split("=", 1) for pair in words[2].split(","))
            writer.write(b"200 result=1\n")
    writer.close()
    return variables
