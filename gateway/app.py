"""The composition root: builds every component from the configuration, starts them in
order, reports their health, and stops them gracefully."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pathlib
import secrets
import signal
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import structlog

from . import logs
from .agi import AgiServer
from .ami import AmiClient, AmiError
from .billing.alerts import Alerts
from .billing.provisioning import Provisioning
from .billing.rater import Clock, Rater, utcnow
from .billing.recovery import Recovery
from .billing.views import Views
from .billing.webhooks import WebhookSender
from .calls.lease import LeaseKeeper
from .calls.service import CallService
from .config import Config, PbxConfig, announcements
from .dialplan_variables import HANGUP_ROUTE
from .errors import Unavailable
from .metrics import Metrics
from .store.alerts import AlertStore
from .store.migrate import migrate
from .store.pool import HostList, open_pool, start_embedded_async
from .store.repository import Repository

log = structlog.get_logger("gateway.app")


def embedded_data_path(config: Config) -> pathlib.Path:
    """Where the embedded PostgreSQL keeps its files when no database URL is given."""
    return pathlib.Path(config.data_dir).resolve() / "pgdata"


def instance_name(config: Config) -> str:
    """The name of this process in ``calls.owner``, the heartbeat table and the PBX
    leases. Stable across restarts (the configured name, else hostname and AGI port: one
    listener per port on a node), so that a restarted gateway renews its dead
    incarnation's leases at once instead of waiting for them to expire. With AGI port 0
    nothing is stable: a name of its own per process. Two live processes must never
    share a name (docs/fleet.md)."""
    if config.instance_name:
        return config.instance_name
    if config.agi_port:
        return f"{socket.gethostname()}-{config.agi_port}"
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(3)}"


class StartupError(Exception):
    """The gateway cannot start; the message says which component and why."""


class Gateway:
    def __init__(self, config: Config, *, clock: Clock = utcnow, configure_logs: bool = True):
        self.config = config
        self.clock = clock
        self.configure_logs = configure_logs
        self.pool: asyncpg.Pool | None = None
        self.embedded: Any = None
        self.database_mode = "url" if config.database_url else "embedded"
        self.data_path = embedded_data_path(config)
        self.metrics = Metrics()
        self.repo: Repository | None = None
        self.rater: Rater | None = None
        self.recovery: Recovery | None = None
        self.provisioning: Provisioning | None = None
        self.views: Views | None = None
        self.alerts: Alerts | None = None
        self.webhooks: WebhookSender | None = None
        self.webhook_pool: asyncpg.Pool | None = None
        self.calls: CallService | None = None
        self.agi: AgiServer | None = None
        self.leases: dict[str, LeaseKeeper] = {}  # one per PBX, by name
        self._ami: AmiClient | None = None  # set by hand on a gateway not started (tests)
        self.http_runner: Any = None
        self.http_server: asyncio.Server | None = None
        self.http_guard: Any = None
        self.http_port: int | None = None
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = asyncio.Event()
        self.instance_id = instance_name(config)

    # ---- start and stop ------------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.config
        if self.configure_logs:
            logs.configure(cfg.log_format, cfg.log_level, secrets=cfg.secret_values())
        url = cfg.database_url
        if not url:
            data = self.data_path
            log.info("gateway_starting", database="embedded", data_dir=str(data))
            try:
                url, self.embedded = await start_embedded_async(data)
            except Exception as exc:  # noqa: BLE001 - report any failure of pgserver
                raise StartupError(f"database: cannot start the embedded PostgreSQL in "
                                   f"{data}: {exc}") from exc
        else:
            log.info("gateway_starting", database="url",
                     url=cfg.public()["database_url"])
        try:
            self.pool = await asyncio.wait_for(
                open_pool(url, min_size=2, max_size=cfg.db_pool_size,
                          instance_id=self.instance_id), timeout=15)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                TimeoutError) as exc:
            raise StartupError(f"database: cannot connect to "
                               f"{cfg.public()['database_url'] or 'embedded'}: {exc}") from exc
        self.repo = Repository(self.pool)
        # a fenced transaction left idle (a frozen process) ends well before its lease
        self.repo.fence_idle_seconds = cfg.lease_seconds / 3
        self.rater = Rater(self.repo, clock=self.clock, slice_seconds=cfg.slice_seconds)
        self.metrics.pool_statements.set_function(lambda: self.rater.coalesced["batches"])
        self.metrics.pool_requests.set_function(lambda: self.rater.coalesced["requests"])
        pool = self.pool
        self.metrics.db_pool_size.set_function(pool.get_size)
        self.metrics.db_pool_in_use.set_function(
            lambda: pool.get_size() - pool.get_idle_size())
        self.metrics.db_pool_max.set(pool.get_max_size())
        self.provisioning = Provisioning(self.repo, clock=self.clock)
        self.views = Views(self.repo, clock=self.clock)
        self.alerts = Alerts(AlertStore(self.pool))
        recovery = self.recovery = Recovery(self.repo)
        pbxes = cfg.pbxes
        self.calls = CallService(self.rater, recovery, metrics=self.metrics,
                                 renew_before_seconds=cfg.renew_before_seconds,
                                 instance_id=self.instance_id,
                                 heartbeat_seconds=cfg.heartbeat_seconds,
                                 settle_grace_seconds=cfg.settle_grace_seconds,
                                 ring_allowance_seconds=cfg.ring_allowance_seconds,
                                 pbxes=[p.name for p in pbxes],
                                 agi_peers={p.name: p.agi_peers for p in pbxes},
                                 leased=True, announcements=announcements(cfg))
        await self.repo.heartbeat(self.instance_id)
        for pbx in pbxes:
            self.leases[pbx.name] = LeaseKeeper(
                self.calls.pbx(pbx.name), recovery, self.metrics, owner=self.instance_id,
                lease_seconds=cfg.lease_seconds,
                reconcile_interval=cfg.reconcile_interval_seconds,
                ami_factory=self._ami_factory(pbx, single=len(pbxes) == 1))
        # before taking calls: each PBX whose lease is free (or ours from before a
        # restart) is ours at once: its AMI link is made, its calls still up adopted and
        # those that ended meanwhile settled (without AMI, from its CDR table only).
        # A PBX whose lease another live process holds stays on standby. An AMI link
        # refused for its configuration (the wrong PBX, a wrong secret) stops the start;
        # an unreachable PBX is served without AMI until its link is made.
        for name, keeper in self.leases.items():
            try:
                await keeper.attempt(strict=True)
            except AmiError as exc:
                raise StartupError(f"ami: {name}: {exc}" if len(pbxes) > 1
                                   else f"ami: {exc}") from exc
        self.agi = AgiServer(self.calls.routes(), host=cfg.agi_host, port=cfg.agi_port,
                             allowed_peers=cfg.all_agi_peers() or None,
                             max_sessions=cfg.agi_max_sessions,
                             # a hangup report settles money: decisions are refused first
                             reserved_routes=(HANGUP_ROUTE,),
                             observe=self.metrics.observe_agi_handler)
        try:
            await self.agi.start()
        except OSError as exc:
            raise StartupError(f"agi: cannot listen on {cfg.agi_host}:{cfg.agi_port}: "
                               f"{exc.strerror}") from exc
        for keeper in self.leases.values():
            keeper.start()  # renewed every lease_seconds/3; taken when it lapses
        self._tasks.append(asyncio.create_task(self.calls.run_heartbeat(), name="heartbeat"))
        await self._start_http()
        if cfg.webhook_enabled:
            await self._start_webhooks(url)
        log.info("gateway_started", agi=f"{cfg.agi_host}:{self.agi.port}",
                 http=f"{cfg.http_host}:{self.http_port}",
                 pbxes={p.name: {"ami": f"{p.ami_host}:{p.ami_port}" if p.ami_host
                                 else "not configured",
                                 "owned": self.calls.pbx(p.name).owned} for p in pbxes},
                 database=self.database_mode)

    async def _start_webhooks(self, url: str) -> None:
        """The webhook delivery worker: a task of its own on a pool of its own (two
        connections), so that a slow or dead receiver never holds a connection or an
        event-loop turn that a call needs."""
        cfg = self.config
        try:
            self.webhook_pool = await asyncio.wait_for(
                open_pool(url, min_size=1, max_size=2, run_migrations=False,
                          instance_id=self.instance_id), timeout=15)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                TimeoutError) as exc:
            raise StartupError(f"webhooks: cannot connect to the database: {exc}") from exc
        self.webhooks = WebhookSender(
            AlertStore(self.webhook_pool), instance=self.instance_id,
            timeout=cfg.webhook_timeout_seconds, max_attempts=cfg.webhook_max_attempts,
            retry_base=cfg.webhook_retry_base_seconds,
            retry_max=cfg.webhook_retry_max_seconds, concurrency=cfg.webhook_concurrency)
        self._tasks.append(asyncio.create_task(self.webhooks.run(), name="webhooks"))

    def _ami_factory(self, pbx: PbxConfig, *, single: bool) -> Any:
        """Makes the PBX's AMI client at each gain of its lease (None: no AMI)."""
        if not pbx.ami_host:
            return None

        def make() -> AmiClient:
            return AmiClient(pbx.ami_host, pbx.ami_port, pbx.ami_username, pbx.ami_secret,
                             observe=self.metrics.observe_ami_handler,
                             on_event_dropped=self.metrics.count_ami_event_dropped,
                             expected_pbx=pbx.name, single_pbx=single)

        return make

    @property
    def ami(self) -> AmiClient | None:
        """The first PBX's AMI client while this process owns it (the only PBX of a
        single-PBX gateway)."""
        keeper = next(iter(self.leases.values()), None)
        return keeper.ami if keeper is not None else self._ami

    @ami.setter
    def ami(self, client: AmiClient | None) -> None:
        self._ami = client

    async def _start_http(self) -> None:
        from aiohttp import web

        from .http.app import build_app
        from .http.guard import (
            ACCEPT_BURST,
            ConnectionGuard,
            connection_cap,
            raise_descriptor_limit,
        )

        cfg = self.config
        # HTTP and AGI share the process's descriptors: take what the system allows, and
        # cap HTTP connections so that the AGI listener always has its sessions
        soft, _ = raise_descriptor_limit()
        self.http_guard = ConnectionGuard(
            max_connections=connection_cap(cfg.http_max_connections, soft,
                                           cfg.agi_max_sessions),
            header_timeout=cfg.http_header_timeout_seconds)
        self.http_runner = web.AppRunner(
            build_app(self, self.http_guard, cfg.http_request_timeout_seconds),
            access_log=None)
        await self.http_runner.setup()
        self.http_guard.factory = self.http_runner.server
        try:
            # asyncio accepts up to ``backlog`` connections in one go before the guard
            # sees any of them: connection_cap leaves room for that burst
            self.http_server = await asyncio.get_running_loop().create_server(
                self.http_guard, cfg.http_host, cfg.http_port, backlog=ACCEPT_BURST)
        except OSError as exc:
            raise StartupError(f"http: cannot listen on {cfg.http_host}:"
                               f"{cfg.http_port}: {exc.strerror}") from exc
        # the bound port, useful with http_port = 0
        self.http_port = self.http_server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Stop taking calls, finish AGI sessions in flight, keep reservations of calls
        still up (the next start adopts them), then close everything."""
        log.info("gateway_stopping")
        if self.agi is not None:
            await self.agi.stop(grace=5.0)
        if self.http_server is not None:
            self.http_server.close()
        if self.http_runner is not None:
            await self.http_runner.cleanup()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for keeper in self.leases.values():
            await keeper.stop()  # no more lease attempts, no reconcile timers
        for keeper in self.leases.values():
            # no more events before the calls stop: an answer heard after would start
            # a renewal nobody cancels
            await keeper.stop_ami()
        if self.calls is not None:
            await self.calls.stop()
        if self.rater is not None:
            await self.rater.stop()  # voids of lost authorisations still retrying
        for keeper in self.leases.values():
            # the next owner (another process, or ours restarted) takes each PBX at once
            await keeper.release()
        if self.repo is not None:
            # our calls still up become adoptable by the next process at once
            with contextlib.suppress(Exception):
                await self.repo.forget_instance(self.instance_id)
        if self.webhook_pool is not None:
            await self.webhook_pool.close()
        if self.pool is not None:
            await self.pool.close()
        if self.embedded is not None:
            with contextlib.suppress(Exception):
                self.embedded.cleanup()
        log.info("gateway_stopped")

    async def run_until_signalled(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        await self._stopping.wait()

    # ---- health ---------------------------------------------------------------------------

    async def database_status(self) -> dict[str, Any]:
        if self.pool is None:
            return {"state": "down", "reason": "not started"}
        try:
            await asyncio.wait_for(self.pool.fetchval("SELECT 1"), timeout=2)
        except Exception as exc:  # noqa: BLE001 - any failure means down
            return {"state": "down", "reason": str(exc) or type(exc).__name__,
                    "mode": self.database_mode}
        return {"state": "up", "mode": self.database_mode}

    def pbx_ami_status(self, name: str) -> dict[str, Any]:
        """One PBX's AMI link: up, down, not_configured, or standby (another process
        owns the PBX: this one keeps no link to it)."""
        keeper = self.leases.get(name)
        if keeper is None and self._ami is not None:
            status = self._ami.status()
            status["state"] = "up" if self._ami.state == "connected" else "down"
            return status
        if keeper is None or keeper.ami_factory is None:
            return {"state": "not_configured",
                    "reason": "no ami_host configured (GATEWAY_AMI_HOST)"}
        if not keeper.pbx.owned:
            lease = keeper.pbx.lease
            owner = getattr(lease, "owner", None)
            return {"state": "standby",
                    "reason": f"another gateway process ({owner}) owns this PBX" if owner
                    else "this process does not own this PBX"}
        if keeper.ami is None:
            return {"state": "down", "reason": "the AMI link could not be made; retrying"}
        status = keeper.ami.status()
        status["state"] = "up" if keeper.ami.state == "connected" else "down"
        return status

    def ami_status(self) -> dict[str, Any]:
        """The AMI component: the single PBX's link; with several, up when every PBX
        this process owns has its link (or none configured)."""
        reconnects = sum(k.ami.reconnects for k in self.leases.values() if k.ami is not None)
        self.metrics.ami_reconnects.set(reconnects)
        for name, keeper in self.leases.items():  # a PBX without AMI has no backlog
            if keeper.ami_factory is not None:
                self.metrics.ami_event_backlog.labels(name).set(
                    keeper.ami.event_backlog if keeper.ami is not None else 0)
        if not self.leases and self._ami is not None:
            self.metrics.ami_event_backlog.labels("").set(self._ami.event_backlog)
        if self.calls is not None:
            for name, pbx in self.calls.pbxes.items():
                self.metrics.live_calls.labels(name).set(len(pbx.live.by_id))
        if len(self.leases) <= 1:
            name = next(iter(self.leases), "")
            return self.pbx_ami_status(name)
        states = {name: self.pbx_ami_status(name) for name in self.leases}
        owned = [s for s in states.values() if s["state"] != "standby"]
        if not owned:
            state = "standby"
        elif all(s["state"] == "not_configured" for s in owned):
            state = "not_configured"
        elif all(s["state"] in ("up", "not_configured") for s in owned):
            state = "up"
        else:
            state = "down"
        return {"state": state, "pbxes": {n: s["state"] for n, s in states.items()}}

    def pbxes_status(self) -> dict[str, dict[str, Any]]:
        """Each PBX: its lease (owner, generation, expiry), its AMI link, its calls."""
        if self.calls is None:
            return {}
        return {name: {**pbx.view(), "ami": self.pbx_ami_status(name)}
                for name, pbx in self.calls.pbxes.items()}

    async def processes_status(self) -> list[dict[str, Any]]:
        """The gateway processes sharing the database (heartbeat table): alive or not,
        this one or not, and the PBXs each serves now (their leases)."""
        if self.recovery is None:
            return []
        alive_within = self.config.heartbeat_seconds * 4
        return [{**p.view(), "this": p.name == self.instance_id}
                for p in await self.recovery.processes(alive_within)]

    def agi_status(self) -> dict[str, Any]:
        if self.agi is None or not self.agi.listening:
            return {"state": "down", "reason": "not listening"}
        return {"state": "up", "listen": f"{self.config.agi_host}:{self.agi.port}",
                **self.agi.stats}

    async def components(self) -> dict[str, dict[str, Any]]:
        return {"database": await self.database_status(), "ami": self.ami_status(),
                "agi": self.agi_status()}

    async def readiness(self) -> tuple[bool, dict[str, dict[str, Any]]]:
        """Ready when the database answers, AGI listens, and AMI is logged in (or not
        configured at all: a gateway without AMI still decides calls) for every PBX this
        process owns; a PBX on standby (owned by another process) does not count."""
        comps = await self.components()
        ok = (comps["database"]["state"] == "up" and comps["agi"]["state"] == "up"
              and comps["ami"]["state"] in ("up", "not_configured", "standby"))
        return ok, comps


# ---- the billing layer for one operator command ---------------------------------------------


@dataclass(frozen=True)
class Billing:
    """What an operator command may use: the billing layer, no listeners, no calls."""

    provisioning: Provisioning
    views: Views
    alerts: Alerts


@contextlib.asynccontextmanager
async def open_billing(config: Config) -> AsyncIterator[Billing]:
    """Open the configured database for one operator command and yield the billing
    layer over it; close it afterwards. The database is chosen as ``Gateway.start``
    chooses it: the URL, or without one the embedded database of ``data_dir``, shared
    with a running ``gateway serve`` (not stopped while serve holds it)."""
    url = config.database_url
    embedded: Any = None
    if not url:
        data = embedded_data_path(config)
        try:
            url, embedded = await start_embedded_async(data)
        except Exception as exc:  # noqa: BLE001 - pgserver raises its own kinds
            raise Unavailable(f"cannot start the embedded database in {data}: {exc}",
                              code="DATABASE_UNAVAILABLE") from exc
    try:
        try:
            pool = await asyncio.wait_for(open_pool(url, min_size=1, max_size=4),
                                          timeout=15)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
                TimeoutError) as exc:
            raise Unavailable(f"cannot connect to the database: {exc}",
                              code="DATABASE_UNAVAILABLE") from exc
        try:
            repo = Repository(pool)
            yield Billing(provisioning=Provisioning(repo), views=Views(repo),
                          alerts=Alerts(AlertStore(pool)))
        finally:
            await pool.close()
    finally:
        if embedded is not None:
            embedded.cleanup()


async def migrate_database(url: str) -> list[str]:
    """Bring the schema at ``url`` up to date (``gateway migrate``); return what was applied."""
    conn = await HostList(url).connect()  # past a hung server of a multi-host URL
    try:
        return await migrate(conn)
    finally:
        await conn.close()
