"""Encryption of connection secrets at rest, with key rotation.

Secrets (API keys, tokens, client secrets) are stored as Fernet tokens (AES-128-CBC + HMAC-SHA256)
in `integration_connections.secrets_encrypted`. The plaintext binds the connection id, so a token
copied onto another row does not decrypt there. Keys come from `NEXTCRM_SECRET_KEY` (current) and
`NEXTCRM_SECRET_KEY_PREVIOUS` (comma-separated keys still accepted for reading while rotating); with
neither set, a local key file in the data folder is used (the demo creates one and says so).

Each key has a public fingerprint (an HMAC of a fixed label under the key: it names the key without
revealing it). `secrets rotate` records the fingerprint of the key it re-encrypted under in the
database, and every write of secrets seals them under that recorded key (see
`connections.lock_current_key`), so a process that still runs with a superseded key cannot leave a
row that only the dropped key opens.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import orjson
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from nextcrm_pipelines.core import settings

KEY_FILE_NAME = "secret.key"


class VaultError(RuntimeError):
    """A secret could not be encrypted or decrypted; the message never contains secret material."""


class StaleKey(VaultError):
    """This process lacks the key the vault records as current: it must not write secrets."""


def key_fingerprint(key: str) -> str:
    """The public name of a key: it identifies the key and reveals nothing of it."""
    return hmac.new(key.encode(), b"nextcrm vault key fingerprint", hashlib.sha256).hexdigest()[:16]


class Secrets(Mapping[str, str]):
    """A read-only bag of secret strings whose repr and str never show the values."""

    def __init__(self, values: Mapping[str, str]):
        self._values = dict(values)

    def __getitem__(self, key: str) -> str:
        return self._values[key]

    def __iter__(self):
        return iter(self._values)

    def __len__(self) -> int:
        return len(self._values)

    def __repr__(self) -> str:
        return f"Secrets({', '.join(f'{k}=***' for k in self._values)})"

    __str__ = __repr__

    def reveal(self) -> dict[str, str]:
        """A plain dict of the values, for encrypting them again."""
        return dict(self._values)


def stale_key_message(current: str) -> str:
    """What a process told to write under a key it lacks must say: restart it with the current key."""
    return (
        f"the vault's secrets are now encrypted under the key with fingerprint {current} (recorded by "
        "`nextcrm-pipelines secrets rotate`), which this process was not started with; it writes no secrets "
        "and calls no token endpoint until you restart it with the current NEXTCRM_SECRET_KEY (or the rewritten local "
        "key file)"
    )


def key_file() -> Path:
    return settings.data_dir() / KEY_FILE_NAME


def _parse_keys(text: str) -> list[str]:
    return [k.strip() for k in text.replace("\n", ",").split(",") if k.strip()]


def configured_keys() -> list[str]:
    """Keys newest first: the env's current and previous keys, else the local key file's lines."""
    current = os.environ.get("NEXTCRM_SECRET_KEY", "").strip()
    if current:
        return [current, *_parse_keys(os.environ.get("NEXTCRM_SECRET_KEY_PREVIOUS", ""))]
    path = key_file()
    if path.exists():
        return _parse_keys(path.read_text())
    return []


def ensure_local_key() -> Path | None:
    """Create the local key file when no key is configured; returns its path if it was created."""
    if configured_keys():
        return None
    path = key_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(Fernet.generate_key().decode() + "\n")
    return path


class SecretBox:
    """Encrypts and decrypts a connection's secrets with the configured keys."""

    def __init__(self, keys: list[str]):
        if not keys:
            raise VaultError(
                "no encryption key: set NEXTCRM_SECRET_KEY (generate one with "
                "`nextcrm-pipelines secrets generate-key`) or run `make demo` to create a local key file"
            )
        try:
            self._fernets = [Fernet(k.encode()) for k in keys]
            self._keys = list(keys)
        except (ValueError, TypeError) as exc:
            raise VaultError("NEXTCRM_SECRET_KEY is not a valid Fernet key (32 url-safe base64 bytes)") from exc
        self._multi = MultiFernet(self._fernets)
        self._by_fingerprint = {
            key_fingerprint(k): f for k, f in zip(reversed(keys), reversed(self._fernets), strict=True)
        }

    @property
    def fingerprint(self) -> str:
        """The fingerprint of the current (first) key."""
        return key_fingerprint(self._keys[0])

    def holds(self, fingerprint: str) -> bool:
        """Whether one of this box's keys has `fingerprint`."""
        return fingerprint in self._by_fingerprint

    @classmethod
    def from_environment(cls) -> SecretBox:
        return cls(configured_keys())

    def __reduce__(self) -> tuple[Any, ...]:
        """Handed to a helper process of the same sync through its pipe (never logged or stored)."""
        return SecretBox, (self._keys,)

    def encrypt(self, connection_id: str, secrets: Mapping[str, str], under: str | None = None) -> str:
        """Seal a connection's secrets under the key whose fingerprint is `under` (default: the current key)."""
        payload = orjson.dumps({"connection_id": connection_id, "secrets": dict(secrets)})
        if under is None:
            return self._multi.encrypt(payload).decode()
        fernet = self._by_fingerprint.get(under)
        if fernet is None:
            raise StaleKey(stale_key_message(under))
        return fernet.encrypt(payload).decode()

    def decrypt(self, connection_id: str, token: str) -> Secrets:
        try:
            payload = orjson.loads(self._multi.decrypt(token.encode()))
        except InvalidToken as exc:
            raise VaultError(
                f"secrets of connection {connection_id!r} cannot be decrypted with the configured keys "
                "(was NEXTCRM_SECRET_KEY changed without `nextcrm-pipelines secrets rotate`?)"
            ) from exc
        if payload.get("connection_id") != connection_id:
            raise VaultError(f"secrets stored on connection {connection_id!r} belong to another connection")
        return Secrets(payload["secrets"])

    def rotate(self, token: str) -> str:
        """Re-encrypt a token under the current (first) key."""
        try:
            return self._multi.rotate(token.encode()).decode()
        except InvalidToken as exc:
            raise VaultError("a stored secret cannot be decrypted with any configured key") from exc

    def is_current(self, token: str) -> bool:
        """Whether `token` is already encrypted under the current key."""
        try:
            self._fernets[0].decrypt(token.encode())
            return True
        except InvalidToken:
            return False
