"""The webhook receiver: `POST /webhooks/{provider}/{connection_id}` → verify → inbox → 2xx.

It does nothing else (processing is Dagster's job). The body is read up to a size limit (413
beyond); an unknown provider or connection is 404; a missing or wrong signature is 401 and nothing
is stored; a body that is signed but not a readable event is recorded as `dead` for audit and
answered 400; when the database cannot be reached the answer is 503, so the provider retries. A
2xx goes out only after the row is committed, and a redelivered event is a no-op (unique on
provider, connection and event id). Xero's intent-to-receive deliveries get their 200 or 401 and
store nothing. A provider check that needs the connection or the network (`verify_connection`) runs
between two short uses of the pool, so no database connection waits on a provider; when it cannot
reach what it needs the answer is 503, so the provider retries.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

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
from nextcrm_pipelines.core.vault import SecretBox, VaultError
from nextcrm_pipelines.providers import PROVIDERS
from nextcrm_pipelines.webhooks.verify import InvalidSignature, VerificationUnavailable, VerifyContext

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1_048_576
ALWAYS_KEPT_HEADERS = ("content-type", "user-agent")


class _TooLarge(Exception):
    pass


def _reply(status: int, message: str | None = None) -> Response:
    if message is None:
        return Response(status_code=status)
    return Response(orjson.dumps({"error": message}), status_code=status, media_type="application/json")


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def build_app(
    *,
    database_url: str,
    schema: str,
    box: SecretBox | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    clock: Callable[[], float] = time.time,
    pool_size: int = 8,
) -> Starlette:
    """The receiver ASGI app over a connection pool to the mirror database."""
    box = box or SecretBox.from_environment()
    pool = AsyncConnectionPool(libpq_url(database_url), min_size=1, max_size=pool_size, open=False, timeout=5)
    connections = table("integration_connections", schema)
    inbox = table("webhook_events", schema)
    lookup = sql.SQL(
        "SELECT provider, secrets_encrypted, display_name, base_url, settings, status FROM {} WHERE id = %s"
    ).format(connections)
    insert = sql.SQL(
        "INSERT INTO {t} (provider, connection_id, event_id, event_type, occurred_at, payload, raw_body, headers, "
        "status, last_error, delivery_id) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
        "ON CONFLICT (provider, connection_id, event_id) DO NOTHING"
    ).format(t=inbox)
    # One body per signed delivery id (see `WebhookSpec.delivery_header`), checked under a lock on that id.
    other_body = sql.SQL(
        "SELECT 1 FROM {t} WHERE provider = %s AND connection_id = %s AND delivery_id = %s AND raw_body <> %s LIMIT 1"
    ).format(t=inbox)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await pool.open(wait=False)
        try:
            yield
        finally:
            await pool.close()

    async def receive(request: Request) -> Response:
        name, connection_id = request.path_params["provider"], request.path_params["connection_id"]
        provider = PROVIDERS.get(name)
        spec = provider.webhooks if provider else None
        if spec is None:
            return _reply(404, f"no webhooks for provider {name!r}")
        try:
            body = await _read_body(request, max_body_bytes)
        except _TooLarge:
            return _reply(413, f"body larger than {max_body_bytes} bytes")
        headers = {k.lower(): v for k, v in request.headers.items()}
        try:
            async with pool.connection() as conn:
                row = await (await conn.execute(lookup, (connection_id,))).fetchone()
        except (psycopg.OperationalError, PoolTimeout) as exc:
            log.error("webhook for %s not stored, the database is unavailable: %s", connection_id, type(exc).__name__)
            return _reply(503, "database unavailable; retry later")
        if row is None or row[0] != name:
            return _reply(404, f"no {name} connection {connection_id!r}")
        try:
            secrets = box.decrypt(connection_id, row[1]).reveal() if row[1] else {}
        except VaultError:
            log.error("webhook for %s: its secrets cannot be decrypted with the current keys", connection_id)
            return _reply(503, "secrets unavailable")
        secret = secrets.get(spec.secret_name) or os.environ.get(spec.env_var)
        if not secret:
            return _reply(401, f"no webhook secret is configured for {connection_id!r}")
        try:
            if spec.verify_connection is None:
                spec.verify(headers, body, str(secret), clock())
            else:
                connection = Connection(id=connection_id, provider=row[0], display_name=row[2], base_url=row[3],
                                        settings=row[4] or {}, status=row[5])  # fmt: skip
                await spec.verify_connection(VerifyContext(headers, body, str(secret), clock(), connection, secrets,
                                                           database_url, box))  # fmt: skip
        except InvalidSignature as exc:
            log.warning("webhook for %s refused: %s", connection_id, exc)
            return _reply(401, "invalid signature")
        except VerificationUnavailable as exc:
            log.warning("webhook for %s not verified yet: %s", connection_id, exc)
            return _reply(503, "signature cannot be checked now; retry later")
        kept = {k: v for k, v in headers.items() if k in spec.audit_headers or k in ALWAYS_KEPT_HEADERS}
        text = body.decode("utf-8", "replace")
        delivery = headers.get(spec.delivery_header) if spec.delivery_header else None
        try:
            async with pool.connection() as conn:
                if delivery:
                    await conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))",
                                       (f"webhook|{name}|{connection_id}|{delivery}",))  # fmt: skip
                    if await (await conn.execute(other_body, (name, connection_id, delivery, text))).fetchone():
                        await conn.rollback()
                        log.warning("webhook for %s refused: delivery %s was already received with another body",
                                    connection_id, delivery)  # fmt: skip
                        return _reply(401, "invalid signature")
                try:
                    payload = orjson.loads(body)
                    if spec.handshake(payload):
                        await conn.rollback()
                        return _reply(200)
                    events = spec.events(payload)
                except (orjson.JSONDecodeError, ValueError, TypeError, KeyError) as exc:
                    digest = "body:" + hashlib.sha256(body).hexdigest()
                    error = f"unreadable event: {type(exc).__name__}: {exc}"[:500]
                    await conn.execute(insert, (name, connection_id, digest, None, None, None, text, Jsonb(kept),
                                                "dead", error, delivery))  # fmt: skip
                    await conn.commit()
                    return _reply(400, "body is not a readable event")
                for event in events:
                    await conn.execute(insert, (name, connection_id, event.event_id, event.event_type,
                                                event.occurred_at, Jsonb(event.payload), text, Jsonb(kept),
                                                "pending", None, delivery))  # fmt: skip
                await conn.commit()
        except (psycopg.OperationalError, PoolTimeout) as exc:
            log.error("webhook for %s not stored, the database is unavailable: %s", connection_id, type(exc).__name__)
            return _reply(503, "database unavailable; retry later")
        return _reply(200)

    async def health(request: Request) -> Response:
        return _reply(200)

    routes = [
        Route("/webhooks/{provider}/{connection_id}", receive, methods=["POST"]),
        Route("/healthz", health, methods=["GET"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def receiver_url(base: str, provider: str, connection_id: str) -> str:
    """Where a provider should deliver a connection's webhooks."""
    return f"{base.rstrip('/')}/webhooks/{provider}/{connection_id}"


def serve(*, database_url: str, schema: str, host: str, port: int) -> None:
    """Run the receiver with uvicorn until interrupted."""
    import uvicorn

    uvicorn.run(build_app(database_url=database_url, schema=schema), host=host, port=port, log_level="info")
