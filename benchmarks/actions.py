"""Actions through the outbox: throughput against the provider's published limit, latency, memory, duplicates.

For each provider measured (Stripe refunds; Mautic contact updates where its actions exist), N actions are
inserted into the outbox at once, the provider's actions sensor is evaluated and the run it requests is
executed through Dagster, as the daemon would, in a child process (its peak RSS is reported). Figures:

- actions per second from the first send to the last success, and the requests per second that made, against
  the provider's published limit, which the sandbox enforces (Stripe: 25 requests/s in test mode);
- the baseline, measured in the same run on an account of its own: the same N writes sent straight through
  the provider client in a loop (no outbox, no database), and the outbox's rate as a ratio of it;
- p50 / p99 seconds from insert to `succeeded`;
- duplicates: objects at the sandbox beyond one per action (must be 0).

    python benchmarks/actions.py [--actions 1000]

`BENCH_DATABASE_URL` points at a Postgres to use; without it an embedded one is started in a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

STRIPE_LIMIT = 25.0  # requests per second, Stripe test mode (https://docs.stripe.com/rate-limits)


def _prepare(database_url: str, schema: str) -> Any:
    """A freshly migrated `schema`, this process's along with `database_url`; the SecretBox of its key."""
    from benchmarks.harness import fresh_schema

    os.environ["DATABASE_URL"] = database_url
    return fresh_schema(database_url, schema)


def apply_through_dagster(database_url: str, schema: str, provider: str) -> dict[str, Any]:
    """In this (child) process: tick the provider's actions sensor and execute each run it asks for, until
    nothing is due; seconds taken and peak RSS."""
    import dagster as dg

    os.environ["NEXTCRM_DB_SCHEMA"] = schema
    os.environ["DATABASE_URL"] = database_url
    from nextcrm_pipelines.definitions import build_definitions

    defs = build_definitions()
    sensor = defs.resolve_sensor_def(f"{provider}_actions_sensor")
    job = defs.resolve_job_def(f"{provider}_apply_actions")
    started, runs = time.perf_counter(), 0
    with dg.instance_for_test() as instance:
        while True:
            context = dg.build_sensor_context(instance=instance, resources={"mirror": defs.resources["mirror"]})
            requests = list(sensor.evaluate_tick(context).run_requests or [])
            if not requests:
                break
            for request in requests:
                result = job.execute_in_process(instance=instance, run_config=request.run_config, tags=request.tags,
                                                raise_on_error=False)  # fmt: skip
                runs += 1
                if not result.success:
                    raise RuntimeError(f"the {provider} apply run failed")
    return {"seconds": round(time.perf_counter() - started, 2), "runs": runs,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}  # fmt: skip


def _child(database_url: str, schema: str, provider: str) -> dict[str, Any]:
    """`apply_through_dagster` in a child process, so that the peak RSS it reports is the run's own."""
    from benchmarks.harness import run_child

    return run_child(__file__, provider, "--database-url", database_url, "--schema", schema,
                     failure="the apply failed")  # fmt: skip


def _outbox_figures(database_url: str, schema: str) -> dict[str, Any]:
    import psycopg

    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            f"SELECT status, extract(epoch FROM completed_at - created_at), extract(epoch FROM sent_at), "
            f'extract(epoch FROM completed_at) FROM "{schema}".integration_outbox'
        ).fetchall()
    done = [r for r in rows if r[0] == "succeeded"]
    latencies = sorted(float(r[1]) for r in done)
    span = max(float(r[3]) for r in done) - min(float(r[2]) for r in done) if done else 0.0
    return {
        "succeeded": len(done),
        "other": len(rows) - len(done),
        "p50_s": round(statistics.median(latencies), 2) if latencies else None,
        "p99_s": round(latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))], 2) if latencies else None,
        "send_span_s": round(span, 2),
        "actions_per_s": round(len(done) / span, 1) if span else None,
    }


