"""PayPal webhooks: certificate-signed deliveries, checked offline (or by PayPal), applied to the mirror tables.

Verification (``docs/providers/paypal.md``, Webhooks). PayPal signs
``"{transmission_id}|{transmission_time}|{webhook_id}|{crc32}"``
(the unsigned decimal CRC-32 of the raw body, and the id of *our* webhook, kept as the connection's
`webhook_id` secret or `PAYPAL_WEBHOOK_ID`) with SHA256withRSA and sends the base64 signature with the
URL of its certificate. The certificate URL is accepted only over https from PayPal's API hosts under
`/v1/notifications/certs/`, or under the connection's own API base (a sandbox); anything else is
refused before any request is made. A certificate must be in date, name PayPal's message-verification
host (CN `messageverificationcerts…paypal.com`) and chain to a trust root: the certifi bundle for
PayPal's hosts, the connection's `webhook_ca_pem` (setting or secret) for its base URL. Verified
certificates are cached by URL and trust root until they expire (at most a day). With the setting
`webhook_verification: online` the receiver asks PayPal instead (`POST /v1/notifications/verify-webhook-
signature` with the connection's token) and accepts only `SUCCESS`; the raw body is passed through as
`webhook_event` unchanged, since PayPal checks its CRC over what it parses and serialises again.

The signed transmission time must lie within PayPal's retry horizon (it retries a delivery for up to
three days) and not more than five minutes ahead of our clock; a replayed delivery is a no-op in the
inbox. The CRC-32 the signature covers is not collision resistant: a body forged to the same CRC passes
the signature check, so the receiver accepts one body per transmission id (`delivery_header`): a forged
body replayed under a genuine delivery's headers is refused once that delivery is stored, and headers
of a delivery that never arrived stop being usable when the horizon passes. Deliveries should still
reach the receiver over TLS only, so the genuine ones cannot be withheld and replaced.

Apply. `PAYMENT.CAPTURE.*` and `PAYMENT.SALE.*` carry a capture (Payments v2) or a sale (v1) whose id
is the Transaction Search `transaction_id`; the event becomes the same `paypal_payments` row the sync
writes (key `<transaction_id>:<event code>`, `records.payment_row`): the code of a row already stored
for that transaction, else T0006 for Checkout captures, T0002 for subscription sales, T1107 for
refunds (T1106 for reversals). What the event knows is laid over the stored row (payer details from
the sync stay), as of the resource's `update_time`, never regressing. A refund event writes the
refund row and re-reads the refunded capture or sale, as the sync would show it refunded (status `V`,
or `F` when partly). `BILLING.SUBSCRIPTION.*` carry the subscription, written with its plan like the
sync; `BILLING.PLAN.*` (created, updated, activated, deactivated, pricing changes) carry the plan, written
as of its `update_time`; `INVOICING.INVOICE.*` (created, updated, scheduled, paid, refunded, cancelled)
carry `{"invoice": {...}}`, written as of the newest time its metadata names (a cancellation sets
`cancel_time`, not `last_update_time`). Other event types are processed and counted as skipped.

A connection without a `webhook_id` of its own is checked with the app-wide `PAYPAL_WEBHOOK_ID`, which
verifies a delivery posted to any connection's URL, so `apply` first makes sure each event is the
connection's merchant's: a capture names its merchant (`payee.merchant_id`, a refund's `payer`), which
decides when the connection has an `external_tenant`; otherwise the event is read back with the
connection's app (`GET /v1/notifications/webhooks-events/{id}`; PayPal scopes events to the app), and
one it does not know (404) is another merchant's: processed and counted as skipped, not applied.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import logging
import re
import threading
import warnings
import zlib
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import cache, lru_cache
from typing import Any
from urllib.parse import urlsplit

import anyio.to_thread
import certifi
import httpx
import orjson
from cryptography import x509
from cryptography.exceptions import InvalidSignature as BadSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import ExtensionPolicy, PolicyBuilder, Store, VerificationError
from psycopg import sql

from nextcrm_pipelines.core.connections import Connection, fix_hint, set_secret_command
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.http import AuthenticationFailed, HttpClient, ProviderError, RetryPolicy
from nextcrm_pipelines.core.oauth import BearerAuth, TokenManager
from nextcrm_pipelines.core.upsert import BatchCounts, Row
from nextcrm_pipelines.core.vault import Secrets
from nextcrm_pipelines.providers.paypal.client import OAUTH, classify
from nextcrm_pipelines.providers.paypal.records import (
    INVOICES_TABLE,
    PAYMENTS_TABLE,
    PLANS_TABLE,
    SUBSCRIPTIONS_TABLE,
    invoice_row,
    invoice_version,
    parse_time,
    payment_row,
    plan_row,
    subscription_row,
)
from nextcrm_pipelines.webhooks.inbox import ApplyContext, InboxRow, provider_knows
from nextcrm_pipelines.webhooks.verify import (
    InboxEvent,
    InvalidSignature,
    VerificationUnavailable,
    VerifyContext,
    WebhookSpec,
)

log = logging.getLogger(__name__)

AUTH_ALGO = "SHA256withRSA"
PAYPAL_CERT_HOSTS = frozenset(
    {"api.paypal.com", "api.sandbox.paypal.com", "api-m.paypal.com", "api-m.sandbox.paypal.com"}
)
CERT_PATH = "/v1/notifications/certs/"
MAX_CERT_BYTES = 65_536
CERT_FETCH_SECONDS = 10.0
CERT_CACHE_SECONDS = 86_400.0
# PayPal retries a delivery for up to three days; a transmission older than that is not PayPal's.
RETRY_HORIZON_SECONDS = 3 * 86_400.0
CLOCK_SKEW_SECONDS = 300.0
ONLINE_RETRY = RetryPolicy(max_attempts=3, base_delay=0.5, max_delay=2.0, budget_seconds=20.0)
HEADERS = ("paypal-transmission-id", "paypal-transmission-time", "paypal-transmission-sig", "paypal-cert-url",
           "paypal-auth-algo")  # fmt: skip

_TRANSMISSION_ID = re.compile(r"[A-Za-z0-9_-]{1,100}")
_CERT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,199}")
_URL_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789:/._-[]")


# --- the signature ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Transmission:
    """The PAYPAL-* headers of one delivery, checked for shape."""

    id: str
    time: str
    signature: bytes
    signature_text: str
    cert_url: str
    auth_algo: str


def transmission(headers: Mapping[str, str]) -> Transmission:
    """The delivery's PAYPAL-* headers; `InvalidSignature` when one is missing or malformed."""
    found = {k.lower(): v for k, v in headers.items()}
    missing = [name.upper() for name in HEADERS if not found.get(name)]
    if missing:
        raise InvalidSignature(f"missing {', '.join(missing)}")
    algo = found["paypal-auth-algo"].strip()
    if algo != AUTH_ALGO:
        raise InvalidSignature(f"PAYPAL-AUTH-ALGO must be {AUTH_ALGO}")
    tid, at = found["paypal-transmission-id"].strip(), found["paypal-transmission-time"].strip()
    if not _TRANSMISSION_ID.fullmatch(tid):
        raise InvalidSignature("PAYPAL-TRANSMISSION-ID is malformed")
    try:
        parse_time(at)
    except (ValueError, OverflowError):  # OverflowError: a time that leaves the calendar once in UTC
        raise InvalidSignature("PAYPAL-TRANSMISSION-TIME is not an RFC 3339 time") from None
    text = found["paypal-transmission-sig"].strip()
    try:
        signature = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidSignature("PAYPAL-TRANSMISSION-SIG is not base64") from None
    if len(text) > 2048 or base64.b64encode(signature).decode() != text:
        raise InvalidSignature("PAYPAL-TRANSMISSION-SIG is not canonical base64")
    return Transmission(tid, at, signature, text, found["paypal-cert-url"].strip(), algo)


