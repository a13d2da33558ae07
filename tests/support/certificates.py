"""Self-signed certificates for tests: a registry's TLS server certificate, a token signer's certificate.

georeg's own `generate_key_pair` (georeg.registry.tokens) makes the token signer's pair for operators,
but with a 4096-bit RSA key (about 2 s of CPU to make, here) and no subjectAltName, so no TLS server
could use it; the tests make theirs here.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID


def write_self_signed(
    cert_path: Path,
    key_path: Path,
    *,
    common_name: str,
    key_type: Literal["rsa", "ec"] = "ec",
    server_ip: str | None = None,
    valid_days: int = 1,
) -> None:
    """Write a new private key (PEM, PKCS#8) and a certificate for it, signed by itself.

    With `server_ip` the certificate names that address as its subjectAltName (what clients check, not
    the common name) and is marked as a CA, so a client can take it as its own trust anchor (ca_file).
    """
    key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if key_type == "rsa":
        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    elif key_type == "ec":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        raise ValueError(f"unknown key_type {key_type!r}; use 'rsa' or 'ec'")
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))  # slack for clocks read a moment apart
        .not_valid_after(now + datetime.timedelta(days=valid_days))
    )
    if server_ip is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(server_ip))]), critical=False
        ).add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    certificate = builder.sign(key, hashes.SHA256())
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
