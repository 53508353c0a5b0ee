"""A sync may run far longer than one request's time budget: the budget bounds a request's retries,
never a well-paced run. Real provider clients against their sandboxes, a small budget, a real Postgres."""

from __future__ import annotations

import time

from nextcrm_pipelines.core import http
from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.http import RetryPolicy
from nextcrm_pipelines.core.runner import day_window, sync_partitions
from nextcrm_pipelines.core.vault import Secrets
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines.providers.stripe.client import StripeApi
from nextcrm_pipelines_tests.accounting import PROFILES, assert_mirror_equals_export, connect_account
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now

SMALL_BUDGET = RetryPolicy(max_attempts=5, base_delay=0.01, max_delay=0.05, budget_seconds=0.5)


def test_a_paced_xero_backfill_longer_than_the_budget_lands_every_row(database_url, schema, box, sandbox, monkeypatch):
    profile = PROFILES["xero_invoices"]
    account = connect_account(sandbox, database_url, box, profile,
                              settings={"page_size": 10, "requests_per_second": 5})  # fmt: skip
    monkeypatch.setattr(http, "DEFAULT_RETRY", SMALL_BUDGET)
    today = sandbox_now(sandbox).date()
    started = time.monotonic()
    results = sync_partitions(
        database_url=database_url, schema=schema, provider=get_provider("xero"), entity_name=profile.entity,
        connection_id=account.connection.id, windows=[day_window(d) for d in days_back(today, 7)], workers=1,
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert all(r.status == "success" for r in results), [r.error for r in results if r.error]
    # One client served every window, paced at 5 requests a second, for several budgets' worth of time.
    assert elapsed > 3 * SMALL_BUDGET.budget_seconds
    assert sum(r.stats.throttle_seconds for r in results) > SMALL_BUDGET.budget_seconds
    assert_mirror_equals_export(account, database_url, schema)


def test_a_paced_stripe_listing_longer_than_the_budget_still_retries_429s(sandbox, stripe_account):
    """Once the listing has run past the budget, a 429 that outlasts the SDK's own retry is still backed off
    and retried by the client, and every charge of the days is read."""
    key = stripe_account(charges=1500, subscriptions=5, days=8)
    connection = Connection(id="stripe-long", provider="stripe", display_name="Long", base_url=sandbox.url,
                            settings={"requests_per_second": 5})  # fmt: skip
    policy = RetryPolicy(max_attempts=2, base_delay=0.01, max_delay=0.05, budget_seconds=1.0)
    days = days_back(sandbox_now(sandbox).date(), 8)
    seen: list[str] = []
    started = time.monotonic()
    injected = False
    with StripeApi(connection, Secrets({"api_key": key}), retry=policy) as api:
        for day in days:
            if not injected and time.monotonic() - started > 1.5 * policy.budget_seconds:
                # The SDK retries once (max_attempts=2), so both 429s reach the client's own backoff.
                sandbox.set_stripe_faults(key, rate_limit_burst=2)
                injected = True
            for page in api.created_in("/v1/charges", day_window(day)):
                seen += [raw["id"] for raw, _ in page]
    assert injected, "the listing finished before it ran past the budget; pace it slower"
    assert sandbox.stripe_stats(key)["rate_limited"] == 2
    assert sorted(seen) == sorted(c["id"] for c in sandbox.stripe_export(key, "charges"))