def signed_message(transmission_id: str, transmission_time: str, webhook_id: str, body: bytes) -> bytes:
    """What PayPal signs: `id|time|webhook_id|crc32`, the CRC-32 of the raw body as an unsigned decimal."""
    return f"{transmission_id}|{transmission_time}|{webhook_id}|{zlib.crc32(body) & 0xFFFFFFFF}".encode()


def verify_signature(headers: Mapping[str, str], body: bytes, webhook_id: str, public_key: Any) -> None:
    """The offline check of one delivery against a certificate's key; raises `InvalidSignature`."""
    sent = transmission(headers)
    if not isinstance(public_key, rsa.RSAPublicKey):
        raise InvalidSignature("the certificate's key is not an RSA key")
    try:
        public_key.verify(sent.signature, signed_message(sent.id, sent.time, webhook_id, body), padding.PKCS1v15(),
                          hashes.SHA256())  # fmt: skip
    except BadSignature:
        raise InvalidSignature("PAYPAL-TRANSMISSION-SIG does not match this webhook") from None


def verify(headers: Mapping[str, str], body: bytes, secret: str, now: float) -> None:
    """PayPal deliveries are checked with the connection (`verify_delivery`); without it nothing passes."""
    raise InvalidSignature("PayPal signatures need the connection's certificate trust (verify_delivery)")


