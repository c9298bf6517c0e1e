"""A separate gateway process for the concurrency tests: N concurrent authorise(+settle)
cycles against the database named on the command line; prints a JSON summary."""

from __future__ import annotations

import asyncio
import json
import sys

from gateway.billing.rater import Rater
from gateway.store.pool import open_pool
from gateway.store.repository import Repository


async def main(url: str, caller: str, dialled: str, n: int, slice_seconds: int,
               settle: int) -> None:
    """``settle``: 0 leaves the allowed calls open, 1 settles each at its funded
    seconds, 2 sends each settlement twice at once (one must find it settled)."""
    pool = await open_pool(url, min_size=4, max_size=8, run_migrations=False)
    rater = Rater(Repository(pool), slice_seconds=slice_seconds)
    first_settlements = 0

    async def one(i: int):
        nonlocal first_settlements
        d = await rater.authorise_outbound(caller.format(i=i, m=i % 48), dialled)
        if d.allow and settle:
            reports = await asyncio.gather(
                *(rater.settle(d.call_id, d.funded_seconds) for _ in range(settle)))
            first_settlements += sum(1 for s in reports if s.first_time)
        return d

    results = await asyncio.gather(*(one(i) for i in range(n)), return_exceptions=True)
    await pool.close()
    errors = [repr(r) for r in results if isinstance(r, BaseException)]
    decisions = [r for r in results if not isinstance(r, BaseException)]
    print(json.dumps({
        "funded": sum(d.funded_seconds or 0 for d in decisions if d.allow),
        "allowed": sum(1 for d in decisions if d.allow),
        "reasons": sorted({d.reason.value for d in decisions}),
        "errors": errors,
        "first_settlements": first_settlements,
        **rater.coalesced,
    }))


if __name__ == "__main__":
    url, caller, dialled, n, slice_seconds, settle = sys.argv[1:7]
    asyncio.run(main(url, caller, dialled, int(n), int(slice_seconds), int(settle)))
