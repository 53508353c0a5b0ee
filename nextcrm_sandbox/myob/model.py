"""MYOB's vocabulary for the sandbox: host prefixes, layouts, scopes and key generations, the knobs the control
API accepts, ``MyobError`` with MYOB's error bodies, zone-less ``LastModified`` stamps, money, and the fields
each record type carries."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Mapping

import orjson


def _words(text: str) -> tuple[str, ...]:
    return tuple(text.split())


API_PREFIX = "/myob/api"
SECURE_PREFIX = "/myob/secure"
CONTROL_PREFIX = "/_sandbox/myob"
LAYOUTS = ("Service", "Item", "Professional", "TimeBilling", "Miscellaneous")
LEGACY_SCOPE = "CompanyFile"
DEFAULT_SCOPES = "sme-company-file sme-sales sme-contacts-customer"
SME_SCOPES = frozenset(
    _words(
        "sme-company-file sme-company-settings sme-general-ledger sme-sales sme-purchases sme-banking sme-inventory "
        "sme-timebilling sme-payroll sme-contacts-customer sme-contacts-supplier sme-contacts-employee "
        "sme-contacts-personal"
    )
)
KEY_MODES = ("new", "legacy")
ERROR_INFORMATION = "Warning, error messages have not been finalised in this release and may change"
_BASE = "@@MYOB_API@@"
_BASE_B = _BASE.encode()
_JSON = "application/json; charset=utf-8"
_EPOCH = dt.datetime(1970, 1, 1)
_US = 1_000_000
_DAY = 86400
_GZIP_MIN_BYTES = 1024

# Fields a typed layout does not carry (``InvoiceType`` is populated only on ``/Sale/Invoice``).
_LAYOUT_ONLY_FIELDS = frozenset(_words("ShipToAddress Freight FreightForeign FreightTaxCode ShippingMethod"))
_TYPED_DROP = {
    "Service": frozenset({"InvoiceType"}),
    "Item": frozenset({"InvoiceType"}),
    "TimeBilling": frozenset({"InvoiceType"}),
    "Professional": _LAYOUT_ONLY_FIELDS | {"InvoiceType"},
    "Miscellaneous": _LAYOUT_ONLY_FIELDS | {"InvoiceType", "Comment", "InvoiceDeliveryStatus"},
}
_GENERIC_DROP = frozenset({"Lines"})
_HAS_FREIGHT = frozenset({"Service", "Item", "TimeBilling"})
_LAYOUT_BY_LOWER = {name.lower(): name for name in LAYOUTS}

_TENANT_FIELDS = frozenset(
    _words(
        "client_id seed invoices customers contacts days name id cftoken_required username password "
        "generic_invoice_lines default_top max_top utc_offset_minutes unknown_path_status location_origin key_mode "
        "requests_per_second second_window_seconds daily_limit day_window_seconds per_second_status"
    )
)
_APP_LIMIT_FIELDS = tuple(
    _words("requests_per_second second_window_seconds daily_limit day_window_seconds per_second_status")
)
_CLIENT_FIELDS = frozenset({"client_id", "client_secret", "redirect_uris", "key_mode", "username", *_APP_LIMIT_FIELDS})
_FAULT_FIELDS = frozenset(
    _words("tenant server_errors server_error_status rate_limited gateway_timeouts day_limit_exhausted latency_ms")
)
_CHANGE_FIELDS = (
    "edits",
    "voids",
    "deletes",
    "creates",
    "archives",
    "customer_edits",
    "customer_creates",
    "customer_deletes",
    "payment_deletes",
)


class MyobError(Exception):
    """An API error rendered the way MYOB does: ``{"Errors": [{Name, Message, ...}], "Information"}``."""

    def __init__(
        self,
        status: int,
        name: str,
        message: str,
        *,
        details: str | None = None,
        code: int | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(f"{name}: {message}")
        self.status = status
        self.name = name
        self.message = message
        self.details = details
        self.code = code
        self.headers = dict(headers or {})

    def body(self) -> bytes:
        """The JSON error body."""
        error = {
            "Name": self.name,
            "Message": self.message,
            "AdditionalDetails": self.details,
            "ErrorCode": self.code,
            "Severity": "Error",
            "LearnMore": None,
        }
        return orjson.dumps({"Errors": [error], "Information": ERROR_INFORMATION})


def _token_invalid() -> MyobError:
    return MyobError(
        401,
        "OAuthTokenIsInvalid",
        "The supplied OAuth token (Bearer) is not valid",
        details="Header: Authorization",
        code=31001,
    )


def _not_found(what: str) -> MyobError:
    return MyobError(404, "NotFound", f"The requested {what} was not found", code=150)


def _bad_query(message: str) -> MyobError:
    return MyobError(400, "InvalidQuery", message, details="OData query options")


def format_myob_datetime(us: int) -> str:
    """A zone-less .NET-style stamp: ``2015-03-29T03:31:57.19`` (fraction only when non-zero)."""
    seconds, frac = divmod(us, _US)
    text = (_EPOCH + dt.timedelta(seconds=seconds)).strftime("%Y-%m-%dT%H:%M:%S")
    if frac:
        text += "." + f"{frac:06d}".rstrip("0")
    return text


_DATETIME_RE = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})(?:[T ](\d{2}):(\d{2})(?::(\d{2})(?:\.(\d{1,7}))?)?)?(?:Z|[+-]\d{2}:?\d{2})?$"
)


def parse_myob_datetime(text: str) -> int:
    """Microseconds since the epoch of a zone-less stamp (date only, minutes, seconds, up to 7 decimals)."""
    match = _DATETIME_RE.match(text.strip())
    if match is None:
        raise ValueError(f"not a date-time: {text!r}")
    year, month, day, hour, minute, second, frac = match.groups()
    moment = dt.datetime(int(year), int(month), int(day), int(hour or 0), int(minute or 0), int(second or 0))
    micro = int((frac or "0").ljust(7, "0")[:6])
    delta = moment - _EPOCH
    return (delta.days * _DAY + delta.seconds) * _US + micro


def _day_stamp(us: int) -> str:
    return format_myob_datetime(us - us % (_DAY * _US))


def _ms(us: int) -> int:
    return us - us % 1000


def _money(cents: int) -> float:
    return cents / 100 if cents else 0.0


def _round_div(numerator: float, denominator: float) -> int:
    value = numerator / denominator
    return int(value + 0.5) if value >= 0 else -int(-value + 0.5)


class _When(int):
    """A date-time as microseconds, so OData comparisons can tell it from a number."""


_INVOICE_KEYS = frozenset(
    _words(
        "UID Number Date CustomerPurchaseOrderNumber Customer PromisedDate BalanceDueAmount BalanceDueAmountForeign "
        "Status InvoiceType Lines ShipToAddress Terms IsTaxInclusive Subtotal SubtotalForeign Freight FreightForeign "
        "FreightTaxCode TotalTax TotalTaxForeign TotalAmount TotalAmountForeign Category Salesperson Comment "
        "ShippingMethod JournalMemo ReferralSource InvoiceDeliveryStatus LastPaymentDate CanApplySurcharge Order "
        "OnlinePaymentMethod ForeignCurrency CurrencyExchangeRate Created LastModified URI RowVersion"
    )
)
_CUSTOMER_KEYS = frozenset(
    _words(
        "UID CompanyName LastName FirstName IsIndividual DisplayID IsActive Addresses Notes Identifiers CustomList1 "
        "CustomList2 CustomList3 CustomField1 CustomField2 CustomField3 CurrentBalance SellingDetails PaymentDetails "
        "PhotoURI ForeignCurrency Created LastModified URI RowVersion"
    )
)
_PAYMENT_KEYS = frozenset(
    _words(
        "UID DepositTo Account Customer TransactionUID ReceiptNumber Date AmountReceived AmountReceivedForeign "
        "ForeignCurrency CurrencyExchangeRate PaymentMethod Memo Invoices Created LastModified URI RowVersion"
    )
)