# --- certificates --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertSource:
    """An allowed certificate URL and whose trust root applies: `paypal` (certifi) or `connection`."""

    url: str
    trust: str


def api_base(connection: Connection) -> str:
    """The connection's PayPal API base (its sandbox base URL, or PayPal's host for its mode)."""
    return OAUTH.url("api", "", connection.base_url, mode=(connection.settings or {}).get("mode"))


def cert_source(cert_url: str, connection: Connection) -> CertSource:
    """Where the certificate may come from, decided from the URL alone (nothing is fetched to decide)."""
    refused = InvalidSignature("PAYPAL-CERT-URL is not a PayPal certificate URL nor one under the connection's API")
    if len(cert_url) > 500 or not set(cert_url) <= _URL_CHARS:
        raise refused
    try:
        parts = urlsplit(cert_url)
        port = parts.port
    except ValueError:
        raise refused from None
    if parts.username is not None or parts.password is not None or parts.query or parts.fragment:
        raise refused
    host, path = parts.hostname or "", parts.path

    def named(prefix: str) -> bool:
        return path.startswith(prefix) and bool(_CERT_NAME.fullmatch(path[len(prefix) :]))

    if parts.scheme == "https" and host in PAYPAL_CERT_HOSTS and port in (None, 443) and named(CERT_PATH):
        return CertSource(cert_url, "paypal")
    if connection.base_url:
        api = urlsplit(api_base(connection))
        same_origin = (parts.scheme, host, port) == (api.scheme, api.hostname or "", api.port)
        if same_origin and named(api.path.rstrip("/") + CERT_PATH):
            return CertSource(cert_url, "connection")
    raise refused


@cache
def _paypal_roots() -> Store:
    with open(certifi.where(), "rb") as bundle, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Store(x509.load_pem_x509_certificates(bundle.read()))


@lru_cache(maxsize=16)
def _connection_roots(pem: str) -> Store:
    try:
        return Store(x509.load_pem_x509_certificates(pem.encode()))
    except ValueError:
        raise InvalidSignature("the connection's webhook_ca_pem is not a PEM certificate") from None


def trust_roots(source: CertSource, connection: Connection, secrets: Mapping[str, Any]) -> tuple[str, Store]:
    """(an id of the trust root, its store) for a certificate source."""
    if source.trust == "paypal":
        return "certifi", _paypal_roots()
    pem = (connection.settings or {}).get("webhook_ca_pem") or secrets.get("webhook_ca_pem")
    if not pem:
        raise InvalidSignature("a certificate under the connection's base URL needs its webhook_ca_pem trust root")
    return "pem:" + hashlib.sha256(str(pem).encode()).hexdigest(), _connection_roots(str(pem))


def check_certificate(chain: list[x509.Certificate], roots: Store, now: float) -> rsa.RSAPublicKey:
    """The key of a leaf certificate that is in date, names PayPal's message-verification host and chains
    to `roots` (the rest of `chain` as intermediates); raises `InvalidSignature`."""
    leaf, at = chain[0], datetime.fromtimestamp(now, UTC)
    if not leaf.not_valid_before_utc <= at <= leaf.not_valid_after_utc:
        raise InvalidSignature("the certificate is expired or not valid yet")
    names = leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(names[0].value) if names else ""
    if not (cn.startswith("messageverificationcerts") and cn.endswith(".paypal.com")):
        raise InvalidSignature("the certificate is not PayPal's message-verification certificate")
    verifier = (
        PolicyBuilder()
        .store(roots)
        .time(at)
        .extension_policies(ca_policy=ExtensionPolicy.webpki_defaults_ca(), ee_policy=ExtensionPolicy.permit_all())
        .build_client_verifier()
    )
    try:
        verifier.verify(leaf, chain[1:])
    except VerificationError:
        raise InvalidSignature("the certificate does not chain to a trusted root") from None
    key = leaf.public_key()
    if not isinstance(key, rsa.RSAPublicKey):
        raise InvalidSignature("the certificate's key is not an RSA key")
    return key


