"""Mint registry bearer tokens independently of georeg, so tests do not trust the code under test."""

from __future__ import annotations

import base64
import hashlib
import time
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes

from .registry import TokenAuthSetup


def libtrust_key_id(public_key: PublicKeyTypes) -> str:
    """The `kid` the registry matches against its rootcertbundle (docker/libtrust format)."""
    der = public_key.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    encoded = base64.b32encode(hashlib.sha256(der).digest()[:30]).decode("ascii").rstrip("=")
    return ":".join(encoded[i : i + 4] for i in range(0, len(encoded), 4))


def repository_access(name: str, actions: list[str]) -> dict[str, Any]:
    """One entry of the token's `access` claim for a repository."""
    return {"type": "repository", "name": name, "actions": list(actions)}


def mint_token(setup: TokenAuthSetup, access: list[dict[str, Any]], ttl: int = 300, subject: str = "test") -> str:
    """Sign a token the way GitLab does: kid = libtrust id, aud a plain string, nbf 5 s in the past."""
    key = serialization.load_pem_private_key(setup.key_path.read_bytes(), password=None)
    if isinstance(key, rsa.RSAPrivateKey):
        algorithm = "RS256"
    elif isinstance(key, ec.EllipticCurvePrivateKey):
        algorithm = "ES256"
    else:
        raise TypeError(f"unsupported key type {type(key).__name__}")
    now = int(time.time())
    claims = {
        "iss": setup.issuer,
        "aud": setup.service,
        "sub": subject,
        "iat": now,
        "nbf": now - 5,
        "exp": now + ttl,
        "jti": uuid.uuid4().hex,
        "access": access,
    }
    headers = {"kid": libtrust_key_id(key.public_key()), "typ": "JWT"}
    return jwt.encode(claims, key, algorithm=algorithm, headers=headers)
