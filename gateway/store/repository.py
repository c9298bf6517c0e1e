"""The one place with SQL. Lookups that may miss are ``find_*`` (return None);
those that must hit are ``get_*`` (raise NotFound). Database errors become the
project's typed errors here, so callers never see asyncpg exceptions.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import re
import uuid
from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

import asyncpg

from ..errors import Conflict, GatewayError, InvalidInput, NotFound, NotOwner, Unavailable
from ..rating.model import NumberKind, Settlement, Tenant, User

_DIGITS = re.compile(r"[0-9]+")

DEFAULT_PBX = "default"  # the PBX of a single-PBX gateway, and of a CDR without a name

# (pbx, owner): a write that commits only while ``owner`` holds the lease of ``pbx``
Fence = tuple[str, str]


@dataclass(frozen=True)
class CallerRow:
    user: User
    tenant: Tenant
    internal_user_endpoint: str | None
    # (e164, endpoint it rings) of the tenant's numbers that end like the dialled digits
    number_candidates: tuple[tuple[str, str | None], ...]
    # the tenant's context version when this was read (see ``authorise_known``)
    context_version: int | None = None


@dataclass(frozen=True)
class InboundNumber:
    e164: str
    tenant_id: str
    kind: NumberKind
    target: str | None


@dataclass(frozen=True)
class AuthoriseResult:
    decision: str
    reason: str
    funded: int
    price: Decimal | None
    first_increment: int
    increment: int
    rate_prefix: str | None


@contextlib.contextmanager
def translate_errors() -> Any:
    """Turn database errors into the gateway's typed errors with stable codes."""
    try:
        yield
    except GatewayError:
        raise
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(f"already exists: {exc.detail or exc}", code="DUPLICATE") from exc
    except asyncpg.ForeignKeyViolationError as exc:
        raise NotFound(f"refers to something that does not exist: {exc.detail or exc}",
                       code="UNKNOWN_REFERENCE") from exc
    except (asyncpg.CheckViolationError, asyncpg.NotNullViolationError,
            asyncpg.NumericValueOutOfRangeError, asyncpg.StringDataRightTruncationError,
            asyncpg.InvalidTextRepresentationError) as exc:
        raise InvalidInput(f"invalid value: {exc}", code="INVALID_VALUE") from exc
    except (asyncpg.PostgresConnectionError, asyncpg.OperatorInterventionError,
            asyncpg.ReadOnlySQLTransactionError) as exc:
        # the server went away, is shutting down or starting up, cancelled the
        # statement (statement_timeout), or is a standby that refuses writes (a fail-over
        # under way): the statement's transaction did not commit
        raise Unavailable(f"database unavailable: {exc}", code="DATABASE_UNAVAILABLE") from exc
    except asyncpg.PostgresError as exc:
        if exc.sqlstate == "GW404":
            raise NotFound(str(exc), code="UNKNOWN_CALL") from exc
        raise
    except (OSError, asyncpg.InterfaceError) as exc:
        # a timeout says nothing in its message: name it
        raise Unavailable(f"database unavailable: {str(exc) or type(exc).__name__}",
                          code="DATABASE_UNAVAILABLE") from exc


# the arguments of gw_authorise_known's check, beside gw_authorise's
_KNOWN_CHECK = ("context_version", "dialled", "dialled_as_typed", "dialled_e164")


def _lock_conflict(row: asyncpg.Record) -> bool:
    """One request of a batch was rolled back to break a deadlock or a serialisation
    conflict (SQLSTATE class 40): nothing of it was written."""
    return (row["error_state"] or "").startswith("40")


def _batch_error(row: asyncpg.Record) -> Exception:
    """The error one request of a batch met (its SQLSTATE, message and detail), as the
    single step would have raised it: translated like any database error."""
    fields = {"C": row["error_state"], "M": row["error_message"] or "", "S": "ERROR"}
    if row["error_detail"]:
        fields["D"] = row["error_detail"]
    try:
        with translate_errors():
            raise asyncpg.PostgresError.new(fields)
    except Exception as exc:  # noqa: BLE001 - returned, not raised: one answer of many
        return exc
    raise AssertionError("unreachable")


class _OneConnection:
    """Stands in for the pool inside ``Repository.one_transaction``: every statement goes
    to the same connection, and the methods' own transactions become savepoints."""

    def __init__(self, conn: asyncpg.Connection):
        self.conn = conn

    def acquire(self) -> contextlib.nullcontext[asyncpg.Connection]:
        return contextlib.nullcontext(self.conn)

    async def fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        return await self.conn.fetch(sql, *args)

    async def fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        return await self.conn.fetchrow(sql, *args)

    async def fetchval(self, sql: str, *args: Any) -> Any:
        return await self.conn.fetchval(sql, *args)

    async def execute(self, sql: str, *args: Any) -> str:
        return await self.conn.execute(sql, *args)


class PoolStore:
    """Statements on a pool, each with the database's errors translated (the base of
    the repository classes)."""

    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def _fetch(self, sql: str, *args: Any) -> list[asyncpg.Record]:
        with translate_errors():
            return await self.pool.fetch(sql, *args)

    async def _fetchrow(self, sql: str, *args: Any) -> asyncpg.Record | None:
        with translate_errors():
            return await self.pool.fetchrow(sql, *args)

    async def _fetchval(self, sql: str, *args: Any) -> Any:
        with translate_errors():
            return await self.pool.fetchval(sql, *args)