async def fetch_certificates(url: str) -> list[x509.Certificate]:
    """The PEM certificates at an allowed URL (no redirects, at most 64 KiB)."""
    chunks: list[bytes] = []
    try:
        async with (
            httpx.AsyncClient(timeout=CERT_FETCH_SECONDS, follow_redirects=False) as client,
            client.stream("GET", url, headers={"Accept": "application/x-pem-file, text/plain, */*"}) as response,
        ):
            if response.status_code >= 500 or response.status_code == 429:
                raise VerificationUnavailable(f"the certificate host answered {response.status_code}")
            if response.status_code != 200:
                raise InvalidSignature(f"the certificate URL answered {response.status_code}")
            size = 0
            async for chunk in response.aiter_bytes():
                size += len(chunk)
                if size > MAX_CERT_BYTES:
                    raise InvalidSignature("the certificate is larger than 64 KiB")
                chunks.append(chunk)
    except httpx.HTTPError as exc:
        raise VerificationUnavailable(f"the certificate host cannot be reached ({type(exc).__name__})") from None
    try:
        certs = x509.load_pem_x509_certificates(b"".join(chunks))
    except ValueError:
        raise InvalidSignature("the certificate URL holds no PEM certificate") from None
    if len(certs) > 8:
        raise InvalidSignature("the certificate chain is longer than 8")
    return certs


class CertificateCache:
    """Keys of verified certificates by (URL, trust root), at most `size`, each until its certificate
    expires or `seconds` pass."""

    def __init__(self, size: int = 64, seconds: float = CERT_CACHE_SECONDS) -> None:
        self.size = size
        self.seconds = seconds
        self._items: OrderedDict[tuple[str, str], tuple[rsa.RSAPublicKey, float]] = OrderedDict()
        self._lock = threading.Lock()

    def _get(self, key: tuple[str, str], now: float) -> rsa.RSAPublicKey | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            if now >= item[1]:
                del self._items[key]
                return None
            self._items.move_to_end(key)
            return item[0]

    def _put(self, key: tuple[str, str], value: rsa.RSAPublicKey, until: float) -> None:
        with self._lock:
            self._items[key] = (value, until)
            self._items.move_to_end(key)
            while len(self._items) > self.size:
                self._items.popitem(last=False)

    async def public_key(self, source: CertSource, trust: tuple[str, Store], now: float) -> rsa.RSAPublicKey:
        """The verified key of the certificate at `source` (downloaded and checked unless cached)."""
        key = (source.url, trust[0])
        cached = self._get(key, now)
        if cached is not None:
            return cached
        chain = await fetch_certificates(source.url)
        public = await anyio.to_thread.run_sync(check_certificate, chain, trust[1], now)
        self._put(key, public, min(chain[0].not_valid_after_utc.timestamp(), now + self.seconds))
        return public


CERTIFICATES = CertificateCache()


# --- the receiver's check ------------------------------------------------------------------------------------


def check_transmission_time(transmission_time: str, now: float) -> None:
    """Refuse a transmission time before PayPal's retry horizon or ahead of `now` beyond the clock skew."""
    parsed = parse_time(transmission_time)
    if parsed is None:
        raise InvalidSignature("PAYPAL-TRANSMISSION-TIME is missing")
    sent_at = parsed.timestamp()
    if sent_at < now - RETRY_HORIZON_SECONDS - CLOCK_SKEW_SECONDS:
        raise InvalidSignature("PAYPAL-TRANSMISSION-TIME is older than PayPal's three days of retries")
    if sent_at > now + CLOCK_SKEW_SECONDS:
        raise InvalidSignature("PAYPAL-TRANSMISSION-TIME is ahead of our clock by more than five minutes")


