"""Application keys: what build_app stores on the aiohttp application."""

from __future__ import annotations

import datetime as dt
from typing import Any

from aiohttp import web

#: the composition root (gateway.app.Gateway or anything with the same attributes)
GATEWAY: web.AppKey[Any] = web.AppKey("gateway")
STARTED_AT: web.AppKey[dt.datetime] = web.AppKey("started_at", dt.datetime)
