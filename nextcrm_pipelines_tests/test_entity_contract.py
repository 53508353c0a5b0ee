"""The promises every mirrored entity keeps, over real HTTP against its sandbox emulator and a real Postgres.

For each (provider, entity) case of `nextcrm_pipelines_tests.contract`: a sync with a small page size reads
to the last page and the mirror then equals the sandbox's records; a re-run changes nothing; a record
updated exactly at midnight lands in its own day only; 5xx answers and 429 bursts are survived; records
deleted, voided or archived upstream end flagged `deleted` (and nothing else does). Syncs go through
`core.runner.sync_partitions`, as a Dagster run's do. Each test has a sandbox of its own, on the wall clock:
a provider's clock agrees with ours (Stripe listings are stamped with the time they were read, and the
events that follow must be newer).
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

import pytest

from nextcrm_pipelines.core.runner import day_window, snapshot_window, sweep_connection, sync_partitions
from nextcrm_pipelines.core.sync import EntitySpec, SyncResult, SyncWindow
from nextcrm_pipelines.providers import get_provider
from nextcrm_pipelines_tests.accounting import mirror
from nextcrm_pipelines_tests.contract import Account, EntityCase, Env, all_cases
from nextcrm_pipelines_tests.helpers import days_back, sandbox_now

CASES = all_cases()
SMALL_PAGE = 5
PAGE = 20


@pytest.fixture
def env(database_url: str, schema: str, box, own_sandbox) -> Env:
    return Env(database_url, schema, box, own_sandbox)


def spec(case: EntityCase) -> EntitySpec:
    return get_provider(case.provider).entity(case.entity)


def today(account: Account) -> date:
    return sandbox_now(account.env.server).date()


def all_windows(case: EntityCase, account: Account) -> list[SyncWindow]:
    """Every day the account's records fall in (and one before), or the whole list."""
    if not spec(case).daily:
        return [snapshot_window()]
    return [day_window(day) for day in days_back(today(account), account.days + 1)]


def sync(case: EntityCase, account: Account, windows: list[SyncWindow]) -> list[SyncResult]:
    env, provider = account.env, get_provider(case.provider)
    results = sync_partitions(database_url=env.database_url, schema=env.schema, provider=provider,
                              entity_name=case.entity, connection_id=account.connection.id,
                              windows=windows)  # fmt: skip
    assert [r.status for r in results] == ["success"] * len(windows), [r.error for r in results if r.error]
    return results


def rows_of(case: EntityCase, account: Account) -> dict[str, dict[str, Any]]:
    return mirror(account.env.database_url, account.env.schema, case.entity, account.connection.id)


def assert_mirror_holds_the_sandbox(case: EntityCase, account: Account) -> dict[str, dict[str, Any]]:
    """Every record the sandbox holds is mirrored as it is there; any other row is one gone upstream, flagged."""
    truth = case.truth(account)
    rows = rows_of(case, account)
    missing = sorted(set(truth.rows) - set(rows))
    assert not missing, f"{len(missing)} record(s) not mirrored, e.g. {missing[:3]}"
    wrong = {rid: (case.row(rows[rid]), want) for rid, want in truth.rows.items() if case.row(rows[rid]) != want}
    assert not wrong, f"{len(wrong)} row(s) differ (mirrored, sandbox), e.g. {list(wrong.items())[:2]}"
    extra = set(rows) - set(truth.rows)
    assert extra <= truth.gone, f"mirrored rows the sandbox never had: {sorted(extra - truth.gone)[:3]}"
    assert all(rows[rid]["deleted"] for rid in extra), "a record gone upstream is not flagged deleted"
    return rows