async def verify_delivery(ctx: VerifyContext) -> None:
    """Check one delivery for the connection: headers, the certificate URL (before any request), then the
    signature offline, or by PayPal when the connection's `webhook_verification` setting is `online`."""
    sent = transmission(ctx.headers)
    check_transmission_time(sent.time, ctx.now)
    source = cert_source(sent.cert_url, ctx.connection)
    mode = str((ctx.connection.settings or {}).get("webhook_verification", "offline")).lower()
    if mode == "online":
        await anyio.to_thread.run_sync(_verify_online, ctx, sent)
        return
    if mode != "offline":
        raise VerificationUnavailable(f"webhook_verification must be offline or online, not {mode!r}")
    key = await CERTIFICATES.public_key(source, trust_roots(source, ctx.connection, ctx.secrets), ctx.now)
    verify_signature(ctx.headers, ctx.body, ctx.secret, key)


def _verify_online(ctx: VerifyContext, sent: Transmission) -> None:
    try:
        event = orjson.loads(ctx.body)
    except orjson.JSONDecodeError:
        event = None
    if not isinstance(event, dict):
        raise InvalidSignature("online verification needs a JSON event body")
    fields = {"auth_algo": sent.auth_algo, "cert_url": sent.cert_url, "transmission_id": sent.id,
              "transmission_sig": sent.signature_text, "transmission_time": sent.time,
              "webhook_id": ctx.secret}  # fmt: skip
    payload = orjson.dumps(fields)[:-1] + b',"webhook_event":' + ctx.body + b"}"
    connection = ctx.connection
    tokens = TokenManager(spec=OAUTH, connection=connection, secrets=Secrets(dict(ctx.secrets)), box=ctx.box,
                          database_url=ctx.database_url)  # fmt: skip
    http = HttpClient(provider="paypal", connection_id=connection.id, base_url=api_base(connection),
                      headers={"Accept": "application/json", "Content-Type": "application/json"},
                      auth=BearerAuth(tokens), timeout=CERT_FETCH_SECONDS, retry=ONLINE_RETRY,
                      classify=classify)  # fmt: skip
    try:
        response = http.send("POST", "/v1/notifications/verify-webhook-signature", content=payload)
    except AuthenticationFailed:
        raise VerificationUnavailable(
            f"PayPal refused the connection's credentials; {fix_hint(set_secret_command(connection.id), False)}"
        ) from None
    except ProviderError as exc:
        if exc.status is not None and 400 <= exc.status < 500 and exc.status not in (408, 429):
            raise InvalidSignature(f"PayPal refused to verify the delivery ({exc.status})") from None
        raise VerificationUnavailable(f"PayPal's verify endpoint failed ({exc.status or 'unreachable'})") from None
    finally:
        http.close()
        tokens.close()
    try:
        status = orjson.loads(response.content).get("verification_status")
    except (orjson.JSONDecodeError, AttributeError):
        status = None
    if status != "SUCCESS":
        raise InvalidSignature(f"PayPal answered verification_status {status!r}")


# --- events --------------------------------------------------------------------------------------------------


def events(payload: Any) -> list[InboxEvent]:
    """A PayPal delivery is one event: `{id: "WH-…", create_time, event_type, resource_type, resource}`."""
    if not isinstance(payload, dict) or not isinstance(payload.get("id"), str) or not payload["id"]:
        raise ValueError("not a PayPal webhook event (no id)")
    if not isinstance(payload.get("event_type"), str) or not isinstance(payload.get("resource"), dict):
        raise ValueError("not a PayPal webhook event (no event_type or resource)")
    return [InboxEvent(payload["id"], payload["event_type"], parse_time(payload.get("create_time")), payload)]


# --- apply ---------------------------------------------------------------------------------------------------

_CAPTURE_STATUS = {"COMPLETED": "S", "PENDING": "P", "DECLINED": "D", "FAILED": "D", "REFUNDED": "V",
                   "PARTIALLY_REFUNDED": "F", "REVERSED": "V"}  # fmt: skip
_SALE_STATE = {"completed": "S", "pending": "P", "denied": "D", "refunded": "V", "partially_refunded": "F",
               "reversed": "V"}  # fmt: skip
_REFUND_STATUS = {"COMPLETED": "S", "PENDING": "P", "FAILED": "D", "CANCELLED": "D", "completed": "S",
                  "pending": "P", "failed": "D", "cancelled": "D"}  # fmt: skip
