"""The per-entity contract: what each provider's adapter supplies so that one suite (`test_entity_contract.py`)
proves the same promises for every mirrored entity against its sandbox emulator.

An adapter is a module of this package with a `CASES` list of `EntityCase`s, one per entity: how to open an
account with N records and a small page size, the sandbox's truth as the mirror must hold it, how to put a
record updated exactly at midnight (daily entities), how to delete, void or archive a few records, and how to
inject 5xx answers and 429s. `all_cases()` collects every module's cases, so a new provider's entities join
the suite with one new module.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from nextcrm_pipelines.core.connections import Connection
from nextcrm_pipelines.core.vault import SecretBox
from nextcrm_sandbox.server import SandboxServer


@dataclass(frozen=True)
class Env:
    """Where a case runs: the test's database schema and vault key, and its own sandbox server."""

    database_url: str
    schema: str
    box: SecretBox
    server: SandboxServer


@dataclass
class Account:
    """A sandbox account a case opened, with the vault connection that syncs it.

    Its records were created or changed within today and the `days` days before (sandbox time); `handle`
    is whatever the adapter needs to reach the account again (an API key, a control client and tenant id).
    """

    env: Env
    connection: Connection
    days: int
    handle: Any


@dataclass(frozen=True)
class Truth:
    """What the mirror must hold: `rows` by id, each as the case's `row` renders a mirrored row, and the ids of
    records gone upstream (`gone`), which the mirror may hold only flagged deleted."""

    rows: Mapping[str, tuple[Any, ...]]
    gone: frozenset[str] = frozenset()


@dataclass(frozen=True)
class EntityCase:
    """One mirrored entity of one provider, as the contract suite drives it.

    - `open(env, records, days, page_size)`: a new account with about `records` records of the entity spread
      over today and the `days` days before, connected with the given page size.
    - `truth(account)` and `row(mirrored row)`: the sandbox's records as the mirror should hold them, and a
      mirror row rendered the same way (ids and the fields a CRM shows, the deleted flag among them).
    - `at_midnight(account, midnight)`: put a record whose partition time is exactly `midnight`; returns its
      id. None for entities read as a whole list (`whole_list_reason` says why they have no day).
    - `remove(account)`: delete, void or archive a few mirrored records upstream now; returns their ids.
      `deletions` says what shows it: the day's sync (`"day"`, an events feed or Change Data Capture), the
      id sweep (`"sweep"`), or the next whole-list read (`"whole-list"`).
    - `faults(account, server_errors, rate_limited)`: a context in which the account's next requests answer
      that many 5xx and 429; `fault_counts` is what the provider's emulator can inject.
    - `records` and `days`: the size of the account the paging, re-run and deletion tests open (enough records
      for several pages of a small page size in some day).
    """

    provider: str
    entity: str
    open: Callable[[Env, int, int, int], Account]
    truth: Callable[[Account], Truth]
    row: Callable[[Mapping[str, Any]], tuple[Any, ...]]
    remove: Callable[[Account], list[str]]
    faults: Callable[[Account, int, int], AbstractContextManager[None]]
    at_midnight: Callable[[Account, datetime], str] | None = None
    whole_list_reason: str | None = None
    deletions: Literal["day", "sweep", "whole-list"] = "day"
    fault_counts: tuple[int, int] = (1, 2)
    records: int = 60
    days: int = 3

    def __str__(self) -> str:
        return self.entity


def all_cases() -> list[EntityCase]:
    """Every adapter module's `CASES`, in module order."""
    found: list[EntityCase] = []
    for module in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        found += importlib.import_module(f"{__name__}.{module.name}").CASES
    names = [case.entity for case in found]
    duplicated = sorted({name for name in names if names.count(name) > 1})
    if duplicated:
        raise ValueError(f"entities with more than one contract case: {duplicated}")
    return found
