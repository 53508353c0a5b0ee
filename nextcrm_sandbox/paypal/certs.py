"""Webhook signing with the sandbox's own message-verification certificates: a CA, leaf certificates for
``messageverificationcerts.sandbox.paypal.com`` (valid, expired, misnamed or untrusted on request) and the
``id|time|webhook_id|crc32`` message PayPal signs."""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import secrets
import threading
import zlib
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

AUTH_ALGO = "SHA256withRSA"
MESSAGE_CERT_CN = "messageverificationcerts.sandbox.paypal.com"


@dataclass(frozen=True)
class _Cert:
    """One certificate the sandbox publishes at ``/v1/notifications/certs/<name>`` (PEM, leaf first)."""

    name: str
    kind: str
    pem: bytes
    key: rsa.RSAPrivateKey = field(repr=False)

    def __reduce__(self) -> tuple[Any, ...]:
        # RSA keys do not pickle: the sandbox's saved state holds the key as PEM.
        return _restore_cert, (self.name, self.kind, self.pem, _key_pem(self.key))


class MessageCerts:
    """The sandbox's stand-in for PayPal's signing PKI: a CA of its own and leaf certificates for
    ``messageverificationcerts.sandbox.paypal.com``, created on first use (RSA keys take a moment).

    Besides the genuine leaf (``valid``), ``mint`` makes the certificates a receiver must refuse, all
    over the same leaf key so only the named flaw differs: ``expired``; ``untrusted`` (issued by a CA
    nobody trusts, served with that CA); ``wrong_cn`` (issued by the sandbox CA to another name).
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ca_key: rsa.RSAPrivateKey | None = None
        self._ca: x509.Certificate | None = None
        self._leaf_key: rsa.RSAPrivateKey | None = None
        self.certs: dict[str, _Cert] = {}
        self.current = ""

    def __getstate__(self) -> dict[str, Any]:
        """Keys and the CA as PEM (neither pickles) and no lock: the sandbox's state is saved with its certificates,
        so a connection that trusts this CA keeps verifying deliveries after a restart."""
        with self._lock:
            state = {name: value for name, value in self.__dict__.items() if name != "_lock"}
        for name in ("_ca_key", "_leaf_key"):
            if state[name] is not None:
                state[name] = _key_pem(state[name])
        if state["_ca"] is not None:
            state["_ca"] = state["_ca"].public_bytes(serialization.Encoding.PEM)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        for name in ("_ca_key", "_leaf_key"):
            if state[name] is not None:
                setattr(self, name, _load_key(state[name]))
        if state["_ca"] is not None:
            self._ca = x509.load_pem_x509_certificate(state["_ca"])

    def _ready(self) -> None:
        with self._lock:
            if self._ca is not None:
                return
            self._ca_key, self._ca = _ca_certificate("NextCRM Sandbox PayPal Message Verification CA")
            self._leaf_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            self.current = self._add("valid", MESSAGE_CERT_CN, self._ca_key, self._ca, _VALID)

    def default(self) -> str:
        """The name of the genuine certificate deliveries are signed with."""
        self._ready()
        return self.current

    def ca_pem(self) -> str:
        """The CA a sandbox connection trusts for webhook certificates (PEM)."""
        self._ready()
        assert self._ca is not None
        return self._ca.public_bytes(serialization.Encoding.PEM).decode()

    def mint(self, kind: str) -> _Cert:
        """A new certificate of ``kind`` (``valid``, ``expired``, ``untrusted``, ``wrong_cn``), published."""
        self._ready()
        assert self._ca_key is not None and self._ca is not None
        with self._lock:
            if kind == "valid":
                return self.certs[self._add(kind, MESSAGE_CERT_CN, self._ca_key, self._ca, _VALID)]
            if kind == "expired":
                return self.certs[self._add(kind, MESSAGE_CERT_CN, self._ca_key, self._ca, _EXPIRED)]
            if kind == "wrong_cn":
                cn = "messageverificationcerts.paypal.com.attacker.example"
                return self.certs[self._add(kind, cn, self._ca_key, self._ca, _VALID)]
            if kind == "untrusted":
                rogue_key, rogue = _ca_certificate("PayPal Message Verification CA")
                return self.certs[self._add(kind, MESSAGE_CERT_CN, rogue_key, rogue, _VALID, chain=True)]
        raise ValueError("kind must be valid, expired, untrusted or wrong_cn")

    def _add(self, kind: str, cn: str, issuer_key: rsa.RSAPrivateKey, issuer: x509.Certificate,
             validity: tuple[int, int], chain: bool = False) -> str:  # fmt: skip
        assert self._leaf_key is not None
        now = dt.datetime.now(dt.UTC)
        issuer_ski = issuer.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        leaf = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([
                x509.NameAttribute(NameOID.COUNTRY_NAME, "US"),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "PayPal, Inc."),
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
            ]))
            .issuer_name(issuer.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now + dt.timedelta(days=validity[0]))
            .not_valid_after(now + dt.timedelta(days=validity[1]))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(issuer_ski), critical=False)
            .sign(issuer_key, hashes.SHA256())
        )  # fmt: skip
        pem = leaf.public_bytes(serialization.Encoding.PEM)
        if chain:
            pem += issuer.public_bytes(serialization.Encoding.PEM)
        name = "CERT-" + "-".join(secrets.token_hex(4) for _ in range(3))
        self.certs[name] = _Cert(name, kind, pem, self._leaf_key)
        return name

    def sign(self, name: str, message: bytes) -> str:
        """Base64 SHA256withRSA (PKCS#1 v1.5) signature of ``message`` by certificate ``name``'s key."""
        self._ready()
        key = self.certs[name].key
        return base64.b64encode(key.sign(message, padding.PKCS1v15(), hashes.SHA256())).decode()

    def genuine(self, name: str, message: bytes, signature: str) -> bool:
        """Whether ``signature`` is the genuine certificate ``name``'s over ``message`` (online verification)."""
        cert = self.certs.get(name)
        if cert is None or cert.kind != "valid":
            return False
        try:
            raw = base64.b64decode(signature, validate=True)
            cert.key.public_key().verify(raw, message, padding.PKCS1v15(), hashes.SHA256())
        except (binascii.Error, ValueError, InvalidSignature):
            return False
        return True


def _key_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())  # fmt: skip


def _load_key(pem: bytes) -> rsa.RSAPrivateKey:
    key = serialization.load_pem_private_key(pem, password=None)
    assert isinstance(key, rsa.RSAPrivateKey)
    return key


def _restore_cert(name: str, kind: str, pem: bytes, key_pem: bytes) -> _Cert:
    return _Cert(name, kind, pem, _load_key(key_pem))


# (days from now) validity of leaf certificates
_VALID = (-1, 365)
_EXPIRED = (-400, -30)


def _ca_certificate(name: str) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "NextCRM sandbox"),
                         x509.NameAttribute(NameOID.COMMON_NAME, name)])  # fmt: skip
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=2))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )  # fmt: skip
    return key, cert


def signed_message(transmission_id: str, transmission_time: str, webhook_id: str, body: bytes) -> bytes:
    """What PayPal signs: ``id|time|webhook_id|crc32`` with the body's unsigned decimal CRC-32."""
    return f"{transmission_id}|{transmission_time}|{webhook_id}|{zlib.crc32(body) & 0xFFFFFFFF}".encode()