# Transaction Search's order of transaction_info fields, so merged rows serialise the same way every time.
_INFO_ORDER = {name: i for i, name in enumerate((
    "paypal_account_id", "transaction_id", "paypal_reference_id", "paypal_reference_id_type", "transaction_event_code",
    "transaction_initiation_date", "transaction_updated_date", "transaction_amount", "fee_amount", "discount_amount",
    "insurance_amount", "sales_tax_amount", "shipping_amount", "shipping_discount_amount", "shipping_tax_amount",
    "other_amount", "tip_amount", "transaction_status", "transaction_subject", "transaction_note",
    "payment_tracking_id", "bank_reference_id", "ending_balance", "available_balance", "invoice_id", "custom_field",
    "protection_eligibility", "credit_term", "credit_transactional_fee", "credit_promotional_fee",
    "annual_percentage_rate", "payment_method_type", "instrument_type", "instrument_sub_type",
))}  # fmt: skip


def in_search_order(info: dict[str, Any]) -> dict[str, Any]:
    """`transaction_info` fields in Transaction Search's order (unknown ones after, by name): a row merged from
    an event or an action serialises the same way every time, as its raw JSON hash needs."""
    return dict(sorted(info.items(), key=lambda kv: (_INFO_ORDER.get(kv[0], 99), kv[0])))


def _negated(money: dict[str, str]) -> dict[str, str]:
    value = str(money["value"])
    return {"currency_code": money["currency_code"], "value": value[1:] if value.startswith("-") else f"-{value}"}


def _nonzero(money: Any) -> bool:
    return isinstance(money, dict) and str(money.get("value", "")).strip("-0.") != ""


def _v1_money(amount: Any, key: str = "total") -> dict[str, str] | None:
    """A v1 amount (`{total, currency}` or `{value, currency}`) as a Transaction Search money object."""
    if not isinstance(amount, dict) or amount.get(key) in (None, "") or not amount.get("currency"):
        return None
    return {"currency_code": str(amount["currency"]), "value": str(amount[key])}


def _times(resource: Mapping[str, Any]) -> dict[str, Any]:
    created = resource.get("create_time")
    return {"transaction_initiation_date": created, "transaction_updated_date": resource.get("update_time") or created}


def payment_info(resource: Mapping[str, Any], sale: bool) -> dict[str, Any]:
    """A capture (v2) or sale (v1) as the `transaction_info` fields Transaction Search shows for it."""
    if sale:
        amount, fee = _v1_money(resource.get("amount")), _v1_money(resource.get("transaction_fee"), "value")
        status = _SALE_STATE.get(str(resource.get("state")))
        invoice, custom = resource.get("invoice_number"), resource.get("custom")
        reference = resource.get("billing_agreement_id")
    else:
        amount, fee = resource.get("amount"), (resource.get("seller_receivable_breakdown") or {}).get("paypal_fee")
        status = _CAPTURE_STATUS.get(str(resource.get("status")))
        invoice, custom, reference = resource.get("invoice_id"), resource.get("custom_id"), None
    info: dict[str, Any] = {"transaction_id": resource["id"], **_times(resource), "transaction_amount": amount,
                            "fee_amount": _negated(fee) if _nonzero(fee) else None, "transaction_status": status,
                            "invoice_id": invoice, "custom_field": custom}  # fmt: skip
    if reference:
        info.update(paypal_reference_id=reference, paypal_reference_id_type="SUB")
    return {k: v for k, v in info.items() if v is not None}


def refund_info(resource: Mapping[str, Any], parent: str, sale: bool) -> dict[str, Any]:
    """A refund (v2 of a capture, v1 of a sale) as the `transaction_info` of its Transaction Search row."""
    if sale:
        amount = _v1_money(resource.get("amount"))
        fee = _v1_money(resource.get("refund_from_transaction_fee"), "value")
        status, invoice, custom = resource.get("state"), resource.get("invoice_number"), resource.get("custom")
    else:
        amount = resource.get("amount")
        fee = (resource.get("seller_payable_breakdown") or {}).get("paypal_fee")
        status, invoice, custom = resource.get("status"), resource.get("invoice_id"), resource.get("custom_id")
    info: dict[str, Any] = {"transaction_id": resource["id"], "paypal_reference_id": parent,
                            "paypal_reference_id_type": "TXN", **_times(resource),
                            "transaction_amount": _negated(amount) if isinstance(amount, dict) else None,
                            "fee_amount": fee if _nonzero(fee) else None,
                            "transaction_status": _REFUND_STATUS.get(str(status)), "invoice_id": invoice,
                            "custom_field": custom}  # fmt: skip
    return {k: v for k, v in info.items() if v is not None}


