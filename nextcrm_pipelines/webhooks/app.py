"""The webhook receiver: `POST /webhooks/{provider}/{connection_id}` → verify → inbox → 2xx.

It does nothing else (processing is Dagster's job). The body is read up to a size limit (413
beyond) and within a deadline (408 beyond; `server_config` gives the headers one too); an unknown
provider is 404; a missing or wrong signature is 401 and nothing is stored, and so is an unknown
connection (the same answer, so ids cannot be probed); a body that is signed but whose events cannot
be read is recorded as `dead` for audit and answered 400; when the database cannot be reached, or a
writer task died, the answer is 503, so the provider retries. A
2xx goes out only after the row is committed, and a redelivered event is a no-op (unique on
provider, connection and event id). Xero's intent-to-receive deliveries get their 200 or 401 and
store nothing. A provider check that needs the connection or the network (`verify_connection`) runs
between two short uses of the pool, so no database connection waits on a provider; when it cannot
reach what it needs the answer is 503, so the provider retries.

Speed without giving any of that up: a connection's row and decrypted secrets are kept for a few
seconds (a signature that fails against a kept secret is checked again against the stored one, so a
rotated secret works at once), and verified events are written by a few writer tasks that commit
whatever is queued in one transaction (group commit): each request still gets its 2xx only after the
transaction holding its rows has committed.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import orjson
import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb
from psycopg_pool import AsyncConnectionPool, PoolTimeout
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.settings import libpq_url
from nextcrm_pipelines.core.vault import SecretBox, StaleKey, VaultError
from nextcrm_pipelines.providers import PROVIDERS
from nextcrm_pipelines.webhooks.verify import InvalidSignature, VerificationUnavailable, VerifyContext, WebhookSpec

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1_048_576
# Deadlines for slow clients: the request line and headers, then the whole body (408 when missed).
HEADER_SECONDS = 10.0
BODY_SECONDS = 10.0
MAX_HEADER_BYTES = 16_384
KEEP_ALIVE_SECONDS = 5
# Connections served at once; beyond, uvicorn answers 503 (providers retry) rather than running out of descriptors.
MAX_CONNECTIONS = 1000
# Event ids are unique in the inbox; a btree entry holds at most ~2.7 kB, so longer ids could not be stored.
MAX_EVENT_ID_CHARS = 500
ALWAYS_KEPT_HEADERS = ("content-type", "user-agent")
CONNECTION_CACHE_SECONDS = 10.0
WRITERS = 4
GROUP_ROWS = 256


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


def _is_handshake(spec: WebhookSpec, body: bytes) -> bool:
    """Whether a body is the provider's subscription check (Xero's intent-to-receive), not an event delivery."""
    try:
        return bool(spec.handshake(orjson.loads(body)))
    except Exception:
        return False


def _reply(status: int, message: str | None = None) -> Response:
    if message is None:
        return Response(status_code=status)
    return Response(orjson.dumps({"error": message}), status_code=status, media_type="application/json")


async def _read_body(request: Request, limit: int, seconds: float) -> bytes:
    """The body, at most `limit` bytes (`_TooLarge`) and read whole within `seconds` (`_TooSlow`)."""
    declared = request.headers.get("content-length")
    if declared and declared.isascii() and declared.isdigit() and len(declared) < 20 and int(declared) > limit:
        raise _TooLarge
    chunks, size = [], 0
    try:
        async with asyncio.timeout(seconds):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _TooLarge
                chunks.append(chunk)
    except TimeoutError:
        raise _TooSlow from None
    return b"".join(chunks)


def _json_text(value: Any) -> str:
    return orjson.dumps(value).decode()


@dataclass(frozen=True)
class _Known:
    """A connection as the receiver needs it: its row's fields and decrypted secrets, and until when kept."""

    provider: str
    secrets: dict[str, Any] = field(repr=False)
    connection: Connection
    until: float


class WriterStopped(Exception):
    """A writer task ended unexpectedly: nothing more is stored until the receiver is restarted (503)."""


