"""``PayPalError`` with PayPal's envelope ``{name, message, debug_id, details[], links[]}``, and the errors the API
answers (validation, not found, authentication, authorisation, rate limits, server faults)."""

from __future__ import annotations

import secrets
from collections.abc import Mapping, Sequence
from typing import Any

_INFO_LINK = "https://developer.paypal.com/docs/api/overview/#error"


class PayPalError(Exception):
    """A PayPal error answer: ``{name, message, debug_id, details[], links[]}`` plus any extra fields."""

    def __init__(
        self,
        status: int,
        name: str,
        message: str,
        details: Sequence[Mapping[str, Any]] = (),
        *,
        extra: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        link: str | None = _INFO_LINK,
    ) -> None:
        super().__init__(f"{status} {name}: {message}")
        self.status = status
        self.name = name
        self.message = message
        self.details = [dict(d) for d in details]
        self.extra = dict(extra or {})
        self.headers = dict(headers or {})
        self.link = link

    def body(self, debug_id: str) -> dict[str, Any]:
        """The JSON body PayPal sends."""
        out: dict[str, Any] = {"name": self.name, "message": self.message, "debug_id": debug_id}
        out["details"] = self.details
        out.update(self.extra)
        out["links"] = [{"href": self.link, "rel": "information_link", "method": "GET"}] if self.link else []
        return out


def _bad_request(field_name: str, value: str | None, issue: str) -> PayPalError:
    """Transaction Search's validation answer (``Invalid request - see details.``)."""
    detail = {"field": field_name, "value": value or "", "location": "query", "issue": issue}
    return PayPalError(400, "INVALID_REQUEST", "Invalid request - see details.", [detail])


def _schema_error(field_name: str, value: str | None, issue: str, description: str) -> PayPalError:
    """The Subscriptions API's validation answer (issue codes such as ``INVALID_PARAMETER_VALUE``)."""
    detail: dict[str, Any] = {"field": field_name, "location": "query", "issue": issue, "description": description}
    if value is not None:
        detail["value"] = value
    return PayPalError(
        400,
        "INVALID_REQUEST",
        "Request is not well-formed, syntactically incorrect, or violates schema.",
        [detail],
        link=f"https://developer.paypal.com/docs/api/v1/billing/subscriptions#{issue}",
    )


def _not_available(value: str | None = None) -> PayPalError:
    details = []
    if value is not None:
        details = [
            {
                "field": "start_date",
                "value": value,
                "location": "query",
                "issue": "Data for the given start date is not available.",
            }
        ]
        return PayPalError(
            400,
            "INVALID_REQUEST",
            "Request is not well-formed, syntactically incorrect, or violates schema.",
            details,
        )
    return PayPalError(400, "INVALID_REQUEST", "Data for the given start date is not available.", [], link=None)


def _not_found(resource: str) -> PayPalError:
    return PayPalError(
        404,
        "RESOURCE_NOT_FOUND",
        "The specified resource does not exist.",
        [{"issue": "INVALID_RESOURCE_ID", "description": "Requested resource ID was not found."}],
        link=f"https://developer.paypal.com/docs/api/v1/billing/{resource}#RESOURCE_NOT_FOUND",
    )


def _auth_failure() -> PayPalError:
    return PayPalError(
        401,
        "AUTHENTICATION_FAILURE",
        "Authentication failed due to invalid authentication credentials or a missing Authorization header.",
    )


def _not_authorized() -> PayPalError:
    return PayPalError(
        403,
        "NOT_AUTHORIZED",
        "Authorization failed due to insufficient permissions.",
        [
            {
                "issue": "PERMISSION_DENIED",
                "description": "You do not have permission to access or perform operations on this resource.",
            }
        ],
    )


def _rate_limited(retry_after: int) -> PayPalError:
    return PayPalError(
        429,
        "RATE_LIMIT_REACHED",
        "Too many requests. Blocked due to rate limiting.",
        headers={"retry-after": str(max(1, retry_after))},
        link="https://developer.paypal.com/api/rest/reference/rate-limiting/",
    )


def _server_error(status: int) -> PayPalError:
    if status == 503:
        return PayPalError(503, "SERVICE_UNAVAILABLE", "Service Unavailable.")
    return PayPalError(status, "INTERNAL_SERVER_ERROR", "An internal server error occurred.")


def _debug_id() -> str:
    return secrets.token_hex(7)[:13]


def _payment_not_found(resource: str) -> PayPalError:
    return PayPalError(
        404,
        "RESOURCE_NOT_FOUND",
        "The specified resource does not exist.",
        [{"issue": "INVALID_RESOURCE_ID", "description": "Specified resource ID does not exist. Please check the "
                                                          "resource ID and try again."}],
        link=f"https://developer.paypal.com/docs/api/payments/v2/#{resource}",
    )  # fmt: skip


def _unprocessable(issue: str, description: str) -> PayPalError:
    return PayPalError(
        422,
        "UNPROCESSABLE_ENTITY",
        "The requested action could not be performed, semantically incorrect, or failed business validation.",
        [{"issue": issue, "description": description}],
        link=f"https://developer.paypal.com/docs/api/payments/v2/#error-{issue}",
    )
