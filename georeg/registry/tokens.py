"""Minting registry tokens GitLab Geo style: short-lived JWTs signed with the key pair all nodes share.

The registry (auth.token) trusts a certificate bundle; it finds the signing key by the header's `kid`,
which must be the libtrust key ID of the certificate's public key. Claims follow what the registry
checks: `iss`, `aud` as a plain string, `exp`/`nbf`, and an `access` list of scoped actions.
"""

from __future__ import annotations

import base64
import hashlib
import logging
import stat
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from georeg.errors import ConfigError

logger = logging.getLogger("georeg.registry")

_EC_ALGORITHMS = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
# The registry compares `nbf` with its own clock; backdating tolerates a little skew, as GitLab does.
_NOT_BEFORE_SKEW = 5


def libtrust_key_id(public_key: rsa.RSAPublicKey | ec.EllipticCurvePublicKey) -> str:
    """SHA-256 of the DER SubjectPublicKeyInfo, 30 bytes, base32 unpadded, in 12 groups of 4."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode().rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, 48, 4))


@dataclass(frozen=True)
class MintedToken:
    token: str
    expires_at: float


class TokenMinter:
    """Signs access tokens with a private key; the algorithm follows the key type (RS256 or ES256/384/512)."""

    def __init__(self, key_file: Path, *, issuer: str, service: str, subject: str, ttl_seconds: int) -> None:
        self._key = _load_private_key(key_file)
        if isinstance(self._key, rsa.RSAPrivateKey):
            self.algorithm = "RS256"
        else:
            self.algorithm = _EC_ALGORITHMS[self._key.curve.name]
        self.key_id = libtrust_key_id(self._key.public_key())
        self.issuer = issuer
        self.service = service
        self.subject = subject
        self.ttl_seconds = ttl_seconds

    def mint(self, access: list[dict[str, Any]], *, now: float | None = None) -> MintedToken:
        issued_at = int(time.time() if now is None else now)
        expires_at = issued_at + self.ttl_seconds
        claims = {
            "iss": self.issuer,
            "sub": self.subject,
            "aud": self.service,
            "iat": issued_at,
            "nbf": issued_at - _NOT_BEFORE_SKEW,
            "exp": expires_at,
            "jti": uuid.uuid4().hex,
            "access": access,
        }
        token = jwt.encode(claims, self._key, algorithm=self.algorithm, headers={"kid": self.key_id})
        return MintedToken(token=token, expires_at=expires_at)


def _load_private_key(key_file: Path) -> rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey:
    _warn_if_exposed(key_file)
    try:
        key = serialization.load_pem_private_key(key_file.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as error:
        # The message of a parse error never contains key material, only its kind.
        raise ConfigError(f"cannot read private key {key_file}: {type(error).__name__}: {error}") from None
    if isinstance(key, rsa.RSAPrivateKey):
        return key
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name in _EC_ALGORITHMS:
        return key
    raise ConfigError(f"{key_file}: the registry accepts RSA or EC P-256/P-384/P-521 keys, not {type(key).__name__}")


def generate_key_pair(key_file: Path, cert_file: Path, *, key_type: str = "rsa", common_name: str = "georeg") -> str:
    """Write a new private key and a self-signed certificate for the registries' `rootcertbundle`.

    This is the one key pair every node shares (GitLab's gitlab-registry.key). Returns its key ID.
    The key file is created readable by its owner only.
    """
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    private_key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if key_type == "rsa":
        private_key = rsa.generate_private_key(public_exponent=65537, key_size=4096)
    else:
        private_key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=3650))
        .sign(private_key, hashes.SHA256())
    )
    pem = private_key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key_file.touch(mode=0o600, exist_ok=False)
    key_file.write_bytes(pem)
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    return libtrust_key_id(private_key.public_key())


def _warn_if_exposed(key_file: Path) -> None:
    """Anyone who can read this key can mint tokens for every registry that trusts it."""
    try:
        mode = key_file.stat().st_mode
    except OSError:
        return  # the load that follows reports the real problem
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        logger.warning(
            "%s is readable by other users (mode %s): anyone who can read it can mint registry tokens; "
            "run chmod 600 %s",
            key_file,
            oct(stat.S_IMODE(mode)),
            key_file,
        )