class Repository(PoolStore):
    # a fenced transaction left idle this long is ended by the server (see ``_fenced``);
    # well under a lease's length (the gateway sets it from ``lease_seconds``)
    fence_idle_seconds: float = 2.0

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[asyncpg.Connection]:
        with translate_errors():
            async with self.pool.acquire() as conn, conn.transaction():
                yield conn

    @contextlib.asynccontextmanager
    async def one_transaction(self, *, rollback: bool = False
                              ) -> AsyncIterator[Repository]:
        """A Repository whose every statement runs on one connection in one transaction,
        so that a sequence of writes is all or nothing (a provisioning file). Committed
        when the block ends, rolled back if it raises, or always with ``rollback``
        (a dry run sees its own writes, then leaves nothing)."""
        with translate_errors():
            async with self.pool.acquire() as conn:
                tx = conn.transaction()
                await tx.start()
                try:
                    inner = Repository(_OneConnection(conn))  # type: ignore[arg-type]
                    inner.fence_idle_seconds = self.fence_idle_seconds
                    yield inner
                except BaseException:
                    await tx.rollback()
                    raise
                if rollback:
                    await tx.rollback()
                else:
                    await tx.commit()

    async def _execute(self, sql: str, *args: Any) -> str:
        with translate_errors():
            return await self.pool.execute(sql, *args)

    # ---- the call path -------------------------------------------------------------

    async def find_caller(self, sip_endpoint: str, dialled: str,
                          dialled_as_typed: str | None = None) -> CallerRow | None:
        """One round trip: the caller, their tenant and licences, and whether the
        dialled string is one of the tenant's own extensions, users or numbers.
        ``dialled`` is normalised (extensions and numbers are compared with it);
        endpoint names are compared with ``dialled_as_typed``, since '.' and '-' are
        part of a name (default: ``dialled``)."""
        if dialled_as_typed is None:
            dialled_as_typed = dialled
        digits = "".join(_DIGITS.findall(dialled or ""))
        suffix = digits[-7:] if digits else None
        r = await self._fetchrow(
            """
            SELECT u.id AS user_id, u.tenant_id, u.sip_endpoint, u.usage_location, u.extension,
                   t.country, t.timezone, t.currency, t.blocked_classes, t.context_version,
                   ARRAY(SELECT la.sku FROM licence_assignments la
                         WHERE la.user_id = u.id) AS licences,
                   (SELECT u2.sip_endpoint FROM users u2
                    WHERE u2.tenant_id = u.tenant_id AND u2.deactivated_at IS NULL
                      AND (u2.extension = $2 OR u2.sip_endpoint = $4)
                    ORDER BY u2.extension = $2 DESC LIMIT 1) AS internal_user,
                   ARRAY(SELECT ROW(pn.e164, coalesce(pu.sip_endpoint, pn.target))
                         FROM phone_numbers pn LEFT JOIN users pu ON pu.id = pn.user_id
                         WHERE $3::text IS NOT NULL AND pn.tenant_id = u.tenant_id
                           AND reverse(pn.e164) LIKE reverse($3::text) || '%'
                         LIMIT 20) AS numbers
            FROM users u JOIN tenants t ON t.id = u.tenant_id
            -- a deactivated user is unknown to the call path (UNKNOWN_CALLER)
            WHERE u.sip_endpoint = $1 AND u.deactivated_at IS NULL
            """,
            sip_endpoint,
            dialled,
            suffix,
            dialled_as_typed,
        )
        if r is None:
            return None
        user = User(
            id=r["user_id"],
            tenant_id=r["tenant_id"],
            sip_endpoint=r["sip_endpoint"],
            usage_location=r["usage_location"],
            extension=r["extension"],
            licences=frozenset(r["licences"]),
        )
        tenant = Tenant(
            id=r["tenant_id"],
            country=r["country"],
            timezone=r["timezone"],
            currency=r["currency"],
            blocked_classes=frozenset(r["blocked_classes"]),
        )
        numbers = tuple((n[0], n[1]) for n in r["numbers"])
        return CallerRow(user, tenant, r["internal_user"], numbers, r["context_version"])

    async def find_inbound_number(self, e164: str) -> InboundNumber | None:
        r = await self._fetchrow(
            """
            SELECT pn.e164, pn.tenant_id, pn.kind, coalesce(u.sip_endpoint, pn.target) AS target
            FROM phone_numbers pn LEFT JOIN users u ON u.id = pn.user_id
            WHERE pn.e164 = $1
            """,
            e164,
        )
        if r is None:
            return None
        return InboundNumber(r["e164"], r["tenant_id"], NumberKind(r["kind"]), r["target"])

    async def authorise(
        self,
        *,
        call_id: uuid.UUID,
        tenant_id: str,
        user_id: str | None,
        direction: str,
        caller: str,
        destination: str,
        number_class: str,
        decision: str,
        reason: str,
        route: str | None,
        pbx_uniqueid: str | None,
        linkedid: str | None,
        rate_kind: str | None,
        sources: Sequence[str],
        pool_country: str | None,
        slice_seconds: int,
        now: dt.datetime,
        pbx: str = DEFAULT_PBX,
    ) -> AuthoriseResult:
        """Record one decision with ``gw_authorise``: for an allowed rated call it looks
        up the rate and reserves the first slice, and may overturn the decision
        (``NO_RATE``, ``NO_BALANCE``); the result says what was finally recorded.
        ``pbx_uniqueid`` is unique on its PBX ``pbx`` only."""
        r = await self._fetchrow(
            "SELECT * FROM gw_authorise($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
            " $13, $14, $15, $16, $17, $18)",
            call_id, tenant_id, user_id, direction, caller, destination, number_class,
            decision, reason, route, pbx_uniqueid, linkedid, rate_kind, list(sources),
            pool_country, slice_seconds, now, pbx,
        )
        assert r is not None
        return AuthoriseResult(
            r["decision"], r["reason"], r["funded"], r["price"], r["first_increment"],
            r["increment"], r["rate_prefix"],
        )

    async def authorise_known(self, *, context_version: int, dialled: str,
                              dialled_as_typed: str, dialled_e164: str | None = None,
                              **decision: Any) -> AuthoriseResult | None:
        """``authorise`` in the same round trip as the check that the outbound decision was
        made from the tenant's current context (``gw_authorise_known``): the tenant's
        context version is still ``context_version`` and the dialled string is none of
        its users or extensions (``dialled``; endpoint names: ``dialled_as_typed``) nor
        its numbers (``dialled_e164``, the dialled number's E.164 as the rater classified
        it; None: not a number, so none of them, as the two-trip path decides). None,
        with nothing written, when either does not hold.

        The function's number check is "some number of the tenant ends with p_suffix";
        given the whole E.164 (which starts with '+', as every stored number does) it
        is an exact comparison, served by the same index. The last seven digits were
        given before: a call to any number ending like one of the tenant's own (212 555
        0100 for a tenant owning +1 514 555 0100) then took three round trips."""
        r = await self._fetchrow(
            "SELECT * FROM gw_authorise_known($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11,"
            " $12, $13, $14, $15, $16, $17, $18, $19, $20, $21, $22)",
            context_version, dialled, dialled_as_typed, dialled_e164,
            decision["call_id"], decision["tenant_id"], decision["user_id"],
            decision["direction"], decision["caller"], decision["destination"],
            decision["number_class"], decision["decision"], decision["reason"],
            decision["route"], decision["pbx_uniqueid"], decision["linkedid"],
            decision["rate_kind"], list(decision["sources"]), decision["pool_country"],
            decision["slice_seconds"], decision["now"], decision.get("pbx", DEFAULT_PBX),
        )
        assert r is not None
        if r["decision"] is None:
            return None
        return AuthoriseResult(
            r["decision"], r["reason"], r["funded"], r["price"], r["first_increment"],
            r["increment"], r["rate_prefix"],
        )

    async def pool_batch(self, settlements: Sequence[tuple[uuid.UUID, int, dt.datetime, str]],
                         authorisations: Sequence[dict[str, Any]]
                         ) -> tuple[list[Settlement | Exception],
                                    list[AuthoriseResult | None | Exception]]:
        """Several settlements (call id, billable seconds, now, by: ``settle``'s arguments,
        unfenced) and authorisations (each ``authorise``'s keyword arguments; with
        ``context_version``, ``dialled``, ``dialled_as_typed`` and ``dialled_e164`` decided as
        ``authorise_known`` decides) in one statement and one transaction
        (``gw_pool_batch``), the settlements first. One answer per request, in order:
        what the single step would return, or the typed error it would raise, as an
        exception object (that request wrote nothing; the others are committed). An
        error of the statement itself is raised: none of them committed (or, for
        ``Unavailable``, the outcome is unknown for all of them)."""
        q = authorisations
        # gw_authorise_known's p_suffix: the whole E.164 (see authorise_known)
        suffixes = [a.get("dialled_e164") for a in q]
        rows = await self._fetch(
            "SELECT * FROM gw_pool_batch($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12,"
            " $13, $14, $15, $16, $17, $18, $19, $20, $21, $22, $23, $24, $25, $26)",
            [s[0] for s in settlements], [s[1] for s in settlements],
            [s[2] for s in settlements], [s[3] for s in settlements],
            [a.get("context_version") for a in q], [a.get("dialled") for a in q],
            [a.get("dialled_as_typed") for a in q], suffixes,
            *([a[name] for a in q] for name in (
                "call_id", "tenant_id", "user_id", "direction", "caller", "destination",
                "number_class", "decision", "reason", "route", "pbx_uniqueid", "linkedid",
                "rate_kind")),
            [",".join(a["sources"]) for a in q], [a["pool_country"] for a in q],
            [a["slice_seconds"] for a in q], [a["now"] for a in q],
            [a.get("pbx", DEFAULT_PBX) for a in q],
        )
        settled = [r for r in rows if r["step"] == "settle"]
        authorised = [r for r in rows if r["step"] == "authorise"]
        assert [r["ord"] for r in settled] == list(range(1, len(settlements) + 1))
        assert [r["ord"] for r in authorised] == list(range(1, len(q) + 1))
        # A request rolled back to break a deadlock (SQLSTATE class 40; rare: see
        # gw_settle_batch) wrote nothing: it is sent again alone. Nothing below raises:
        # the others are committed, and each caller must hear its own answer.
        settle_answers: list[Settlement | Exception] = []
        for s, r in zip(settlements, settled, strict=True):
            if _lock_conflict(r):
                try:
                    settle_answers.append(await self.settle(*s))
                except Exception as exc:  # noqa: BLE001 - its answer
                    settle_answers.append(exc)
            elif r["error_state"] is not None:
                settle_answers.append(_batch_error(r))
            else:
                settle_answers.append(Settlement(r["outcome"], r["billed"] or 0,
                                                 r["charged"] or Decimal(0)))
        authorise_answers: list[AuthoriseResult | None | Exception] = []
        for a, r in zip(q, authorised, strict=True):
            if _lock_conflict(r):
                authorise_answers.append(await self._authorise_alone(a))
            elif r["error_state"] is not None:
                authorise_answers.append(_batch_error(r))
            elif r["decision"] is None:
                authorise_answers.append(None)  # gw_authorise_known's check: nothing written
            else:
                authorise_answers.append(AuthoriseResult(
                    r["decision"], r["reason"], r["funded"], r["price"], r["first_increment"],
                    r["increment"], r["rate_prefix"]))
        return settle_answers, authorise_answers
    async def _authorise_alone(self, request: dict[str, Any]
                               ) -> AuthoriseResult | None | Exception:
        try:
            if request.get("context_version") is None:
                return await self.authorise(**{k: v for k, v in request.items()
                                               if k not in _KNOWN_CHECK})
            return await self.authorise_known(**request)
        except Exception as exc:  # noqa: BLE001 - its answer; the others committed
            return exc

    async def void_authorisation(
        self, *, call_id: uuid.UUID, tenant_id: str, direction: str, caller: str,
        destination: str, number_class: str, pbx_uniqueid: str | None,
        linkedid: str | None, now: dt.datetime, pbx: str = DEFAULT_PBX,
    ) -> str:
        """Make an authorisation whose answer was lost say what the PBX was told
        (``gw_void``): release it if it committed, else keep it from ever taking
        effect. Returns 'voided', 'released' or the state the call already had."""
        r = await self._fetchrow(
            "SELECT gw_void($1, $2, $3, $4, $5, $6, $7, $8, $9, $10) AS outcome",
            call_id, tenant_id, direction, caller, destination, number_class, pbx_uniqueid,
            linkedid, now, pbx,
        )
        assert r is not None
        return r["outcome"]

    async def renew(self, call_id: uuid.UUID, slice_seconds: int, now: dt.datetime,
                    fence: Fence | None = None) -> tuple[int, int, str]:
        """Reserve the next slice with ``gw_renew``: (seconds reserved now, funded total,
        the call's state before renewing). With a ``fence``, only while its owner holds
        its PBX's lease (see ``_fenced``)."""
        r = await self._fenced(fence, "SELECT * FROM gw_renew($1, $2, $3)", call_id,
                               slice_seconds, now)
        return r["slice_seconds"], r["funded"], r["state"]

    async def settle(self, call_id: uuid.UUID, billable_seconds: int, now: dt.datetime,
                     by: str, fence: Fence | None = None) -> Settlement:
        """Settle (or release, with nothing answered) a call once with ``gw_settle``.
        With a ``fence``, only while its owner holds its PBX's lease (see ``_fenced``)."""
        r = await self._fenced(fence, "SELECT * FROM gw_settle($1, $2, $3, $4)", call_id,
                               billable_seconds, now, by)
        return Settlement(r["outcome"], r["billed"] or 0, r["charged"] or Decimal(0))

    async def _fenced(self, fence: Fence | None, sql: str, *args: Any) -> asyncpg.Record:
        """Run one statement returning a row; with ``fence`` = (pbx, owner), in a
        transaction that first holds the PBX's fence (``gw_fence``: an advisory lock
        taken shared until the commit) and finds ``owner``'s unexpired lease. A change
        of the lease's owner takes that lock exclusively: it waits for the fenced
        transactions in flight, and one that committed first is seen when the lock is
        granted. So a fenced write never commits after another process took the PBX
        over, while the owner's renewals of its own lease never wait for its fenced
        writes. No lease: nothing is written and ``NotOwner`` is raised.

        A process that stops inside the transaction (frozen, its link half open) would
        keep the PBX from every other process: the server ends the session once the
        transaction stays idle ``fence_idle_seconds``, and its locks with it."""
        if fence is None:
            r = await self._fetchrow(sql, *args)
        else:
            pbx, owner = fence
            idle = f"{max(100, round(self.fence_idle_seconds * 1000))}ms"
            async with self.transaction() as conn:
                held = await conn.fetchval(
                    "SELECT set_config('idle_in_transaction_session_timeout', $3, true)"
                    " IS NOT NULL AND gw_fence($1, $2)", pbx, owner, idle)
                if not held:
                    raise NotOwner(f"{owner} does not hold the lease of PBX {pbx}",
                                   code="NOT_PBX_OWNER")
                r = await conn.fetchrow(sql, *args)
        assert r is not None
        return r

    async def mark_answered(self, call_id: uuid.UUID, at: dt.datetime) -> bool:
        status = await self._execute(
            "UPDATE calls SET state = 'answered', answered_at = $2"
            " WHERE id = $1 AND state = 'authorised'",
            call_id, at,
        )
        return status.endswith(" 1")

    async def find_call(self, call_id: uuid.UUID) -> asyncpg.Record | None:
        return await self._fetchrow("SELECT * FROM calls WHERE id = $1", call_id)

    async def find_call_by_uniqueid(self, pbx: str, uniqueid: str | None = None
                                    ) -> asyncpg.Record | None:
        """The call whose caller channel is ``uniqueid`` on PBX ``pbx``. Called with one
        argument (the form before PBX names), that is the uniqueid on PBX 'default'."""
        if uniqueid is None:
            pbx, uniqueid = DEFAULT_PBX, pbx
        return await self._fetchrow(
            "SELECT * FROM calls WHERE pbx = $1 AND pbx_uniqueid = $2", pbx, uniqueid)

    async def open_calls(self, pbx: str | None = None) -> list[asyncpg.Record]:
        """The open calls of PBX ``pbx`` (None: of every PBX), oldest first."""
        return await self._fetch(
            "SELECT * FROM calls WHERE state IN ('authorised', 'answered')"
            " AND ($1::text IS NULL OR pbx = $1) ORDER BY authorised_at", pbx,
        )

    async def call_funding(self, call_id: uuid.UUID) -> list[asyncpg.Record]:
        return await self._fetch(
            "SELECT * FROM call_funding WHERE call_id = $1 ORDER BY position", call_id
        )

    # ---- provisioning --------------------------------------------------------------

    async def create_tenant(self, t: Tenant, name: str) -> None:
        async with self.transaction() as conn:
            await conn.execute(
                "INSERT INTO tenants (id, name, country, timezone, currency, blocked_classes)"
                " VALUES ($1, $2, $3, $4, $5, $6)",
                t.id, name, t.country, t.timezone, t.currency, sorted(t.blocked_classes),
            )
            await conn.execute("INSERT INTO wallets (tenant_id) VALUES ($1)", t.id)

    async def update_tenant(self, tenant_id: str, fields: dict[str, Any]) -> None:
        await self._update("tenants", "id", tenant_id, fields, "UNKNOWN_TENANT")

    async def _update(self, table: str, key: str, key_value: Any, fields: dict[str, Any],
                      missing_code: str, *, only: str = "true") -> None:
        # Column names and ``only`` come from the callers' fixed text, never from input.
        if not fields:
            return
        sets = ", ".join(f"{col} = ${i + 2}" for i, col in enumerate(fields))
        status = await self._execute(
            f"UPDATE {table} SET {sets} WHERE {key} = $1 AND {only}", key_value,
            *fields.values()
        )
        if status.endswith(" 0"):
            raise NotFound(f"no such {table[:-1]}: {key_value}", code=missing_code)

    async def find_tenant(self, tenant_id: str) -> asyncpg.Record | None:
        return await self._fetchrow("SELECT * FROM tenants WHERE id = $1", tenant_id)

    async def list_tenants(self) -> list[asyncpg.Record]:
        return await self._fetch("SELECT * FROM tenants ORDER BY id")

    async def set_subscription(self, tenant_id: str, sku: str, quantity: int) -> None:
        async with self.transaction() as conn:
            await conn.execute(
                "INSERT INTO subscriptions (tenant_id, sku, quantity) VALUES ($1, $2, 0)"
                " ON CONFLICT DO NOTHING", tenant_id, sku,
            )
            await conn.execute(
                "SELECT 1 FROM subscriptions WHERE tenant_id = $1 AND sku = $2 FOR UPDATE",
                tenant_id, sku,
            )
            assigned = await conn.fetchval(
                "SELECT count(*) FROM licence_assignments WHERE tenant_id = $1 AND sku = $2",
                tenant_id, sku,
            )
            if quantity < assigned:
                raise Conflict(
                    f"{assigned} {sku} licences are assigned; unassign some before "
                    f"reducing the purchase to {quantity}",
                    code="LICENCES_IN_USE", field="quantity",
                )
            await conn.execute(
                "UPDATE subscriptions SET quantity = $3 WHERE tenant_id = $1 AND sku = $2",
                tenant_id, sku, quantity,
            )

    async def subscriptions(self, tenant_id: str) -> list[asyncpg.Record]:
        return await self._fetch(
            """
            SELECT s.sku, s.quantity,
                   (SELECT count(*) FROM licence_assignments la
                    WHERE la.tenant_id = s.tenant_id AND la.sku = s.sku) AS assigned
            FROM subscriptions s WHERE s.tenant_id = $1 ORDER BY s.sku
            """,
            tenant_id,
        )

    async def create_user(self, u: User, display_name: str) -> bool:
        """Insert the user, or reactivate a deactivated user of the same tenant with these
        details (its history is its own again). True when it reactivated one."""
        async with self.transaction() as conn:
            old = await conn.fetchrow(
                "SELECT tenant_id, deactivated_at FROM users WHERE id = $1 FOR UPDATE", u.id)
            if old is None:
                await conn.execute(
                    "INSERT INTO users (id, tenant_id, display_name, sip_endpoint, extension,"
                    " usage_location) VALUES ($1, $2, $3, $4, $5, $6)",
                    u.id, u.tenant_id, display_name, u.sip_endpoint, u.extension,
                    u.usage_location,
                )
                return False
            if old["deactivated_at"] is None:
                raise Conflict(f"already exists: user {u.id}", code="DUPLICATE", field="id")
            if old["tenant_id"] != u.tenant_id:
                # its calls and ledger entries belong to that tenant's history
                raise Conflict(f"user id {u.id} was a user of tenant {old['tenant_id']}",
                               code="USER_OF_OTHER_TENANT", field="id")
            await conn.execute(
                "UPDATE users SET display_name = $2, sip_endpoint = $3, extension = $4,"
                " usage_location = $5, deactivated_at = NULL WHERE id = $1",
                u.id, display_name, u.sip_endpoint, u.extension, u.usage_location,
            )
            return True

    async def update_user(self, user_id: str, fields: dict[str, Any]) -> None:
        await self._update("users", "id", user_id, fields, "UNKNOWN_USER",
                           only="deactivated_at IS NULL")

    async def deactivate_user(self, user_id: str, now: dt.datetime) -> None:
        """What "deleting" a user does: it keeps its row, calls, ledger entries and
        counters; its licences return to the tenant and its numbers ring nobody. Refused
        while the user has a call open (its settlement needs the user as it is)."""
        async with self.transaction() as conn:
            found = await conn.fetchval(
                "SELECT true FROM users WHERE id = $1 AND deactivated_at IS NULL FOR UPDATE",
                user_id)
            if not found:
                raise NotFound(f"no such user: {user_id}", code="UNKNOWN_USER")
            open_calls = await conn.fetchval(
                "SELECT count(*) FROM calls WHERE user_id = $1"
                " AND state IN ('authorised', 'answered')", user_id)
            if open_calls:
                raise Conflict(f"user {user_id} has {open_calls} open call(s); deactivate "
                               "it once they have ended", code="USER_HAS_OPEN_CALLS")
            await conn.execute("DELETE FROM licence_assignments WHERE user_id = $1", user_id)
            await conn.execute("UPDATE phone_numbers SET user_id = NULL WHERE user_id = $1",
                               user_id)
            await conn.execute("UPDATE users SET deactivated_at = $2 WHERE id = $1",
                               user_id, now)

    async def find_user(self, user_id: str) -> asyncpg.Record | None:
        """An active user (a deactivated one is found by nobody but ``create_user``)."""
        return await self._fetchrow(
            "SELECT u.*, ARRAY(SELECT sku FROM licence_assignments la WHERE la.user_id = u.id"
            " ORDER BY sku) AS licences FROM users u"
            " WHERE u.id = $1 AND u.deactivated_at IS NULL",
            user_id,
        )

    async def list_users(self, tenant_id: str) -> list[asyncpg.Record]:
        return await self._fetch(
            "SELECT u.*, ARRAY(SELECT sku FROM licence_assignments la WHERE la.user_id = u.id"
            " ORDER BY sku) AS licences FROM users u"
            " WHERE u.tenant_id = $1 AND u.deactivated_at IS NULL ORDER BY u.id",
            tenant_id,
        )

    async def assign_licence(self, user_id: str, sku: str, check: Any) -> None:
        """Assign under the subscription's row lock, so that two concurrent assignments
        can never exceed the purchase. ``check(user_row, held_skus)`` applies the rules."""
        async with self.transaction() as conn:
            user = await conn.fetchrow(
                "SELECT u.*, t.country AS tenant_country FROM users u"
                " JOIN tenants t ON t.id = u.tenant_id"
                " WHERE u.id = $1 AND u.deactivated_at IS NULL", user_id,
            )
            if user is None:
                raise NotFound(f"no such user: {user_id}", code="UNKNOWN_USER")
            quantity = await conn.fetchval(
                "SELECT quantity FROM subscriptions WHERE tenant_id = $1 AND sku = $2"
                " FOR UPDATE", user["tenant_id"], sku,
            )
            held = {r["sku"] for r in await conn.fetch(
                "SELECT sku FROM licence_assignments WHERE user_id = $1", user_id)}
            if sku in held:
                return  # assigning what is held already changes nothing
            check(user, held)
            assigned = await conn.fetchval(
                "SELECT count(*) FROM licence_assignments WHERE tenant_id = $1 AND sku = $2",
                user["tenant_id"], sku,
            )
            if quantity is None or assigned >= quantity:
                raise Conflict(
                    f"tenant {user['tenant_id']} has purchased {quantity or 0} {sku} "
                    f"licences and {assigned} are assigned",
                    code="LICENCE_LIMIT", field="sku",
                )
            await conn.execute(
                "INSERT INTO licence_assignments (user_id, sku, tenant_id) VALUES ($1, $2, $3)",
                user_id, sku, user["tenant_id"],
            )

    async def unassign_licence(self, user_id: str, sku: str, check: Any) -> None:
        async with self.transaction() as conn:
            held = {r["sku"] for r in await conn.fetch(
                "SELECT sku FROM licence_assignments WHERE user_id = $1 FOR UPDATE", user_id)}
            check(held)
            await conn.execute(
                "DELETE FROM licence_assignments WHERE user_id = $1 AND sku = $2", user_id, sku
            )

    async def add_number(self, e164: str, tenant_id: str, kind: str, user_id: str | None,
                         target: str | None) -> None:
        async with self.transaction() as conn:
            if user_id is not None:
                owner = await conn.fetchval(
                    "SELECT tenant_id FROM users WHERE id = $1 AND deactivated_at IS NULL",
                    user_id)
                if owner is None:
                    raise NotFound(f"no such user: {user_id}", code="UNKNOWN_USER",
                                   field="user_id")
                if owner != tenant_id:
                    raise InvalidInput(f"user {user_id} belongs to another tenant",
                                       code="USER_OF_OTHER_TENANT", field="user_id")
            await conn.execute(
                "INSERT INTO phone_numbers (e164, tenant_id, kind, user_id, target)"
                " VALUES ($1, $2, $3, $4, $5)", e164, tenant_id, kind, user_id, target,
            )

    async def delete_number(self, e164: str) -> None:
        status = await self._execute("DELETE FROM phone_numbers WHERE e164 = $1", e164)
        if status.endswith(" 0"):
            raise NotFound(f"no such number: {e164}", code="UNKNOWN_NUMBER")

    async def list_numbers(self, tenant_id: str) -> list[asyncpg.Record]:
        return await self._fetch(
            "SELECT * FROM phone_numbers WHERE tenant_id = $1 ORDER BY e164", tenant_id
        )

    async def upsert_rates(self, rows: Iterable[tuple[Any, ...]]) -> int:
        """rows: (tenant_id|None, currency, kind, prefix, price, first, increment, description).
        All or nothing."""
        rows = list(rows)
        async with self.transaction() as conn:
            await conn.executemany(
                """
                INSERT INTO rates (tenant_id, currency, kind, prefix, price_per_minute,
                                   first_increment, increment, description)
                VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
                ON CONFLICT (tenant_id, currency, kind, prefix) DO UPDATE
                SET price_per_minute = EXCLUDED.price_per_minute,
                    first_increment = EXCLUDED.first_increment,
                    increment = EXCLUDED.increment, description = EXCLUDED.description
                """,
                rows,
            )
        return len(rows)

    async def list_rates(self, tenant_id: str | None = None) -> list[asyncpg.Record]:
        return await self._fetch(
            "SELECT * FROM rates WHERE tenant_id IS NOT DISTINCT FROM $1"
            " ORDER BY kind, currency, prefix", tenant_id,
        )

    async def set_allotment(self, country: str, plan: str, minutes: int) -> None:
        await self._execute(
            "INSERT INTO allotments (country, plan, minutes) VALUES ($1, $2, $3)"
            " ON CONFLICT (country, plan) DO UPDATE SET minutes = EXCLUDED.minutes",
            country, plan, minutes,
        )

    async def allotments(self) -> list[asyncpg.Record]:
        return await self._fetch("SELECT * FROM allotments ORDER BY country, plan")

    # ---- wallet ----------------------------------------------------------------------

    async def topup(self, tenant_id: str, amount: Decimal, now: dt.datetime, note: str
                    ) -> Decimal:
        r = await self._fetchrow(
            """
            WITH w AS (
                UPDATE wallets SET balance = balance + $2 WHERE tenant_id = $1
                RETURNING balance
            ), l AS (
                INSERT INTO ledger (at, tenant_id, entry, account, d_balance, note)
                SELECT $3, $1, 'topup', 'wallet', $2, $4 FROM w
            )
            SELECT balance FROM w
            """,
            tenant_id, amount, now, note,
        )
        if r is None:
            raise NotFound(f"no such tenant: {tenant_id}", code="UNKNOWN_TENANT")
        return r["balance"]

    async def set_auto_recharge(self, tenant_id: str, enabled: bool, threshold: Decimal,
                                amount: Decimal, monthly_cap: int) -> None:
        await self._update(
            "wallets", "tenant_id", tenant_id,
            {"auto_recharge_enabled": enabled, "auto_recharge_threshold": threshold,
             "auto_recharge_amount": amount, "auto_recharge_monthly_cap": monthly_cap},
            "UNKNOWN_TENANT",
        )

    async def get_wallet(self, tenant_id: str, month: dt.date | None = None) -> asyncpg.Record:
        r = await self._fetchrow(
            """
            SELECT w.*, (SELECT count(*) FROM ledger l WHERE l.tenant_id = w.tenant_id
                         AND l.entry = 'recharge' AND l.month = $2) AS recharges_this_month
            FROM wallets w WHERE w.tenant_id = $1
            """,
            tenant_id, month,
        )
        if r is None:
            raise NotFound(f"no such tenant: {tenant_id}", code="UNKNOWN_TENANT")
        return r

    # ---- usage -----------------------------------------------------------------------

    async def pools(self, tenant_id: str, month: dt.date) -> list[asyncpg.Record]:
        """Every country the tenant has Calling Plan users in, with this month's counters."""
        return await self._fetch(
            """
            WITH countries AS (
                SELECT DISTINCT u.usage_location AS country FROM users u
                JOIN licence_assignments la ON la.user_id = u.id
                WHERE u.tenant_id = $1 AND la.sku = 'business_voice_calling_plan'
                UNION SELECT country FROM pools WHERE tenant_id = $1 AND month = $2
            )
            SELECT c.country, gw_pool_capacity($1, c.country) AS capacity_seconds,
                   coalesce(p.used_seconds, 0) AS used_seconds,
                   coalesce(p.reserved_seconds, 0) AS reserved_seconds
            FROM countries c
            LEFT JOIN pools p ON p.tenant_id = $1 AND p.country = c.country AND p.month = $2
            ORDER BY c.country
            """,
            tenant_id, month,
        )

    async def addon_usage(self, tenant_id: str, month: dt.date) -> list[asyncpg.Record]:
        return await self._fetch(
            """
            SELECT u.id AS user_id, gw_addon_capacity(u.id) AS capacity_seconds,
                   coalesce(a.used_seconds, 0) AS used_seconds,
                   coalesce(a.reserved_seconds, 0) AS reserved_seconds
            FROM users u LEFT JOIN addon_usage a ON a.user_id = u.id AND a.month = $2
            -- holders of the add-on, and whoever used it this month (a user who has
            -- given it back, or been deactivated, keeps the minutes counted)
            WHERE u.tenant_id = $1
              AND (a.user_id IS NOT NULL
                   OR EXISTS (SELECT 1 FROM licence_assignments la WHERE la.user_id = u.id
                              AND la.sku = 'international_calling_plan'))
            ORDER BY u.id
            """,
            tenant_id, month,
        )

    async def list_calls(self, tenant_id: str, month: dt.date | None, limit: int = 100, *,
                         user_id: str | None = None, direction: str | None = None,
                         decision: str | None = None, since: dt.datetime | None = None,
                         before: dt.datetime | None = None) -> list[asyncpg.Record]:
        """A tenant's calls, newest first; each filter that is not None narrows them."""
        return await self._fetch(
            "SELECT * FROM calls WHERE tenant_id = $1 AND ($2::date IS NULL OR month = $2)"
            " AND ($4::text IS NULL OR user_id = $4)"
            " AND ($5::text IS NULL OR direction = $5)"
            " AND ($6::text IS NULL OR decision = $6)"
            " AND ($7::timestamptz IS NULL OR authorised_at >= $7)"
            " AND ($8::timestamptz IS NULL OR authorised_at < $8)"
            " ORDER BY authorised_at DESC LIMIT $3",
            tenant_id, month, limit, user_id, direction, decision, since, before,
        )

    async def usage_summary(self, tenant_id: str, month: dt.date) -> list[asyncpg.Record]:
        return await self._fetch(
            """
            SELECT direction, number_class, decision, count(*) AS calls,
                   coalesce(sum(billed_seconds), 0) AS billed_seconds,
                   coalesce(sum(charged_amount), 0) AS charged
            FROM calls WHERE tenant_id = $1 AND month = $2
            GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
            """,
            tenant_id, month,
        )

    async def ledger(self, tenant_id: str, limit: int = 100) -> list[asyncpg.Record]:
        return await self._fetch(
            "SELECT * FROM ledger WHERE tenant_id = $1 ORDER BY id DESC LIMIT $2",
            tenant_id, limit,
        )

    # ---- forecasts and month exports -------------------------------------------------

    async def charges_since(self, tenant_id: str, since: dt.datetime) -> list[asyncpg.Record]:
        """A tenant's charges (pool and add-on seconds, wallet money) since ``since``,
        oldest first: what the forecast's burn rates are drawn from."""
        return await self._fetch(
            "SELECT at, account, country, month, user_id, d_used_seconds, d_balance"
            " FROM ledger WHERE tenant_id = $1 AND entry = 'charge' AND at >= $2"
            " ORDER BY id",
            tenant_id, since,
        )

    async def first_movement(self, tenant_id: str) -> dt.datetime | None:
        """When the tenant's ledger begins (its first row); None before any."""
        return await self._fetchval(
            "SELECT at FROM ledger WHERE tenant_id = $1 ORDER BY id LIMIT 1", tenant_id)

    async def month_export(self, tenant_id: str, month: dt.date, start: dt.datetime,
                           end: dt.datetime) -> tuple[list[asyncpg.Record],
                                                      list[asyncpg.Record]]:
        """The month's calls, each with what its funding sources were charged, and the
        wallet's top-ups and recharges between ``start`` and ``end``: read in one
        snapshot, so that a call settled meanwhile is in both or in neither."""
        with translate_errors():
            async with self.pool.acquire() as conn, conn.transaction(
                    isolation="repeatable_read", readonly=True):
                calls = await conn.fetch(
                    """
                    SELECT c.*, coalesce(f.pool_seconds, 0) AS pool_seconds,
                           coalesce(f.addon_seconds, 0) AS addon_seconds,
                           coalesce(f.wallet_seconds, 0) AS wallet_seconds,
                           coalesce(f.wallet_amount, 0) AS wallet_amount
                    FROM calls c
                    LEFT JOIN LATERAL (
                        SELECT sum(charged_seconds) FILTER (WHERE source = 'pool')
                                   AS pool_seconds,
                               sum(charged_seconds) FILTER (WHERE source = 'addon')
                                   AS addon_seconds,
                               sum(charged_seconds) FILTER (WHERE source = 'wallet')
                                   AS wallet_seconds,
                               sum(charged_amount) FILTER (WHERE source = 'wallet')
                                   AS wallet_amount
                        FROM call_funding WHERE call_id = c.id) f ON true
                    WHERE c.tenant_id = $1 AND c.month = $2
                    ORDER BY c.authorised_at, c.id
                    """,
                    tenant_id, month,
                )
                wallet = await conn.fetch(
                    "SELECT entry, count(*) AS entries, sum(d_balance) AS amount FROM ledger"
                    " WHERE tenant_id = $1 AND account = 'wallet'"
                    " AND entry IN ('topup', 'recharge') AND at >= $2 AND at < $3"
                    " GROUP BY entry",
                    tenant_id, start, end,
                )
        return calls, wallet

    # ---- the PBX's own record ------------------------------------------------------

    async def find_cdr(self, pbx: str, uniqueid: str) -> asyncpg.Record | None:
        """The last CDR PBX ``pbx`` wrote for a channel (cdr_pgsql into table ``cdr``); a
        row without a PBX name was written by PBX 'default'."""
        return await self._fetchrow(
            "SELECT billsec, disposition, answer, \"end\" FROM cdr"
            " WHERE coalesce(pbx, 'default') = $1 AND uniqueid = $2"
            " ORDER BY (disposition = 'ANSWERED') DESC, id DESC LIMIT 1",
            pbx, uniqueid,
        )

    async def cdr_coverage(self, now: dt.datetime, *, settled_before: dt.timedelta,
                           settled_after: dt.timedelta, limit: int = 10,
                           pbx: str | None = None) -> tuple[int, int]:
        """Of the last ``limit`` answered calls of PBX ``pbx`` (None: of any PBX) settled
        between ``settled_after`` and ``settled_before`` ago: how many, and how many
        have a row in ``cdr`` written by their own PBX."""
        r = await self._fetchrow(
            "SELECT count(*) AS checked, count(cdr.uniqueid) AS recorded FROM ("
            "  SELECT pbx, pbx_uniqueid FROM calls WHERE state = 'settled'"
            "   AND billable_seconds > 0 AND pbx_uniqueid IS NOT NULL"
            "   AND ended_at <= $1::timestamptz - $2::interval"
            "   AND ended_at > $1::timestamptz - $3::interval"
            "   AND ($5::text IS NULL OR pbx = $5)"
            "  ORDER BY ended_at DESC LIMIT $4) AS recent"
            " LEFT JOIN LATERAL (SELECT uniqueid FROM cdr"
            "  WHERE coalesce(cdr.pbx, 'default') = recent.pbx"
            "   AND cdr.uniqueid = recent.pbx_uniqueid LIMIT 1) AS cdr ON true",
            now, settled_before, settled_after, limit, pbx,
        )
        assert r is not None
        return r["checked"], r["recorded"]

    # ---- PBX leases ------------------------------------------------------------------

    async def lease(self, pbx: str, owner: str, seconds: float | Decimal,
                    wait: float | Decimal | None = None) -> asyncpg.Record:
        """Take or renew ``owner``'s lease of ``pbx`` for ``seconds`` (``gw_lease``): the
        lease as it is afterwards (owner, generation, expires_at): ``owner`` holds it
        if the row's owner is ``owner``. A change of owner waits for the fenced
        transactions in flight at most ``wait`` seconds (default a sixth of
        ``seconds``), then raises ``Unavailable`` (``LEASE_BUSY``); a renewal in time by
        the owner waits for none."""
        try:
            r = await self._fetchrow(
                "SELECT * FROM gw_lease($1, $2, $3, $4)", pbx, owner, Decimal(str(seconds)),
                None if wait is None else Decimal(str(wait)))
        except asyncpg.LockNotAvailableError as exc:
            raise Unavailable(f"the lease of PBX {pbx} is busy: {exc}",
                              code="LEASE_BUSY") from exc
        assert r is not None
        return r

    async def release_lease(self, pbx: str, owner: str) -> bool:
        """Give up ``owner``'s lease of ``pbx`` now; whether ``owner`` held it."""
        return bool(await self._fetchval("SELECT gw_lease_release($1, $2)", pbx, owner))

    async def leases(self) -> list[asyncpg.Record]:
        """Every PBX's lease (expired ones too), by PBX name, with ``held``: whether it
        has not expired by the database's clock."""
        return await self._fetch(
            "SELECT pbx, owner, generation, acquired_at, expires_at,"
            " expires_at > now() AS held FROM pbx_leases ORDER BY pbx")

    # ---- gateway processes -----------------------------------------------------------

    async def heartbeat(self, instance_id: str) -> None:
        await self._execute(
            "INSERT INTO gateway_instances (id) VALUES ($1)"
            " ON CONFLICT (id) DO UPDATE SET last_seen = now()", instance_id,
        )

    async def live_instances(self, within_seconds: float) -> set[str]:
        rows = await self._fetch(
            "SELECT id FROM gateway_instances"
            " WHERE last_seen > now() - make_interval(secs => $1)", within_seconds,
        )
        return {r["id"] for r in rows}

    async def instances(self) -> list[asyncpg.Record]:
        """Every gateway process that sent a heartbeat, with the seconds since its last
        one by the database's clock, and the PBXs whose lease it holds now."""
        return await self._fetch(
            "SELECT i.id, i.started_at, i.last_seen,"
            " extract(epoch FROM now() - i.last_seen)::float8 AS silent_seconds,"
            " coalesce(array_agg(l.pbx ORDER BY l.pbx) FILTER (WHERE l.pbx IS NOT NULL),"
            " '{}') AS pbxes"
            " FROM gateway_instances i"
            " LEFT JOIN pbx_leases l ON l.owner = i.id AND l.expires_at > now()"
            " GROUP BY i.id ORDER BY i.id")

    async def forget_instance(self, instance_id: str) -> None:
        await self._execute("DELETE FROM gateway_instances WHERE id = $1", instance_id)
