"""`nextcrm-sandbox demo` end to end: its own sandbox, the test's schema, a throwaway Dagster home.

What it prints is the product here: one line per demo connection and the final table, no Dagster log
lines (dict reprs) and no warnings.
"""

from __future__ import annotations

import os
import re
import warnings
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from click.testing import CliRunner
from psycopg import sql

from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.partitions import month_key
from nextcrm_pipelines_tests.accounting import free_port
from nextcrm_pipelines_tests.test_dagster import DAGSTER_OWN_WARNING
from nextcrm_sandbox import cli

DEMO_CONNECTIONS = [
    "stripe-demo-stripe",
    "xero-demo-xero",
    "quickbooks-demo-quickbooks",
    "myob-demo-myob",
    "paypal-demo-paypal",
    "billionmail-demo-billionmail",
    "mautic-demo-mautic",
]


@pytest.fixture
def demo_environment(database_url, schema, secret_key, tmp_path, monkeypatch: pytest.MonkeyPatch) -> str:
    """The demo pointed at the test database and schema, a free sandbox port and a Dagster home in tmp_path
    (what `environment.prepare` exports is restored afterwards)."""
    monkeypatch.setattr(cli, "SANDBOX_PORT", free_port())
    (tmp_path / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    monkeypatch.setenv("NEXTCRM_DATA_DIR", str(tmp_path / "data"))
    for name in ("NEXTCRM_DAGSTER_STORAGE_URL", "NEXTCRM_DAGSTER_ARTIFACTS", "NEXTCRM_DAGSTER_COMPUTE_LOGS"):
        monkeypatch.setenv(name, str(tmp_path / name.lower()))
    monkeypatch.setenv("MYOB_COMPANY_FILE_USERNAME", "Administrator")
    monkeypatch.setenv("NEXTCRM_SYNC_START_DATE", "")  # unset for the demo, which sets it; restored afterwards
    return schema


def test_the_demo_prints_one_line_per_connection_then_the_table_and_warns_nothing(
    database_url, demo_environment, capfd
):
    schema = demo_environment
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", message=DAGSTER_OWN_WARNING, category=DeprecationWarning)
        outcome = CliRunner().invoke(cli.main, ["demo", "--days", "2"], catch_exceptions=False)
    printed = outcome.output + "".join(capfd.readouterr())
    assert outcome.exit_code == 0, printed
    assert sorted({f"{w.category.__name__}: {w.message}" for w in caught}) == []
    lines = printed.splitlines()
    assert lines[0] == f"database: {database_url} (schema {schema})"
    synced = [line for line in lines if re.match(r"synced \S+: ", line)]
    assert [line.split()[1].rstrip(":") for line in synced] == DEMO_CONNECTIONS
    assert lines[1 : 1 + len(synced)] == synced  # nothing between: no Dagster log lines, no warnings
    assert all("{" not in line and "Warning" not in line for line in lines)
    counts = dict(re.findall(rf"^  {schema}\.(\w+): (\d+) rows$", printed, flags=re.MULTILINE))
    with psycopg.connect(database_url) as conn:
        stored = {name: conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table(name, schema))).fetchone()[0]
                  for name in ("stripe_payments", "stripe_subscriptions", "stripe_customers",
                               "stripe_invoices")}  # fmt: skip
    assert {name: int(counts[name]) for name in stored} == stored and stored["stripe_payments"] > 0
    assert int(counts["xero_payments"]) > 0  # the demo organisation's paid invoices have their payments
    assert all(int(counts[name]) > 0 for name in ("myob_invoices", "myob_customers", "myob_customer_payments"))
    assert int(counts["billionmail_contacts"]) > int(counts["billionmail_groups"]) > 0  # the demo install's lists
    assert int(counts["paypal_plans"]) > 0 and int(counts["paypal_invoices"]) > 0  # the demo merchant's
    # A fresh schema: each row of the Stripe tables was inserted once, by this run.
    stripe = re.match(r"synced stripe-demo-stripe: (\d+) records, (\d+) inserted, \d+ updated, \d+ unchanged, 0 failed",
                      synced[0])  # fmt: skip
    assert stripe and int(stripe[1]) >= int(stripe[2]) == sum(stored.values())
    assert lines[-2] == f"partitions begin with the month of {os.environ['NEXTCRM_SYNC_START_DATE']} " + (
        "(NEXTCRM_SYNC_START_DATE; see the README)"
    )
    assert lines[-1] == f"DATABASE_URL={database_url}"


def test_a_second_demo_keeps_the_sandbox_and_its_changes_and_the_partitions_start_with_the_demo_data(
    database_url, demo_environment, tmp_path
):
    import stripe

    from nextcrm_sandbox.server import SandboxServer

    schema = demo_environment
    first = CliRunner().invoke(cli.main, ["demo", "--days", "2"], catch_exceptions=False)
    assert first.exit_code == 0, first.output
    # The partitions begin with the month the demo's 30 days of data begin in, kept for later runs.
    start = (tmp_path / "data" / "demo-start-date").read_text().strip()
    assert start == month_key(datetime.now(UTC).date() - timedelta(days=cli.DEMO_HISTORY_DAYS))
    assert os.environ["NEXTCRM_SYNC_START_DATE"] == start

    # A refund made in the sandbox between two demos (as in `make dev`) is still there for the second one.
    with SandboxServer(state_dir=tmp_path / "data" / "sandbox") as sandbox:
        client = stripe.StripeClient(cli.DEMO_API_KEY, base_addresses={"api": sandbox.url}, max_network_retries=0)
        today = int(datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0).timestamp())
        charge = next(c for c in client.v1.charges.list({"limit": 100, "created": {"gte": today - 86400}})
                      if c.paid and not c.refunded)  # fmt: skip
        client.v1.refunds.create({"charge": charge.id, "amount": 100})
    second = CliRunner().invoke(cli.main, ["demo", "--days", "2"], catch_exceptions=False)
    assert second.exit_code == 0, second.output
    assert "sandbox: kept the restored" in second.output
    stripe_line = next(line for line in second.output.splitlines() if line.startswith("synced stripe-demo-stripe"))
    assert re.search(r" 0 inserted, 1 updated, \d+ unchanged, 0 failed", stripe_line), stripe_line
    for name in DEMO_CONNECTIONS[1:]:  # the same accounts, their tokens still good: nothing new, nothing failed
        line = next(line for line in second.output.splitlines() if line.startswith(f"synced {name}:"))
        assert re.search(r" 0 inserted, .* 0 failed", line), line
    with psycopg.connect(database_url) as conn:
        refunded = conn.execute(
            sql.SQL("SELECT amount_refunded FROM {} WHERE id = %s").format(table("stripe_payments", schema)),
            (charge.id,),
        ).fetchone()
    assert refunded is not None and refunded[0] > 0