@dataclass
class _ExistingIds:
    """The ids of all stored connections as last read, and until when they are trusted."""

    ids: frozenset[str] = frozenset()
    until: float = 0.0
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class _GroupCommit:
    """Writer tasks that insert queued rows of many requests in one transaction, then wake them.

    A request's rows are inserted together; when a group fails on a row the database refuses, each
    request of the group is retried alone so only its own rows fail. A request learns its outcome
    (committed, or the error) only after the transaction ended. A writer that dies of an unexpected
    error fails the requests it holds and every queued one, and marks the writers `broken`, so later
    writes fail at once (the receiver answers 503 and reports itself unhealthy) instead of waiting.
    """

    def __init__(self, pool: AsyncConnectionPool, insert: str, writers: int = WRITERS, limit: int = GROUP_ROWS):
        self.pool, self.insert, self.writers, self.limit = pool, insert, writers, limit
        self.queue: asyncio.Queue[tuple[list[tuple[Any, ...]], asyncio.Future[None]]] = asyncio.Queue()
        self.tasks: list[asyncio.Task[None]] = []
        self.broken = False

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._run(), name=f"webhook-writer-{n}") for n in range(self.writers)]
        for task in self.tasks:
            task.add_done_callback(self._ended)

    def _ended(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()  # retrieved here, so asyncio does not log it with its message
        self.broken = True
        log.error("webhook writer %s stopped (%s); the receiver answers 503 until it is restarted", task.get_name(),
                  type(exc).__name__)  # fmt: skip
        self._fail_queued(WriterStopped("a webhook writer stopped"))

    def _fail_queued(self, error: Exception) -> None:
        while not self.queue.empty():
            _, waiter = self.queue.get_nowait()
            if not waiter.done():
                waiter.set_exception(error)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        self._fail_queued(psycopg.OperationalError("the receiver is shutting down"))

    async def write(self, rows: list[tuple[Any, ...]]) -> None:
        """Insert `rows` (one request's) and return once they are committed; raises what the database raised,
        or `WriterStopped`."""
        if self.broken:
            raise WriterStopped("a webhook writer stopped")
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self.queue.put((rows, waiter))
        await waiter

    async def _run(self) -> None:
        while True:
            group = [await self.queue.get()]
            size = len(group[0][0])
            while size < self.limit and not self.queue.empty():
                group.append(self.queue.get_nowait())
                size += len(group[-1][0])
            try:
                outcomes = await self._outcomes([rows for rows, _ in group])
            except BaseException as exc:  # stopping, or a bug: whatever was taken is answered as not stored
                error: Exception = (
                    psycopg.OperationalError("the receiver is shutting down")
                    if isinstance(exc, asyncio.CancelledError)
                    else WriterStopped("a webhook writer stopped")
                )
                for _, waiter in group:
                    if not waiter.done():
                        waiter.set_exception(error)
                raise
            for (_, waiter), outcome in zip(group, outcomes, strict=True):
                if waiter.done():
                    continue
                if outcome is None:
                    waiter.set_result(None)
                else:
                    waiter.set_exception(outcome)

    async def _outcomes(self, group: list[list[tuple[Any, ...]]]) -> list[BaseException | None]:
        """Commit the group's rows in one transaction; per request, None once committed or its error."""
        try:
            await self._commit([row for rows in group for row in rows])
        except (psycopg.OperationalError, PoolTimeout) as exc:
            return [exc] * len(group)
        except psycopg.Error:
            return [await self._alone(rows) for rows in group]
        return [None] * len(group)

    async def _alone(self, rows: list[tuple[Any, ...]]) -> BaseException | None:
        try:
            await self._commit(rows)
        except psycopg.Error as exc:
            return exc
        except PoolTimeout as exc:
            return exc
        return None

    async def _commit(self, rows: list[tuple[Any, ...]]) -> None:
        async with self.pool.connection() as conn, conn.transaction(), conn.cursor() as cur:
            await cur.executemany(self.insert, rows)


def build_app(
    *,
    database_url: str,
    schema: str,
    box: SecretBox | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    clock: Callable[[], float] = time.time,
    pool_size: int = 8,
    cache_seconds: float = CONNECTION_CACHE_SECONDS,
    unknown_seconds: float = 2.0,
    body_seconds: float = BODY_SECONDS,
) -> Starlette:
    """The receiver ASGI app over a connection pool to the mirror database.

    `unknown_seconds`: how long the list of connection ids is trusted to refuse an unknown id without a
    query (0: look each id up); `body_seconds`: the deadline for reading a whole body (408 beyond).
    """
    box = box or SecretBox.from_environment()
    pool = AsyncConnectionPool(libpq_url(database_url), min_size=1, max_size=pool_size, open=False, timeout=5,
                               kwargs={"autocommit": True})  # fmt: skip
    connections = table("integration_connections", schema)
    inbox = table("webhook_events", schema)
    lookup = (
        sql.SQL("SELECT provider, secrets_encrypted, display_name, base_url, settings, status FROM {} WHERE id = %s")
        .format(connections)
        .as_string()
    )
    insert = (
        sql.SQL(
            "INSERT INTO {t} (provider, connection_id, event_id, event_type, occurred_at, payload, raw_body, headers, "
            "status, last_error, delivery_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (provider, connection_id, event_id) DO NOTHING"
        )
        .format(t=inbox)
        .as_string()
    )
    # One body per signed delivery id (see `WebhookSpec.delivery_header`), checked under a lock on that id.
    other_body = (
        sql.SQL(
            "SELECT 1 FROM {t} WHERE provider = %s AND connection_id = %s AND delivery_id = %s AND raw_body <> %s "
            "LIMIT 1"
        )
        .format(t=inbox)
        .as_string()
    )
    all_ids = sql.SQL("SELECT id FROM {}").format(connections).as_string()
    writer = _GroupCommit(pool, insert)
    known: dict[str, _Known] = {}
    existing = _ExistingIds()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await pool.open(wait=False)
        writer.start()
        try:
            yield
        finally:
            await writer.stop()
            await pool.close()

    async def load(connection_id: str) -> _Known | None:
        """The connection's row and secrets, read now; None when there is no such connection."""
        async with pool.connection() as conn:
            row = await (await conn.execute(lookup, (connection_id,))).fetchone()
        if row is None:
            known.pop(connection_id, None)
            return None
        secrets = dict(box.decrypt(connection_id, row[1]).reveal()) if row[1] else {}
        found = _Known(row[0], secrets, Connection(id=connection_id, provider=row[0], display_name=row[2],
                                                   base_url=row[3], settings=row[4] or {}, status=row[5]),
                       time.monotonic() + cache_seconds)  # fmt: skip
        if cache_seconds > 0:
            known[connection_id] = found
        return found

    async def exists(connection_id: str) -> bool:
        """Whether the id is a stored connection, by the list of ids read at most once per `unknown_seconds`:
        a flood of made-up ids costs no query each."""
        if unknown_seconds <= 0:
            return True  # no list kept: `load` looks each id up
        if existing.until <= time.monotonic():
            async with existing.lock:
                if existing.until <= time.monotonic():
                    async with pool.connection() as conn:
                        rows = await (await conn.execute(all_ids)).fetchall()
                    existing.ids = frozenset(row[0] for row in rows)
                    existing.until = time.monotonic() + unknown_seconds
        return connection_id in existing.ids

    async def verify(spec: Any, entry: _Known, headers: dict[str, str], body: bytes) -> None:
        secret = entry.secrets.get(spec.secret_name) or os.environ.get(spec.env_var)
        if not secret:
            raise InvalidSignature(f"no webhook secret is configured for {entry.connection.id!r}")
        if spec.verify_connection is None:
            spec.verify(headers, body, str(secret), clock())
        else:
            await spec.verify_connection(VerifyContext(headers, body, str(secret), clock(), entry.connection,
                                                       entry.secrets, database_url, box))  # fmt: skip

    async def receive(request: Request) -> Response:
        name, connection_id = request.path_params["provider"], request.path_params["connection_id"]
        provider = PROVIDERS.get(name)
        spec = provider.webhooks if provider else None
        if spec is None:
            return _reply(404, "no webhooks for this provider")
        try:
            body = await _read_body(request, max_body_bytes, body_seconds)
        except _TooLarge:
            return _reply(413, f"body larger than {max_body_bytes} bytes")
        except _TooSlow:
            response = _reply(408, f"body not received within {body_seconds:g} s")
            response.headers["connection"] = "close"
            return response
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            entry = known.get(connection_id)
            cached = entry is not None and entry.until > time.monotonic()
            if not cached:
                # An id seen before is read again at once; any other must be in the list of ids first.
                entry = await load(connection_id) if entry is not None or await exists(connection_id) else None
            if entry is None or entry.provider != name:
                raise InvalidSignature("no such connection of this provider")  # answered as a bad signature
            try:
                await verify(spec, entry, headers, body)
            except InvalidSignature:
                if not cached:
                    raise
                # Checked against a kept secret: the stored one may have just been rotated.
                fresh = await load(connection_id)
                if fresh is None or fresh.provider != name:
                    raise
                if (fresh.secrets.get(spec.secret_name), fresh.connection) == (
                    entry.secrets.get(spec.secret_name),
                    entry.connection,
                ):
                    raise
                await verify(spec, fresh, headers, body)
        except InvalidSignature as exc:
            if entry is not None and entry.provider == name and _is_handshake(spec, body):
                # Xero's intent-to-receive check sends some deliveries signed wrongly on purpose and expects 401.
                log.info("%s intent-to-receive check for %r: a delivery not signed with the stored key, answered 401 "
                         "as Xero expects for its deliberately mis-signed ones (if Xero reports the check failed, "
                         "store the app's key with `nextcrm-pipelines webhooks configure %s`)",
                         name, connection_id, connection_id)  # fmt: skip
            else:
                log.warning("webhook for %r refused: %s", connection_id, exc)
            return _reply(401, "invalid signature")
        except VerificationUnavailable as exc:
            log.warning("webhook for %r not verified yet: %s", connection_id, exc)
            return _reply(503, "signature cannot be checked now; retry later")
        except StaleKey as exc:
            log.error("webhook for %r not verified: %s", connection_id, exc)
            return _reply(503, "secrets unavailable")
        except VaultError:
            log.error("webhook for %r: its secrets cannot be decrypted with the current keys", connection_id)
            return _reply(503, "secrets unavailable")
        except (psycopg.OperationalError, PoolTimeout) as exc:
            log.error("webhook for %r not stored, the database is unavailable: %s", connection_id, type(exc).__name__)
            return _reply(503, "database unavailable; retry later")
        kept = Jsonb({k: v for k, v in headers.items() if k in spec.audit_headers or k in ALWAYS_KEPT_HEADERS},
                     dumps=_json_text)  # fmt: skip
        text = body.decode("utf-8", "replace")
        delivery = headers.get(spec.delivery_header) if spec.delivery_header else None
        try:
            payload = orjson.loads(body)
            if spec.handshake(payload):
                log.info("%s intent-to-receive check for %r: a correctly signed delivery, answered 200", name,
                         connection_id)  # fmt: skip
                return _reply(200)
            events = spec.events(payload)
            if any(len(event.event_id) > MAX_EVENT_ID_CHARS for event in events):
                raise ValueError(f"an event id is longer than {MAX_EVENT_ID_CHARS} characters")
        except Exception as exc:  # a signed body whose events cannot be read, however it fails: kept, 400
            return await refused(exc, body, text, kept, name, connection_id, delivery)
        rows = [(name, connection_id, event.event_id, event.event_type, event.occurred_at,
                 Jsonb(event.payload, dumps=_json_text), text, kept, "pending", None, delivery)
                for event in events]  # fmt: skip
        try:
            status = await store(rows, name, connection_id, delivery, text) if rows else None
        except psycopg.DataError as exc:  # e.g. a \u0000 escape, which jsonb cannot hold
            return await refused(exc, body, text, kept, name, connection_id, delivery)
        return status if status is not None else _reply(200)

    async def refused(exc: Exception, body: bytes, text: str, kept: Jsonb, name: str, connection_id: str,
                      delivery: str | None) -> Response:  # fmt: skip
        """Keep a signed body that holds no storable event as `dead`, for audit, and answer 400."""
        digest = "body:" + hashlib.sha256(body).hexdigest()
        error = f"unreadable event: {type(exc).__name__}: {exc}"[:500].replace("\x00", "")
        audit = text.replace("\x00", "")  # text columns cannot hold NUL; the digest names the exact bytes
        rows = [(name, connection_id, digest, None, None, None, audit, kept, "dead", error, delivery)]
        status = await store(rows, name, connection_id, delivery, audit)
        return status if status is not None else _reply(400, "body is not a readable event")

    async def store(rows: list[tuple[Any, ...]], name: str, connection_id: str, delivery: str | None,
                    text: str) -> Response | None:  # fmt: skip
        """Commit the rows; None once committed, else the answer to give (401 or 503)."""
        try:
            if writer.broken:  # the receiver is unhealthy as a whole: it stores nothing until restarted
                raise WriterStopped("a webhook writer stopped")
            if not delivery:
                await writer.write(rows)
                return None
            async with pool.connection() as conn, conn.transaction():
                await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                                   (f"webhook|{name}|{connection_id}|{delivery}",))  # fmt: skip
                if await (await conn.execute(other_body, (name, connection_id, delivery, text))).fetchone():
                    log.warning("webhook for %r refused: delivery %r was already received with another body",
                                connection_id, delivery)  # fmt: skip
                    return _reply(401, "invalid signature")
                async with conn.cursor() as cur:
                    await cur.executemany(insert, rows)
            return None
        except (psycopg.OperationalError, PoolTimeout) as exc:
            log.error("webhook for %r not stored, the database is unavailable: %s", connection_id, type(exc).__name__)
            return _reply(503, "database unavailable; retry later")
        except WriterStopped:
            return _reply(503, "the receiver cannot store events now; retry later")

    async def health(request: Request) -> Response:
        """200 while the receiver can store events; 503 once a writer task died (restart it)."""
        return _reply(503, "a webhook writer stopped") if writer.broken else _reply(200)

    routes = [
        Route("/webhooks/{provider}/{connection_id}", receive, methods=["POST"]),
        Route("/healthz", health, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def receiver_url(base: str, provider: str, connection_id: str) -> str:
    """Where a provider should deliver a connection's webhooks."""
    return f"{base.rstrip('/')}/webhooks/{provider}/{connection_id}"


def _with_header_deadline(base: type[Any], seconds: float, max_bytes: int) -> type[asyncio.Protocol]:
    """`base` (uvicorn's httptools or h11 protocol) with a deadline for each request's line and headers:
    a connection that has not sent them whole within `seconds` of its first byte (or of connecting) is
    answered 408 and closed. With httptools the headers are also limited to `max_bytes` (400 beyond;
    h11 has its own limit, `h11_max_incomplete_event_size`)."""
    h11_based = base.__module__.endswith("h11_impl")
    if h11_based:
        import h11

    class Protocol(base):  # type: ignore[misc, valid-type]
        _deadline: asyncio.TimerHandle | None = None
        _header_bytes = 0

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(seconds, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        if h11_based:

            def data_received(self, data: bytes) -> None:
                if self.conn.their_state is h11.IDLE:
                    self._arm()
                super().data_received(data)
                if self.conn.their_state is not h11.IDLE:
                    self._disarm()

        else:

            def on_message_begin(self) -> None:
                self._header_bytes = 0
                self._arm()
                super().on_message_begin()

            def on_url(self, url: bytes) -> None:
                self._count(len(url))
                super().on_url(url)

            def on_header(self, name: bytes, value: bytes) -> None:
                self._count(len(name) + len(value))
                super().on_header(name, value)

            def _count(self, size: int) -> None:
                self._header_bytes += size
                if self._header_bytes > max_bytes:
                    raise ValueError("request headers too large")  # the parser answers 400 and closes

            def on_headers_complete(self) -> None:
                self._disarm()
                super().on_headers_complete()

    Protocol.__name__ = f"Deadline{base.__name__}"
    return Protocol


def server_config(app: Any, *, host: str, port: int, http: str = "auto", header_seconds: float = HEADER_SECONDS,
                  max_header_bytes: int = MAX_HEADER_BYTES, **options: Any) -> Any:  # fmt: skip
    """The uvicorn config the receiver is served with: deadlines for slow clients (headers here, the body
    in the app), a header size limit, a short keep-alive and a bound on connections served at once.

    `http`: "auto" (httptools when installed, as uvicorn chooses), "httptools" or "h11".
    """
    import uvicorn

    if http == "auto":
        try:
            import httptools  # noqa: F401
        except ImportError:
            http = "h11"
        else:
            http = "httptools"
    if http == "httptools":
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol as base
    else:
        from uvicorn.protocols.http.h11_impl import H11Protocol as base
    protocol = _with_header_deadline(base, header_seconds, max_header_bytes)
    settings: dict[str, Any] = {"timeout_keep_alive": KEEP_ALIVE_SECONDS, "limit_concurrency": MAX_CONNECTIONS,
                                "h11_max_incomplete_event_size": max_header_bytes, "access_log": False,
                                **options}  # fmt: skip
    return uvicorn.Config(app, host=host, port=port, http=protocol, **settings)


def serve(*, database_url: str, schema: str, host: str, port: int) -> None:
    """Run the receiver with uvicorn until interrupted."""
    import uvicorn

    app = build_app(database_url=database_url, schema=schema)
    uvicorn.Server(server_config(app, host=host, port=port, log_level="info")).run()
