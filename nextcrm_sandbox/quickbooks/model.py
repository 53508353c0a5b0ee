"""QuickBooks Online's vocabulary for the sandbox: Intuit's paths, token lifetimes and API limits, the entities
served, ``QueryError`` with Intuit's ``Fault`` bodies, and the realm's time zone offsets and stamps."""

from __future__ import annotations

import datetime as dt
import re
from typing import Any

PREFIX = "/quickbooks"
API_PREFIX = f"{PREFIX}/api"
CONTROL_PREFIX = "/_sandbox/quickbooks"
AUTHORIZE_PATH = f"{PREFIX}/appcenter/connect/oauth2"
TOKEN_PATH = f"{PREFIX}/oauth/oauth2/v1/tokens/bearer"
REVOKE_PATH = f"{PREFIX}/developer/v2/oauth2/tokens/revoke"
JWKS_PATH = f"{PREFIX}/oauth/op/v1/jwks"
# intuit-oauth's AuthClient reads these (intuitlib/config.py DISCOVERY_URL), on developer.intuit.com.
DISCOVERY_PATHS = {
    "sandbox": f"{PREFIX}/devsite/.well-known/openid_sandbox_configuration/",
    "production": f"{PREFIX}/devsite/.well-known/openid_configuration/",
}
# The path prefix of each Intuit host (the reverse of the client's host map), for faults that name a full URL.
HOSTS = {
    "appcenter": "https://appcenter.intuit.com",
    "oauth": "https://oauth.platform.intuit.com",
    "developer": "https://developer.api.intuit.com",
    "devsite": "https://developer.intuit.com",
    "accounts": "https://accounts.platform.intuit.com",
    "sandbox-accounts": "https://sandbox-accounts.platform.intuit.com",
    "api": "https://quickbooks.api.intuit.com",
}
BATCH_MAX_ITEMS = 30

ACCESS_TTL = 3600
REFRESH_TTL = 8_726_400  # what Intuit reports as x_refresh_token_expires_in; enforced as the idle lifetime
REFRESH_ROTATE_AFTER = 86_400
REFRESH_GRACE = 86_400
REFRESH_HARD_TTL = 5 * 365 * 86_400
MIN_MINOR_VERSION = 75
MAX_RESULTS_CAP = 1000
DEFAULT_MAX_RESULTS = 100
CDC_MAX_DAYS = 30
CDC_MAX_OBJECTS = 1000
SCOPE_ACCOUNTING = "com.intuit.quickbooks.accounting"

_DAY = 86_400
_JSON_CT = "application/json;charset=UTF-8"
_XML_CT = "application/xml;charset=UTF-8"
_XMLNS = "http://schema.intuit.com/finance/v3"

# Entities the emulator serves; other real QuickBooks entities answer as an empty company.
_SERVED = ("Invoice", "Customer", "Payment", "Account", "CompanyInfo")
_KNOWN_EMPTY_TEXT = (
    "Bill BillPayment Budget Class CreditMemo Department Deposit Employee Estimate Item "
    "JournalEntry PaymentMethod Preferences Purchase PurchaseOrder RefundReceipt SalesReceipt "
    "TaxCode TaxRate Term TimeActivity Transfer Vendor VendorCredit"
)
_KNOWN_EMPTY = tuple(_KNOWN_EMPTY_TEXT.split())
_ENTITY_NAMES = {name.lower(): name for name in (*_SERVED, *_KNOWN_EMPTY)}


class QueryError(Exception):
    """A QuickBooks ``Fault`` answer: ``{"Fault": {"Error": [{Message, Detail, code, element}], "type"}}``."""

    def __init__(
        self,
        code: str,
        message: str,
        detail: str,
        *,
        status: int = 400,
        fault_type: str = "ValidationFault",
        element: str = "",
    ) -> None:
        super().__init__(f"{code} {message}: {detail}")
        self.code = code
        self.message = message
        self.detail = detail
        self.status = status
        self.fault_type = fault_type
        self.element = element

    def fault(self) -> dict[str, Any]:
        """The ``Fault`` object of the response body."""
        err = {"Message": self.message, "Detail": self.detail, "code": self.code}
        if self.element:
            err["element"] = self.element
        return {"Error": [err], "type": self.fault_type}


