"""The connection vault (encryption at rest, key rotation) and the CLI that manages it."""

from __future__ import annotations

import pickle

import psycopg
import pytest
from click.testing import CliRunner
from cryptography.fernet import Fernet
from psycopg import sql

from nextcrm_pipelines.cli import main
from nextcrm_pipelines.core import connections as vault
from nextcrm_pipelines.core import db
from nextcrm_pipelines.core.db import table
from nextcrm_pipelines.core.vault import SecretBox, VaultError

SECRET = "sk_test_vault_secret_value_abcdef123456"


def stored_row_text(database_url: str, schema: str, connection_id: str) -> str:
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            sql.SQL("SELECT t::text FROM {} t WHERE id = %s").format(table("integration_connections", schema)),
            (connection_id,),
        ).fetchone()[0]


def test_secrets_are_unreadable_in_the_table_and_redacted_in_repr(database_url, schema, box):
    with psycopg.connect(database_url) as conn:
        connection = vault.add_connection(conn, provider="stripe", display_name="Vault", secrets={"api_key": SECRET},
                                          box=box)  # fmt: skip
        secrets = vault.load_secrets(conn, connection.id, box)
    assert secrets["api_key"] == SECRET
    assert SECRET not in repr(secrets) and SECRET not in str(secrets) and SECRET not in repr(connection)
    text = stored_row_text(database_url, schema, connection.id)
    assert SECRET not in text and SECRET[8:20] not in text


def test_a_ciphertext_moved_to_another_connection_does_not_decrypt(database_url, schema, box):
    with psycopg.connect(database_url) as conn:
        a = vault.add_connection(conn, provider="stripe", display_name="A", secrets={"api_key": "sk_test_a"}, box=box)
        b = vault.add_connection(conn, provider="stripe", display_name="B", secrets={"api_key": "sk_test_b"}, box=box)
        t = table("integration_connections", schema)
        conn.execute(
            sql.SQL(
                "UPDATE {t} SET secrets_encrypted = (SELECT secrets_encrypted FROM {t} WHERE id = %s) WHERE id = %s"
            ).format(t=t),
            (a.id, b.id),
        )  # fmt: skip
        with pytest.raises(VaultError, match="belong to another connection"):
            vault.load_secrets(conn, b.id, box)


def test_key_rotation_re_encrypts_every_secret(database_url, schema, monkeypatch):
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    with psycopg.connect(database_url) as conn:
        for name in ("One", "Two"):
            vault.add_connection(conn, provider="stripe", display_name=name, secrets={"api_key": f"sk_test_{name}"},
                                 box=SecretBox([old]))  # fmt: skip
    monkeypatch.setenv("NEXTCRM_SECRET_KEY", new)
    monkeypatch.setenv("NEXTCRM_SECRET_KEY_PREVIOUS", old)
    outcome = CliRunner().invoke(main, ["secrets", "rotate"], catch_exceptions=False)
    assert "re-encrypted 2 connection secret(s)" in outcome.output
    with psycopg.connect(database_url) as conn:
        assert vault.load_secrets(conn, "stripe-one", SecretBox([new]))["api_key"] == "sk_test_One"
        with pytest.raises(VaultError, match="cannot be decrypted"):
            vault.load_secrets(conn, "stripe-two", SecretBox([old]))


def test_cli_adds_a_connection_from_the_environment_and_lists_it_without_secrets(database_url, schema, secret_key,
                                                                               sandbox):  # fmt: skip
    runner = CliRunner()
    sandbox.add_stripe_account(api_key=SECRET, seed=3, charges=1, subscriptions=0, days=1)
    added = runner.invoke(main, ["connections", "add", "stripe", "--name", "Acme Ltd", "--base-url", sandbox.url],
                          env={"STRIPE_SECRET_KEY": SECRET}, catch_exceptions=False)  # fmt: skip
    assert added.exit_code == 0 and "stripe-acme-ltd" in added.output, added.output
    assert "stripe accepted the key (account acct_" in added.output
    listed = runner.invoke(main, ["connections", "list"], catch_exceptions=False)
    assert "stripe-acme-ltd" in listed.output and "active" in listed.output
    assert SECRET not in added.output + listed.output
    disabled = runner.invoke(main, ["connections", "disable", "stripe-acme-ltd"], catch_exceptions=False)
    assert "disabled" in disabled.output
    assert "'status': 'disabled'" not in stored_row_text(database_url, schema, "stripe-acme-ltd")
    with psycopg.connect(database_url) as conn:
        assert vault.get_connection(conn, "stripe-acme-ltd").status == "disabled"