def refunded_of(resource: Mapping[str, Any], sale: bool) -> str | None:
    """The capture or sale a refund belongs to: its `up` link (v2) or `sale_id` (v1)."""
    if sale:
        return resource.get("sale_id")
    for link in resource.get("links") or []:
        href = str(link.get("href", "")) if isinstance(link, dict) else ""
        if link.get("rel") == "up" and "/captures/" in href:
            return href.rstrip("/").rsplit("/", 1)[-1]
    return None


def _version(resource: Mapping[str, Any], fallback: datetime | None) -> datetime:
    moment = parse_time(resource.get("update_time")) or parse_time(resource.get("create_time")) or fallback
    if moment is None:
        raise ValueError(f"PayPal resource {resource.get('id')!r} has no update_time or create_time")
    return moment


class _Payments:
    """The `paypal_payments` rows a batch makes, each laid over the newest known version of its row
    (stored, or made earlier in the batch) so events of one transaction compose in any order."""

    def __init__(self, context: ApplyContext) -> None:
        self.context = context
        self.rows: list[Row] = []
        self.latest: dict[str, Row] = {}
        self._stored: dict[tuple[str, str], dict[str, tuple[dict[str, Any], datetime]]] = {}

    def _load(self, txn: str, family: str) -> dict[str, tuple[dict[str, Any], datetime]]:
        if (txn, family) not in self._stored:
            keys = [f"{txn}:{family}{n:02d}" for n in range(100)]
            found = self.context.conn.execute(
                sql.SQL("SELECT id, raw, source_updated_at FROM {} WHERE connection_id = %s AND id = ANY(%s)").format(
                    table(PAYMENTS_TABLE.name, self.context.schema)
                ),
                (self.context.connection_id, keys),
            ).fetchall()
            self._stored[(txn, family)] = {key: (raw, version) for key, raw, version in found}
        return self._stored[(txn, family)]

    def add(self, info: dict[str, Any], code: str, version: datetime) -> None:
        """A row for `info` under the stored code of its transaction (codes of `code`'s family), else `code`."""
        txn, family = str(info["transaction_id"]), code[:3]
        known = dict(self._load(txn, family))
        for key, row in self.latest.items():
            if key.startswith(f"{txn}:{family}") and (key not in known or row.version >= known[key][1]):
                known[key] = (orjson.loads(row.raw), row.version)
        key = f"{txn}:{code}" if not known or f"{txn}:{code}" in known else sorted(known)[0]
        base = dict(known[key][0]) if key in known else {}
        merged = {**(base.get("transaction_info") or {}), **info, "transaction_event_code": key.split(":", 1)[1]}
        base["transaction_info"] = in_search_order(merged)
        row = payment_row(base, version)
        self.rows.append(row)
        held = self.latest.get(row.id)
        if held is None or row.version >= held.version:
            self.latest[row.id] = row


_APPLIED = ("PAYMENT.CAPTURE.", "PAYMENT.SALE.", "BILLING.SUBSCRIPTION.", "BILLING.PLAN.", "INVOICING.INVOICE.")


def _carried(kind: str, resource: Any) -> dict[str, Any] | None:
    """The object an event carries: an invoice event's `resource.invoice`, else the resource itself."""
    if kind.startswith("INVOICING.INVOICE.") and isinstance(resource, dict):
        resource = resource.get("invoice")
    return resource if isinstance(resource, dict) and resource.get("id") else None


def _merchant_named(event: Mapping[str, Any]) -> str | None:
    """The merchant a Payments v2 resource names: a capture's `payee`, a refund's `payer` (the merchant
    refunding); None for sales and subscriptions, which name none."""
    kind, resource = str(event.get("event_type") or ""), event.get("resource")
    if not kind.startswith("PAYMENT.CAPTURE.") or not isinstance(resource, dict):
        return None
    refund = event.get("resource_type") == "refund" or kind.endswith((".REFUNDED", ".REVERSED"))
    party = resource.get("payer" if refund else "payee")
    merchant = party.get("merchant_id") if isinstance(party, dict) else None
    return merchant if isinstance(merchant, str) and merchant else None