def _parser_error(detail: str) -> QueryError:
    return QueryError("4000", "Error parsing query", f"QueryParserError: {detail}")


def _validation_error(detail: str) -> QueryError:
    return QueryError("4001", "Invalid query", f"QueryValidationError: {detail}")


def _not_found() -> QueryError:
    return QueryError(
        "610",
        "Object Not Found",
        "Object Not Found : Something you're trying to use has been made inactive. Check the fields with "
        "accounts, customers, items, vendors or employees.",
    )


def _throttled() -> QueryError:
    return QueryError(
        "3001",
        "message=ThrottleExceeded; errorCode=003001; statusCode=429",
        "The request limit was reached.  Try again later",
        status=429,
        fault_type="SERVICE",
    )


def _system_fault(status: int) -> QueryError:
    return QueryError(
        "10000",
        "An application error has occurred while processing your request",
        "System Failure Error: An unexpected error occurred while accessing or saving your data. Please wait a "
        "few minutes and try again. If the problem persists, contact customer support.",
        status=status,
        fault_type="SystemFault",
    )


def discovery_document(origin: str, environment: str) -> dict[str, Any]:
    """Intuit's OpenID discovery document, its URLs on the sandbox server at ``origin``."""
    accounts = "sandbox-accounts" if environment == "sandbox" else "accounts"
    return {
        "issuer": "https://oauth.platform.intuit.com/op/v1",
        "authorization_endpoint": f"{origin}{AUTHORIZE_PATH}",
        "token_endpoint": f"{origin}{TOKEN_PATH}",
        "userinfo_endpoint": f"{origin}{PREFIX}/{accounts}/v1/openid_connect/userinfo",
        "revocation_endpoint": f"{origin}{REVOKE_PATH}",
        "jwks_uri": f"{origin}{JWKS_PATH}",
        "response_types_supported": ["code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "scopes_supported": ["openid", "email", "profile", "address", "phone"],
        "token_endpoint_auth_methods_supported": ["client_secret_post", "client_secret_basic"],
        "claims_supported": ["aud", "exp", "iat", "iss", "realmid", "sub"],
    }


def _batch_too_large(count: int) -> QueryError:
    return QueryError(
        "2010",
        "Request has invalid or unsupported property",
        f"Property Name:BatchItemRequest holds {count} items; a batch holds at most {BATCH_MAX_ITEMS}",
    )


def _unsupported_operation(path: str, full: str) -> QueryError:
    return QueryError(
        "500",
        "Unsupported Operation",
        f"Operation Could not find resource for relative : {path} of full path: {full} is not supported.",
    )


_OFFSET_RE = re.compile(r"^([+-])(\d{2}):(\d{2})$")


def _parse_offset(value: str) -> dt.timezone:
    m = _OFFSET_RE.match(value)
    if not m or int(m.group(2)) > 14 or int(m.group(3)) >= 60:
        raise ValueError("utc_offset must look like -07:00 or +10:00")
    minutes = int(m.group(2)) * 60 + int(m.group(3))
    return dt.timezone(dt.timedelta(minutes=-minutes if m.group(1) == "-" else minutes))


def _offset_text(tz: dt.timezone) -> str:
    total = int(tz.utcoffset(None).total_seconds()) // 60
    sign = "-" if total < 0 else "+"
    return f"{sign}{abs(total) // 60:02d}:{abs(total) % 60:02d}"


def _parse_when(text: str, tz: dt.timezone) -> float:
    """An ISO date or date-time from a query or ``changedSince`` as unix seconds (no offset → the company's)."""
    value = text.strip()
    if value.endswith(("Z", "z")):
        value = value[:-1] + "+00:00"
    parsed = dt.datetime.fromisoformat(value)
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=tz)
    return parsed.timestamp()