@pytest.mark.parametrize("case", CASES, ids=str)
def test_each_case_names_an_entity_and_says_how_it_is_partitioned(case: EntityCase):
    daily = spec(case).daily  # raises for an entity the provider does not have
    assert (case.at_midnight is not None) is daily, "a daily entity puts a record at midnight; a whole list cannot"
    assert daily or case.whole_list_reason, "a whole-list entity says why it has no day"


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_small_page_size_reads_to_the_last_page_and_the_mirror_equals_the_sandbox(env, case: EntityCase):
    account = case.open(env, case.records, case.days, SMALL_PAGE)
    results = sync(case, account, all_windows(case, account))
    # Some window held several pages: the mirror can equal the sandbox only if every page was read.
    assert max(r.total for r in results) > 2 * SMALL_PAGE
    rows = assert_mirror_holds_the_sandbox(case, account)
    assert len(rows) >= case.records


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_rerun_changes_nothing(env, case: EntityCase):
    account = case.open(env, case.records, case.days, PAGE)
    windows = all_windows(case, account)
    sync(case, account, windows)
    before = rows_of(case, account)
    again = sync(case, account, windows)
    assert sum(r.counts.inserted + r.counts.updated for r in again) == 0
    assert sum(r.counts.unchanged for r in again) == sum(r.total for r in again) > 0
    assert rows_of(case, account) == before  # not one column, `synced_at` included
    assert_mirror_holds_the_sandbox(case, account)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_a_record_updated_exactly_at_midnight_lands_in_its_own_day_only(env, case: EntityCase):
    if not spec(case).daily:
        pytest.skip(case.whole_list_reason or f"{case.entity} is read as a whole list: it has no day")
    assert case.at_midnight is not None
    account = case.open(env, 10, 2, PAGE)
    day = today(account)
    midnight = datetime(day.year, day.month, day.day, tzinfo=UTC)
    record_id = case.at_midnight(account, midnight)
    sync(case, account, [day_window(day - timedelta(days=1))])
    assert record_id not in rows_of(case, account), "the day that ends at midnight took the record"
    (on,) = sync(case, account, [day_window(day)])
    row = rows_of(case, account)[record_id]
    assert row[spec(case).partition_column] == midnight and on.total >= 1
    # Read again, the earlier day still leaves it alone.
    (again,) = sync(case, account, [day_window(day - timedelta(days=1))])
    assert again.counts.inserted == again.counts.updated == 0
    assert rows_of(case, account)[record_id] == row


@pytest.mark.parametrize("case", CASES, ids=str)
def test_server_errors_and_429_bursts_are_survived(env, case: EntityCase):
    account = case.open(env, 20, 1, PAGE)
    server_errors, rate_limited = case.fault_counts
    with case.faults(account, server_errors, rate_limited):
        results = sync(case, account, all_windows(case, account))
    assert sum(r.stats.retries for r in results) >= server_errors + rate_limited
    assert sum(r.stats.rate_limit_waits for r in results) >= rate_limited
    assert_mirror_holds_the_sandbox(case, account)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_records_deleted_voided_or_archived_upstream_are_flagged(env, case: EntityCase):
    account = case.open(env, case.records, case.days, PAGE)
    sync(case, account, all_windows(case, account))
    before = rows_of(case, account)
    removed = case.remove(account)
    assert removed and all(rid in before and not before[rid]["deleted"] for rid in removed), removed
    if case.deletions == "sweep":
        swept = sweep_connection(database_url=env.database_url, schema=env.schema,
                                 provider=get_provider(case.provider), entity_name=case.entity,
                                 connection_id=account.connection.id)  # fmt: skip
        assert swept.status == "success"
    elif case.deletions == "whole-list":
        sync(case, account, [snapshot_window()])
    else:
        sync(case, account, [day_window(today(account))])
    rows = assert_mirror_holds_the_sandbox(case, account)
    flagged = {rid for rid, row in rows.items() if row["deleted"] and not (rid in before and before[rid]["deleted"])}
    assert flagged == set(removed)
    for rid in removed:  # the last data known is kept
        assert rows[rid]["created_at"] == before[rid]["created_at"]
