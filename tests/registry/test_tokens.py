"""Token minting: key IDs, claims and signatures checked independently, and a real registry accepting them."""

from __future__ import annotations

import base64
from pathlib import Path

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

from georeg.config import JwtAuth, RegistryConfig, ReplicationConfig
from georeg.errors import ConfigError, Unauthorized
from georeg.registry.auth import PULL_PUSH_DELETE, build_auth
from georeg.registry.client import RegistryClient
from georeg.registry.manifests import Manifest
from georeg.registry.tokens import TokenMinter, libtrust_key_id
from tests.support.images import Pusher, build_image
from tests.support.registry import RegistryProcess, TokenAuthSetup, make_token_auth_setup
from tests.support.tokens import libtrust_key_id as reference_key_id

ACCESS = [{"type": "repository", "name": "group/app", "actions": ["pull"]}]


def write_key(path: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> Path:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return path


def minter(key_file: Path, ttl: int = 300) -> TokenMinter:
    return TokenMinter(key_file, issuer="gitlab-issuer", service="container_registry", subject="geo", ttl_seconds=ttl)


@pytest.mark.parametrize(
    "key",
    [
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP384R1()),
    ],
    ids=["rsa", "p256", "p384"],
)
def test_libtrust_key_id_matches_reference(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> None:
    kid = libtrust_key_id(key.public_key())
    assert kid == reference_key_id(key.public_key())
    assert len(kid) == 59 and all(len(group) == 4 for group in kid.split(":")) and kid.count(":") == 11


def test_libtrust_key_id_of_registry_certificate(tmp_path: Path) -> None:
    """The id of the key equals the id of the public key inside the certificate the registry trusts."""
    from cryptography import x509

    setup = make_token_auth_setup(tmp_path)
    certificate = x509.load_pem_x509_certificate(setup.cert_path.read_bytes())
    assert minter(setup.key_path).key_id == libtrust_key_id(certificate.public_key())  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("key", "algorithm", "signature_bytes"),
    [
        (rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256", 256),
        (ec.generate_private_key(ec.SECP256R1()), "ES256", 64),  # raw r||s, not DER
        (ec.generate_private_key(ec.SECP384R1()), "ES384", 96),
    ],
    ids=["rsa", "p256", "p384"],
)
def test_minted_claims_and_signature(
    tmp_path: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, algorithm: str, signature_bytes: int
) -> None:
    token_minter = minter(write_key(tmp_path / "signer.key", key), ttl=120)
    assert token_minter.algorithm == algorithm
    minted = token_minter.mint(ACCESS, now=1_700_000_000.7)

    header = jwt.get_unverified_header(minted.token)
    assert header["alg"] == algorithm
    assert header["kid"] == reference_key_id(key.public_key())
    claims = jwt.decode(minted.token, options={"verify_signature": False})
    assert claims["iss"] == "gitlab-issuer" and claims["sub"] == "geo"
    assert claims["aud"] == "container_registry"  # a plain string: the registry rejects a list
    assert claims["iat"] == 1_700_000_000
    assert claims["exp"] - claims["iat"] == 120 and minted.expires_at == claims["exp"]
    assert claims["nbf"] <= claims["iat"]
    assert claims["access"] == ACCESS
    signature = minted.token.rsplit(".", 1)[1]
    assert len(base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))) == signature_bytes

    fresh = token_minter.mint(ACCESS)
    verified = jwt.decode(
        fresh.token, key.public_key(), algorithms=[algorithm], audience="container_registry", issuer="gitlab-issuer"
    )
    assert verified["access"] == ACCESS
    if isinstance(key, rsa.RSAPrivateKey):
        other: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey = rsa.generate_private_key(65537, 2048)
    else:
        other = ec.generate_private_key(key.curve)
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(fresh.token, other.public_key(), algorithms=[algorithm], audience="container_registry")


def test_jti_is_unique_per_mint(tmp_path: Path) -> None:
    token_minter = minter(write_key(tmp_path / "k", ec.generate_private_key(ec.SECP256R1())))
    tokens = [token_minter.mint(ACCESS, now=1_700_000_000) for _ in range(20)]
    ids = {jwt.decode(t.token, options={"verify_signature": False})["jti"] for t in tokens}
    assert len(ids) == 20 and len({t.token for t in tokens}) == 20