def test_cli_stores_a_webhook_secret_beside_the_api_key_and_prints_the_endpoint(database_url, schema, box):
    with psycopg.connect(database_url) as conn:
        vault.add_connection(conn, provider="stripe", display_name="Hooks", secrets={"api_key": SECRET}, box=box)
    hook_secret = "whsec_cli_" + "b" * 24
    outcome = CliRunner().invoke(main, ["webhooks", "configure", "stripe-hooks", "--base-url", "https://crm.example"],
                                 input=hook_secret + "\n", catch_exceptions=False)  # fmt: skip
    assert outcome.exit_code == 0, outcome.output
    assert "https://crm.example/webhooks/stripe/stripe-hooks" in outcome.output and hook_secret not in outcome.output
    with psycopg.connect(database_url) as conn:
        secrets = vault.load_secrets(conn, "stripe-hooks", box)
    assert (secrets["api_key"], secrets["webhook_secret"]) == (SECRET, hook_secret)
    assert hook_secret not in stored_row_text(database_url, schema, "stripe-hooks")


def test_cli_refuses_a_key_stripe_refuses_and_stores_nothing(database_url, schema, secret_key, sandbox):
    wrong = "sk_test_" + "w" * 24
    outcome = CliRunner().invoke(main, ["connections", "add", "stripe", "--name", "Wrong", "--base-url", sandbox.url],
                                 env={"STRIPE_SECRET_KEY": wrong})  # fmt: skip
    assert outcome.exit_code != 0 and "Stripe refused the API key" in outcome.output, outcome.output
    assert "nothing was stored" in outcome.output and wrong not in outcome.output and wrong[8:] not in outcome.output
    with psycopg.connect(database_url) as conn:
        assert vault.list_connections(conn) == []


def test_cli_refuses_to_add_without_a_secret_source(database_url, schema, secret_key, monkeypatch):
    monkeypatch.delenv("STRIPE_SECRET_KEY", raising=False)
    outcome = CliRunner().invoke(main, ["connections", "add", "stripe", "--name", "NoKey"])
    assert outcome.exit_code != 0 and "STRIPE_SECRET_KEY" in outcome.output


def test_migrations_are_idempotent(database_url, schema):
    from alembic.script import ScriptDirectory

    head = ScriptDirectory.from_config(db.alembic_config(database_url, schema)).get_current_head()
    newest = max(path.name.split("_")[0] for path in db.MIGRATIONS_DIR.joinpath("versions").glob("0*.py"))
    assert head == newest
    assert db.upgrade(database_url, schema) == db.current_revision(database_url, schema) == head


def test_a_secret_box_handed_to_a_helper_process_still_opens_what_it_sealed():
    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    sealed = SecretBox([old]).encrypt("stripe-acme", {"api_key": "sk_test_x"})
    box = pickle.loads(pickle.dumps(SecretBox([new, old])))
    assert box.decrypt("stripe-acme", sealed).get("api_key") == "sk_test_x"


def test_webhook_replay_offers_only_providers_that_send_webhooks():
    refused = CliRunner().invoke(main, ["webhooks", "replay", "--provider", "myob"])
    assert refused.exit_code == 2 and "'myob' is not one of" in refused.output
    assert "billionmail" not in CliRunner().invoke(main, ["webhooks", "replay", "--help"]).output
