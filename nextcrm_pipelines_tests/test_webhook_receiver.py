"""The webhook receiver over real HTTP and a real Postgres: verify, store, acknowledge — or refuse.

Every refusal (forged signature, another connection's secret, a replayed Stripe timestamp, an
oversized body) stores nothing; a signed but unreadable body is kept as `dead` for audit; a
redelivery is a no-op; Xero's intent-to-receive handshake is answered and stores nothing; an
unreachable database gives 503 so the provider retries. Property tests check that no mutation of a
signed body or signature header verifies.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import socket
import time
import uuid

import httpx
import orjson
import psycopg
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import sql

from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.providers.stripe.webhooks import verify as verify_stripe
from nextcrm_pipelines.webhooks.verify import InvalidSignature, base64_hmac_verifier
from nextcrm_pipelines_tests.webhook_helpers import receiver

SECRET = "whsec_test_" + "a" * 24


def connection(database_url, box, provider: str, secrets: dict) -> str:
    with psycopg.connect(database_url) as conn:
        return vault.add_connection(conn, provider=provider, display_name=f"hook {uuid.uuid4().hex[:8]}",
                                    secrets=secrets, box=box).id  # fmt: skip


def inbox(database_url: str, schema: str) -> list[tuple]:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            sql.SQL("SELECT connection_id, event_id, event_type, status, raw_body FROM {} ORDER BY id").format(
                table("webhook_events", schema)
            )
        ).fetchall()


def stripe_event(event_id: str = "evt_1", kind: str = "charge.refunded") -> bytes:
    return orjson.dumps({"id": event_id, "object": "event", "type": kind, "created": int(time.time()),
                         "data": {"object": {"id": "ch_1", "object": "charge"}}})  # fmt: skip


def stripe_header(body: bytes, secret: str = SECRET, at: int | None = None) -> str:
    at = int(time.time()) if at is None else at
    return f"t={at},v1={hmac.new(secret.encode(), f'{at}.'.encode() + body, hashlib.sha256).hexdigest()}"


def b64(secret: str, body: bytes) -> str:
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha256).digest()).decode()


def test_stripe_events_are_stored_once_and_acknowledged_after_commit(database_url, schema, box):
    cid = connection(database_url, box, "stripe", {"api_key": "sk_test_x", "webhook_secret": SECRET})
    body = stripe_event()
    with receiver(database_url, schema, box) as url:
        target = f"{url}/webhooks/stripe/{cid}"
        for _ in range(3):  # delivered three times
            assert (
                httpx.post(target, content=body, headers={"Stripe-Signature": stripe_header(body)}).status_code == 200
            )
        # A rotated endpoint secret: the header carries signatures of both; one match is enough.
        other = stripe_event("evt_2")
        both = f"{stripe_header(other, 'whsec_old')},v1={stripe_header(other).split('v1=')[1]}"
        assert httpx.post(target, content=other, headers={"Stripe-Signature": both}).status_code == 200
    rows = inbox(database_url, schema)
    assert [(r[1], r[2], r[3]) for r in rows] == [("evt_1", "charge.refunded", "pending"), ("evt_2", "charge.refunded",
                                                                                          "pending")]  # fmt: skip
    assert rows[0][4] == body.decode()  # the exact bytes that were signed


def test_forged_replayed_oversized_and_foreign_deliveries_store_nothing(database_url, schema, box):
    cid = connection(database_url, box, "stripe", {"api_key": "sk_test_x", "webhook_secret": SECRET})
    other = connection(database_url, box, "stripe", {"api_key": "sk_test_y", "webhook_secret": "whsec_other_secret"})
    body = stripe_event()
    with receiver(database_url, schema, box, max_body_bytes=4096) as url:
        target = f"{url}/webhooks/stripe/{cid}"
        forged = stripe_header(body).replace("v1=", "v1=0")
        assert httpx.post(target, content=body, headers={"Stripe-Signature": forged[:-1]}).status_code == 401
        assert httpx.post(target, content=body).status_code == 401
        foreign = stripe_header(body, "whsec_other_secret")  # signed for the other connection
        assert httpx.post(target, content=body, headers={"Stripe-Signature": foreign}).status_code == 401
        assert httpx.post(f"{url}/webhooks/stripe/{other}", content=body,
                          headers={"Stripe-Signature": foreign}).status_code == 200  # fmt: skip
        replayed = stripe_header(body, at=int(time.time()) - 301)
        assert httpx.post(target, content=body, headers={"Stripe-Signature": replayed}).status_code == 401
        big = orjson.dumps({"id": "evt_big", "type": "x", "pad": "x" * 5000})
        assert httpx.post(target, content=big, headers={"Stripe-Signature": stripe_header(big)}).status_code == 413
        assert httpx.post(f"{url}/webhooks/stripe/nope", content=body,
                          headers={"Stripe-Signature": stripe_header(body)}).status_code == 401  # fmt: skip
        assert httpx.post(f"{url}/webhooks/unknown/{cid}", content=body).status_code == 404
        assert httpx.post(f"{url}/webhooks/xero/{cid}", content=body).status_code == 401  # not a Xero connection
    assert [(r[0], r[1]) for r in inbox(database_url, schema)] == [(other, "evt_1")]


def test_a_signed_body_that_is_not_an_event_is_kept_for_audit_and_refused(database_url, schema, box):
    cid = connection(database_url, box, "stripe", {"api_key": "sk_test_x", "webhook_secret": SECRET})
    body = b'{"id": "evt_broken", "type": '
    with receiver(database_url, schema, box) as url:
        response = httpx.post(f"{url}/webhooks/stripe/{cid}", content=body,
                              headers={"Stripe-Signature": stripe_header(body)})  # fmt: skip
    assert response.status_code == 400
    ((_, event_id, _, status, raw),) = inbox(database_url, schema)
    assert status == "dead" and raw == body.decode() and event_id.startswith("body:")


def test_a_rotated_secret_works_at_once_and_a_body_jsonb_cannot_hold_is_kept_dead(database_url, schema, box):
    connection_id = connection(database_url, box, "stripe", {"webhook_secret": SECRET})
    rotated = "whsec_rotated_" + "c" * 24
    nul = orjson.dumps({"id": "evt_nul", "object": "event", "type": "charge.updated", "created": int(time.time()),
                        "data": {"object": {"id": "ch_1", "object": "charge", "description": "a\u0000b"}}})  # fmt: skip
    with receiver(database_url, schema, box) as url:
        target = f"{url}/webhooks/stripe/{connection_id}"
        first = stripe_event("evt_before")
        assert httpx.post(target, content=first, headers={"Stripe-Signature": stripe_header(first)}).status_code == 200
        with psycopg.connect(database_url) as conn:
            vault.update_secrets(conn, connection_id, {"webhook_secret": rotated}, box)
        after = stripe_event("evt_after")
        signed_new = {"Stripe-Signature": stripe_header(after, rotated)}
        assert httpx.post(target, content=after, headers=signed_new).status_code == 200  # not held back by a cache
        old = stripe_event("evt_old_secret")
        assert httpx.post(target, content=old, headers={"Stripe-Signature": stripe_header(old)}).status_code == 401
        response = httpx.post(target, content=nul, headers={"Stripe-Signature": stripe_header(nul, rotated)})
        assert response.status_code == 400  # signed, but jsonb cannot store \u0000: kept for audit, not a 500
    stored = [(event_id, status) for _, event_id, _, status, _ in inbox(database_url, schema)]
    assert stored[:2] == [("evt_before", "pending"), ("evt_after", "pending")]
    assert len(stored) == 3 and stored[2][0].startswith("body:") and stored[2][1] == "dead"


def test_xero_intent_to_receive_and_thin_events(database_url, schema, box):
    key = "xero-webhook-key-" + "k" * 20
    cid = connection(database_url, box, "xero", {"webhook_key": key})
    handshake = orjson.dumps({"events": [], "lastEventSequence": 0, "firstEventSequence": 0, "entropy": "ABC"})
    event = {"resourceUrl": "https://api.xero.com/api.xro/2.0/Invoices/1", "resourceId": str(uuid.uuid4()),
             "eventDateUtc": "2026-11-26T01:15:39.902", "eventType": "UPDATE", "eventCategory": "INVOICE",
             "tenantId": str(uuid.uuid4()), "tenantType": "ORGANISATION"}  # fmt: skip
    body = orjson.dumps({"events": [event], "firstEventSequence": 1, "lastEventSequence": 1, "entropy": "X"})
    with receiver(database_url, schema, box) as url:
        target = f"{url}/webhooks/xero/{cid}"
        started = time.monotonic()
        good = httpx.post(target, content=handshake, headers={"x-xero-signature": b64(key, handshake)})
        bad = httpx.post(target, content=handshake, headers={"x-xero-signature": b64("wrong", handshake)})
        assert (good.status_code, good.content, bad.status_code) == (200, b"", 401)
        assert time.monotonic() - started < 5
        assert inbox(database_url, schema) == []
        for _ in range(2):
            assert httpx.post(target, content=body, headers={"x-xero-signature": b64(key, body)}).status_code == 200
    ((_, _, kind, status, _),) = inbox(database_url, schema)
    assert (kind, status) == ("INVOICE.UPDATE", "pending")


def test_quickbooks_both_payload_shapes_and_mautic_without_ids(database_url, schema, box):
    token = "qbo-verifier-token"
    qbo = connection(database_url, box, "quickbooks", {"webhook_verifier_token": token})
    mautic = connection(database_url, box, "mautic", {"webhook_secret": "mautic-hook-secret"})
    entities = [
        {"name": "Invoice", "id": "130", "operation": "Update", "lastUpdated": "2026-11-26T14:42:19-0700"},
        {"name": "Invoice", "id": "131", "operation": "Delete", "lastUpdated": "2026-11-26T14:42:20-0700"},
    ]
    legacy = orjson.dumps(
        {"eventNotifications": [{"realmId": "1185883450", "dataChangeEvent": {"entities": entities}}]}
    )
    cloud = orjson.dumps([{"specversion": "1.0", "id": str(uuid.uuid4()), "source": "intuit.x",
                           "type": "qbo.invoice.voided.v1", "time": "2026-11-26T21:31:25.179Z",
                           "intuitentityid": "130", "intuitaccountid": "1185883450", "data": {}}])  # fmt: skip
    hook = b'{"mautic.lead_post_save_update":[{"contact":{"id":7},"timestamp":"2026-11-26T09:31:18+00:00"}]}'
    with receiver(database_url, schema, box) as url:
        for body in (legacy, cloud):
            response = httpx.post(f"{url}/webhooks/quickbooks/{qbo}", content=body,
                                  headers={"intuit-signature": b64(token, body)})  # fmt: skip
            assert response.status_code == 200
        for _ in range(2):
            response = httpx.post(f"{url}/webhooks/mautic/{mautic}", content=hook,
                                  headers={"Webhook-Signature": b64("mautic-hook-secret", hook)})  # fmt: skip
            assert response.status_code == 200
    kinds = sorted(r[2] for r in inbox(database_url, schema))
    assert kinds == ["Invoice.Delete", "Invoice.Update", "mautic.lead_post_save_update", "qbo.invoice.voided.v1"]


def test_an_unreachable_database_answers_503_so_the_provider_retries(schema, box):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    dead = f"postgresql://postgres@127.0.0.1:{closed}/postgres?connect_timeout=1"
    body = stripe_event()
    with receiver(dead, schema, box) as url:
        response = httpx.post(f"{url}/webhooks/stripe/any", content=body,
                              headers={"Stripe-Signature": stripe_header(body)}, timeout=30)  # fmt: skip
    assert response.status_code == 503


@settings(max_examples=200, deadline=None)
@given(body=st.binary(min_size=1, max_size=400), position=st.integers(min_value=0), flip=st.integers(1, 255))
def test_no_mutation_of_a_signed_stripe_body_or_header_verifies(body, position, flip):
    now = time.time()
    header = stripe_header(body, at=int(now))
    verify_stripe({"stripe-signature": header}, body, SECRET, now)
    mutated = bytearray(body)
    mutated[position % len(body)] ^= flip
    with pytest.raises(InvalidSignature):
        verify_stripe({"stripe-signature": header}, bytes(mutated), SECRET, now)
    spoiled = bytearray(header.encode())
    spoiled[position % len(spoiled)] ^= flip
    try:
        spoiled_header = spoiled.decode()
    except UnicodeDecodeError:
        return
    if spoiled_header != header:
        with pytest.raises(InvalidSignature):
            verify_stripe({"stripe-signature": spoiled_header}, body, SECRET, now)


@settings(max_examples=200, deadline=None)
@given(body=st.binary(min_size=1, max_size=400), position=st.integers(min_value=0), flip=st.integers(1, 255))
def test_no_mutation_of_a_base64_hmac_signed_body_verifies(body, position, flip):
    verify = base64_hmac_verifier("x-xero-signature")
    signature = b64("key", body)
    verify({"x-xero-signature": signature}, body, "key", 0)
    mutated = bytearray(body)
    mutated[position % len(body)] ^= flip
    with pytest.raises(InvalidSignature):
        verify({"x-xero-signature": signature}, bytes(mutated), "key", 0)
    with pytest.raises(InvalidSignature):
        verify({"x-xero-signature": signature}, body, "other key", 0)