def bench_stripe(sandbox: Any, database_url: str, count: int) -> dict[str, Any]:
    """N partial refunds of N charges through the outbox, and the same through the client alone."""
    import psycopg

    from nextcrm_pipelines.core import connections as vault
    from nextcrm_pipelines.core import outbox
    from nextcrm_pipelines.core.connections import Connection
    from nextcrm_pipelines.core.money import currency_exponent
    from nextcrm_pipelines.core.vault import Secrets
    from nextcrm_pipelines.providers.stripe.client import StripeApi

    def account() -> tuple[str, list[dict[str, Any]]]:
        key = f"sk_test_bench_{uuid.uuid4().hex}"
        sandbox.add_stripe_account(api_key=key, seed=41, charges=int(count * 1.6), subscriptions=0, days=30,
                                   requests_per_second=STRIPE_LIMIT)  # fmt: skip
        charges = [c for c in sandbox.stripe_export(key, "charges")
                   if c["status"] == "succeeded" and not c["amount_refunded"] and c["amount"] >= 100]  # fmt: skip
        if len(charges) < count:
            raise RuntimeError(f"the sandbox account has {len(charges)} refundable charges, fewer than {count}")
        return key, charges[:count]

    # The baseline: the same requests straight through the client (same published limit, no outbox, no database):
    # the charge's currency checked, then the refund with its charge expanded (what the mirror gets).
    key, charges = account()
    connection = Connection(id="bench", provider="stripe", display_name="bench", base_url=sandbox.url)
    started = time.perf_counter()
    with StripeApi(connection, Secrets({"api_key": key})) as api:
        for charge in charges:
            api.get(f"/v1/charges/{charge['id']}", {})
            api.post("/v1/refunds", {"charge": charge["id"], "amount": 1, "expand": ["charge"]},
                     idempotency_key=uuid.uuid4().hex)  # fmt: skip
    baseline = count / (time.perf_counter() - started)

    schema = "bench_actions_stripe"
    box = _prepare(database_url, schema)
    key, charges = account()
    with psycopg.connect(database_url) as conn:
        stored = vault.add_connection(conn, provider="stripe", display_name="Bench", secrets={"api_key": key},
                                      box=box, base_url=sandbox.url)  # fmt: skip
        requests_before = sandbox.stripe_stats(key)["requests"]
        for charge in charges:  # one minor unit of each (as the baseline refunds)
            amount = str(Decimal(1).scaleb(-currency_exponent(charge["currency"])))
            payload = {"charge": charge["id"], "amount": amount, "currency": charge["currency"]}
            outbox.submit(conn, schema, connection_id=stored.id, action="refund_charge", payload=payload)
    child = _child(database_url, schema, "stripe")
    figures = _outbox_figures(database_url, schema)
    requests = sandbox.stripe_stats(key)["requests"] - requests_before
    refunded = {c["id"]: c["amount_refunded"] for c in sandbox.stripe_export(key, "charges")}
    duplicates = sum(1 for charge in charges if refunded[charge["id"]] != 1)
    return {"provider": "stripe", "action": "refund_charge", "actions": count, **figures, **child,
            "requests": requests, "requests_per_action": round(requests / count, 2),
            "requests_per_s": round(requests / figures["send_span_s"], 1) if figures["send_span_s"] else None,
            "published_limit_rps": STRIPE_LIMIT, "baseline_actions_per_s": round(baseline, 1),
            "duplicates": duplicates}  # fmt: skip