def _is_ours(context: ApplyContext, event: Mapping[str, Any]) -> bool:
    """Whether the event belongs to the connection's merchant. Checked only when the delivery was verified
    with the app-wide webhook id (any connection's URL accepts those): the merchant the resource names
    decides when the connection names its own (`external_tenant`); otherwise the event is read back with the
    connection's app, to which PayPal scopes events, and a 404 means it is another app's."""
    if not context.signed_with_app_secret(WEBHOOKS.secret_name):
        return True
    tenant, named = context.connection().external_tenant, _merchant_named(event)
    if tenant and named:
        return named == tenant
    return provider_knows(lambda: context.client().webhook_event(str(event.get("id"))))


def apply(context: ApplyContext, rows: list[InboxRow]) -> BatchCounts:
    """Write the capture, sale, refund, subscription, plan or invoice each event carries (see the module doc);
    events of another merchant are counted as skipped."""
    payments = _Payments(context)
    subscriptions: list[Row] = []
    plans: list[Row] = []
    invoices: list[Row] = []
    foreign = 0
    for row in rows:
        event = row.payload if isinstance(row.payload, dict) else {}
        kind = str(event.get("event_type") or "")
        resource = _carried(kind, event.get("resource"))
        if resource is None or not kind.startswith(_APPLIED):
            context.skip()
            continue
        if not _is_ours(context, event):
            foreign += 1
            context.skip()
            continue
        if kind.startswith(("PAYMENT.CAPTURE.", "PAYMENT.SALE.")):
            sale = kind.startswith("PAYMENT.SALE.")
            if event.get("resource_type") == "refund" or kind.endswith((".REFUNDED", ".REVERSED")):
                _apply_refund(context, payments, resource, kind, sale, row.occurred_at)
            else:
                code = "T0002" if sale and resource.get("billing_agreement_id") else "T0006"
                payments.add(payment_info(resource, sale), code, _version(resource, row.occurred_at))
        elif kind.startswith("BILLING.PLAN."):
            plans.append(plan_row(resource, _version(resource, row.occurred_at)))
        elif kind.startswith("INVOICING.INVOICE."):
            version = invoice_version(resource) or row.occurred_at
            if version is None:
                raise ValueError(f"{kind} {resource['id']}: the invoice names no time")
            invoices.append(invoice_row(resource, version))
        else:
            plan_id = resource.get("plan_id")
            raw = {**resource, "plan": context.client().plan(str(plan_id))} if plan_id else dict(resource)
            subscriptions.append(subscription_row(raw, _version(resource, row.occurred_at)))
    if foreign:
        log.warning("paypal webhooks of %s: %d event(s) of another merchant skipped", context.connection_id, foreign)
    counts = BatchCounts()
    if payments.rows:
        counts.add(context.upsert(PAYMENTS_TABLE, payments.rows))
    if subscriptions:
        counts.add(context.upsert(SUBSCRIPTIONS_TABLE, subscriptions))
    if plans:
        counts.add(context.upsert(PLANS_TABLE, plans))
    if invoices:
        counts.add(context.upsert(INVOICES_TABLE, invoices))
    return counts


def _apply_refund(context: ApplyContext, payments: _Payments, resource: dict[str, Any], kind: str, sale: bool,
                  occurred_at: datetime | None) -> None:  # fmt: skip
    """The refund's own row, then the refunded capture or sale re-read as it is now (its refunded status)."""
    parent = refunded_of(resource, sale)
    if not parent:
        raise ValueError(f"{kind} {resource['id']}: the refund names no capture or sale")
    code = "T1106" if kind.endswith(".REVERSED") else "T1107"
    payments.add(refund_info(resource, parent, sale), code, _version(resource, occurred_at))
    client = context.client()
    try:
        current = client.sale(parent) if sale else client.capture(parent)
    except ProviderError as exc:
        if exc.status != 404:
            raise
        log.warning("paypal %s %s: the refunded %s %s is unknown to PayPal", kind, resource["id"],
                    "sale" if sale else "capture", parent)  # fmt: skip
        return
    code = "T0002" if sale and current.get("billing_agreement_id") else "T0006"
    payments.add(payment_info(current, sale), code, _version(current, occurred_at))


WEBHOOKS = WebhookSpec(
    "webhook_id",
    "PAYPAL_WEBHOOK_ID",
    verify,
    events,
    HEADERS,
    apply=apply,
    verify_connection=verify_delivery,
    delivery_header="paypal-transmission-id",
)