def test_minted_token_is_valid_now(tmp_path: Path) -> None:
    key = rsa.generate_private_key(65537, 2048)
    minted = minter(write_key(tmp_path / "k", key), ttl=10).mint(ACCESS)
    # pyjwt checks exp and nbf against the clock with no leeway: the token is usable at once
    jwt.decode(minted.token, key.public_key(), algorithms=["RS256"], audience="container_registry")


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not a pem file", "ValueError"),
        (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "ValueError"),
    ],
)
def test_unreadable_key_is_a_config_error(tmp_path: Path, content: bytes, reason: str) -> None:
    key_file = tmp_path / "gitlab-registry.key"
    key_file.write_bytes(content)
    with pytest.raises(ConfigError, match=reason) as caught:
        minter(key_file)
    assert str(key_file) in str(caught.value)


def test_missing_key_is_a_config_error(tmp_path: Path) -> None:
    key_file = tmp_path / "absent.key"
    with pytest.raises(ConfigError, match="FileNotFoundError") as caught:
        minter(key_file)
    assert str(key_file) in str(caught.value)


@pytest.mark.parametrize(
    "key",
    [ed25519.Ed25519PrivateKey.generate(), ec.generate_private_key(ec.SECP256K1())],
    ids=["ed25519", "secp256k1"],
)
def test_key_type_the_registry_cannot_verify_is_a_config_error(tmp_path: Path, key: object) -> None:
    key_file = write_key(tmp_path / "odd.key", key)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="RSA or EC") as caught:
        minter(key_file)
    assert str(key_file) in str(caught.value)


def test_build_auth_surfaces_key_errors(tmp_path: Path) -> None:
    key_file = tmp_path / "broken.key"
    key_file.write_text("garbage")
    config = JwtAuth(type="jwt", key_file=key_file, issuer="i", service="s")
    with pytest.raises(ConfigError, match=r"broken\.key"):
        build_auth(config, PULL_PUSH_DELETE)


def jwt_client(url: str, setup: TokenAuthSetup, key_file: Path | None = None) -> RegistryClient:
    auth = JwtAuth(type="jwt", key_file=key_file or setup.key_path, issuer=setup.issuer, service=setup.service)
    return RegistryClient(
        "secondary", RegistryConfig(url=url, auth=auth), ReplicationConfig(), allowed_actions=PULL_PUSH_DELETE
    )


async def test_real_registry_accepts_ec_signed_tokens(tmp_path: Path, repo_name: str) -> None:
    setup = make_token_auth_setup(tmp_path / "keys", key_type="ec")
    image = build_image("oci")
    with RegistryProcess(tmp_path / "registry", token_auth=setup) as registry:
        async with jwt_client(registry.url, setup) as client:
            assert client._http.auth.minter.algorithm == "ES256"  # type: ignore[union-attr]
            await client.ping()
            for blob in image.blobs:
                location = await client.start_upload(repo_name)
                assert location is not None
                await client.complete_upload(location, blob.digest, blob.data)
            assert await client.put_manifest(repo_name, "v1", Manifest(image.manifest, image.media_type)) == (
                image.digest
            )
            assert (await client.get_manifest(repo_name, "v1")).content == image.manifest
        with Pusher(registry.url, setup) as pusher:  # an independent reader sees the push
            assert pusher.head_manifest(repo_name, "v1") == image.digest

        # and a key the registry does not trust is refused by the same registry
        untrusted = make_token_auth_setup(tmp_path / "other-keys", key_type="ec")
        async with jwt_client(registry.url, setup, key_file=untrusted.key_path) as client:
            with pytest.raises(Unauthorized):
                await client.head_manifest(repo_name, "v1")


def test_a_key_readable_by_others_is_warned_about_without_its_content(tmp_path: Path, caplog) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    path = write_key(tmp_path / "registry.key", key)
    path.chmod(0o644)
    with caplog.at_level("WARNING", logger="georeg.registry"):
        minter(path)
    assert "readable by other users (mode 0o644)" in caplog.text and "chmod 600" in caplog.text
    assert "PRIVATE KEY" not in caplog.text

    caplog.clear()
    path.chmod(0o600)
    with caplog.at_level("WARNING", logger="georeg.registry"):
        minter(path)
    assert caplog.text == ""