def bench_mautic(sandbox: Any, database_url: str, count: int) -> dict[str, Any]:
    """N contact updates through the outbox (a PATCH and a read of the contact's segments each), and the same
    requests through the client alone."""
    import psycopg

    from nextcrm_pipelines.core import connections as vault
    from nextcrm_pipelines.core import outbox
    from nextcrm_sandbox.mautic import MauticControl

    control = MauticControl(sandbox)

    def installation(name: str) -> tuple[dict[str, Any], str, list[int]]:
        client_id = f"bench-{name}-{uuid.uuid4().hex[:6]}"
        clients = [{"client_id": client_id, "client_secret": f"{client_id}-secret"}]
        account = control.add_account(seed=43, contacts=count, campaigns=2, segments=3, days=5, clients=clients)
        ids = sorted(int(c["id"]) for c in control.export(account["id"], "contacts")["records"])[:count]
        return account, client_id, ids

    def connect(account: dict[str, Any], client_id: str, schema: str, box: Any) -> Any:
        secrets = {"client_id": client_id, "client_secret": f"{client_id}-secret", "grant_type": "client_credentials"}
        with psycopg.connect(database_url) as conn:
            return vault.add_connection(conn, provider="mautic", display_name=f"Bench {schema}", secrets=secrets,
                                        box=box, base_url=f"{sandbox.url}{account['base_path']}",
                                        settings={"requests_per_second": 0})  # fmt: skip

    # The baseline: the same requests straight through the client, in a loop (no outbox, no mirror): the PATCH, then
    # the contact's segments, which the outbox reads for the mirror's row.
    from nextcrm_pipelines.core.runner import open_connection
    from nextcrm_pipelines.providers import get_provider

    schema = "bench_actions_mautic_base"
    box = _prepare(database_url, schema)
    account, client_id, ids = installation("base")
    stored = connect(account, client_id, schema, box)
    with open_connection(database_url=database_url, provider=get_provider("mautic"), connection_id=stored.id,
                         box=box, lock=False) as (_, _, api, _):  # fmt: skip
        started = time.perf_counter()
        for n, contact_id in enumerate(ids):
            api.http.send("PATCH", f"/api/contacts/{contact_id}/edit", json={"position": f"base-{n}"}, once=True)
            api.segments_of_contacts([str(contact_id)])
        baseline = count / (time.perf_counter() - started)

    schema = "bench_actions_mautic"
    box = _prepare(database_url, schema)
    account, client_id, ids = installation("outbox")
    stored = connect(account, client_id, schema, box)
    before = len(control.export(account["id"], "contacts")["records"])
    with psycopg.connect(database_url) as conn:
        for n, contact_id in enumerate(ids):
            outbox.submit(conn, schema, connection_id=stored.id, action="create_or_update_contact",
                          payload={"contact_id": contact_id, "position": f"bench-{n}"})  # fmt: skip
    child = _child(database_url, schema, "mautic")
    figures = _outbox_figures(database_url, schema)
    contacts = control.export(account["id"], "contacts")["records"]
    positions = {int(c["id"]): (c.get("fields", {}).get("all", {}) or {}).get("position") for c in contacts}
    wrong = sum(1 for n, contact_id in enumerate(ids) if positions.get(contact_id) != f"bench-{n}")
    return {"provider": "mautic", "action": "contact update", "actions": count, **figures, **child,
            "requests": None, "requests_per_action": None, "requests_per_s": None,
            "published_limit_rps": "none", "baseline_actions_per_s": round(baseline, 1),
            "duplicates": len(contacts) - before + wrong}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--actions", type=int, default=1000)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--database-url", help=argparse.SUPPRESS)
    parser.add_argument("--schema", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(apply_through_dagster(args.database_url, args.schema, args.child)))
        return

    from benchmarks.harness import bench_database
    from nextcrm_sandbox.server import SandboxServer

    report = []
    with bench_database() as database_url:
        dagster_home = tempfile.mkdtemp(prefix="nextcrm-bench-dagster-")
        os.environ["DAGSTER_HOME"] = dagster_home
        try:
            with SandboxServer(subprocess=True, startup_timeout=600) as sandbox:
                for bench in (bench_stripe, bench_mautic):
                    report.append(bench(sandbox, database_url, args.actions))
                    print(json.dumps(report[-1]), flush=True)
        finally:
            shutil.rmtree(dagster_home, ignore_errors=True)
    print("\nprovider  action          actions  actions/s  baseline/s  ratio  req/s  limit  p50 s  p99 s  RSS MB  dup")
    for out in report:
        ratio = out["actions_per_s"] / out["baseline_actions_per_s"] if out["actions_per_s"] else 0.0
        cells = {k: "-" if out[k] is None else out[k] for k in out}
        print(f"{cells['provider']:<9} {cells['action']:<15} {cells['actions']:>7}  {cells['actions_per_s']:>9}  "
              f"{cells['baseline_actions_per_s']:>10}  {ratio:>5.2f}  {cells['requests_per_s']:>5}  "
              f"{cells['published_limit_rps']:>5}  {cells['p50_s']:>5}  {cells['p99_s']:>5}  "
              f"{cells['peak_rss_mb']:>6}  {cells['duplicates']:>3}")  # fmt: skip


if __name__ == "__main__":
    main()
