"""What every storage adapter must do, run against each backend's emulator (or stand-in for OSS)."""

from __future__ import annotations

from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from georeg.errors import ConfigError
from georeg.storage_adapters import StorageError, blob_size, has_manifest_revision, tag_digest
from tests.storage_adapters.backends import (
    Backend,
    blob_path,
    revision_link_path,
    sha256,
    tag_index_link_path,
    tag_link_path,
    write_image,
)

ABSENT = sha256(b"never written")


def test_blob_size_is_the_size_written_and_none_when_absent(backend: Backend, root: str) -> None:
    image = write_image(backend, root, "group/app", "v1", layer_size=3001)
    adapter = backend.build(backend.params(root))

    assert blob_size(adapter, image.layer_digest) == 3001
    assert blob_size(adapter, image.manifest_digest) == len(image.manifest)
    assert blob_size(adapter, ABSENT) is None


def test_connect_ahead_then_read_from_many_threads(backend: Backend, root: str) -> None:
    image = write_image(backend, root, "group/app", "v1", layer_size=1500)
    adapter = backend.build(backend.params(root))

    with ThreadPoolExecutor(max_workers=4) as threads:
        threads.submit(adapter.connect).result()  # as a backfill warms it up, off the event loop
        threads.submit(adapter.connect).result()  # a second time changes nothing
        sizes = list(threads.map(lambda digest: blob_size(adapter, digest), [image.layer_digest, ABSENT] * 4))

    assert sizes == [1500, None] * 4


def test_listing_gives_every_object_under_a_directory_with_its_size_across_pages(backend: Backend, root: str) -> None:
    image = write_image(backend, root, "group/app", "v1", layer_size=2500)
    write_image(backend, root, "group/app2", "v1")  # its name starts like group/app's: not listed with it
    adapter = backend.build(backend.params(root))
    adapter.list_page = 2  # type: ignore[attr-defined]  # pages of two objects: paging is exercised

    repository = dict(adapter.list_objects("docker/registry/v2/repositories/group/app"))
    blobs = dict(adapter.list_objects("docker/registry/v2/blobs/"))

    assert repository == {
        revision_link_path("group/app", image.manifest_digest): len(image.manifest_digest),
        tag_link_path("group/app", "v1"): len(image.manifest_digest),
        tag_index_link_path("group/app", "v1", image.manifest_digest): len(image.manifest_digest),
    }
    assert blobs[blob_path(image.layer_digest)] == 2500
    assert blobs[blob_path(image.manifest_digest)] == len(image.manifest)
    assert len(blobs) == 4  # both images' layer and manifest
    assert list(adapter.list_objects("docker/registry/v2/absent/")) == []
    elsewhere = backend.build(backend.params(root + "-elsewhere"))
    assert list(elsewhere.list_objects("docker/registry/v2/blobs/")) == []


def test_tag_digest_and_manifest_revision(backend: Backend, root: str) -> None:
    image = write_image(backend, root, "group/app", "v1")
    adapter = backend.build(backend.params(root))

    assert tag_digest(adapter, "group/app", "v1") == image.manifest_digest
    assert tag_digest(adapter, "group/app", "v2") is None
    assert tag_digest(adapter, "group/other", "v1") is None
    assert has_manifest_revision(adapter, "group/app", image.manifest_digest)
    assert not has_manifest_revision(adapter, "group/app", ABSENT)
    assert not has_manifest_revision(adapter, "group/other", image.manifest_digest)


def test_every_spelling_of_the_root_reads_the_same_objects(backend: Backend, root: str) -> None:
    image = write_image(backend, root, "app", "latest")
    adapters = [backend.build(backend.params(spelling)) for spelling in backend.root_spellings(root)]

    assert {adapter.location() for adapter in adapters} == {adapters[0].location()}
    for adapter in adapters:
        assert blob_size(adapter, image.layer_digest) == len(image.layer)
        assert tag_digest(adapter, "app", "latest") == image.manifest_digest


def test_another_root_does_not_see_the_objects(backend: Backend, root: str) -> None:
    image = write_image(backend, root, "app", "latest")
    elsewhere = backend.build(backend.params(root + "-elsewhere"))

    assert blob_size(elsewhere, image.layer_digest) is None
    assert tag_digest(elsewhere, "app", "latest") is None


def test_the_same_config_gives_equal_locations(backend: Backend, root: str) -> None:
    first, second = backend.build(backend.params(root)), backend.build(backend.params(root))

    assert first.location() == second.location()
    assert first.location().backend == backend.name


@pytest.mark.parametrize("difference", ["endpoint", "bucket", "root"])
def test_a_different_endpoint_bucket_or_root_gives_a_different_location(
    backend: Backend, root: str, difference: str
) -> None:
    if difference not in backend.variants:
        pytest.skip(f"{backend.name} storage has no {difference}")
    env = {"STORAGE_EMULATOR_HOST": "http://127.0.0.1:1"} if backend.name == "gcs" and difference == "endpoint" else {}
    same = backend.build(backend.params(root)).location()
    other = backend.build({**backend.params(root), **backend.variants[difference]}, env=env).location()

    assert same != other
    changed = {"endpoint": "endpoint", "bucket": "bucket", "root": "root"}[difference]
    assert getattr(same, changed) != getattr(other, changed)
    for field in {"backend", "endpoint", "bucket", "root"} - {changed}:
        assert getattr(same, field) == getattr(other, field)


def secret_texts(value: Any) -> list[str]:
    """What must never show of a secret parameter: its value, or of a service-account key (a mapping
    with public fields too) the key's id and each line of its private key."""
    if isinstance(value, Mapping):
        return [value["private_key_id"], *value["private_key"].strip().splitlines()[1:-1]]
    return [str(value)]


def test_secrets_never_appear_in_repr_or_str(backend: Backend, root: str) -> None:
    params = {**backend.params(root), **backend.unchecked_secrets}
    secrets = [text for name in [*backend.secrets, *backend.unchecked_secrets] for text in secret_texts(params[name])]
    if not secrets:
        pytest.skip(f"{backend.name} storage takes no secret")
    adapter = backend.build(params)
    adapter.object_size("docker/registry/v2/probe")  # after use, with clients made
    shown = " ".join([repr(adapter), str(adapter), repr(adapter.location()), str(adapter.location())])

    for secret in secrets:
        assert secret not in shown


def test_a_missing_required_parameter_is_named(backend: Backend, root: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if not backend.required:
        pytest.skip(f"{backend.name} requires no parameter")
    for name in backend.required:
        monkeypatch.delenv(f"REGISTRY_STORAGE_{backend.name}_{name}".upper(), raising=False)
        params = {key: value for key, value in backend.params(root).items() if key != name}
        with pytest.raises(ConfigError, match=rf"storage\.{backend.name}\.{name}: required"):
            backend.build(params)


def test_a_bad_value_or_unknown_parameter_is_named(backend: Backend, root: str) -> None:
    [(name, value)] = backend.bad_values.items()
    with pytest.raises(ConfigError, match=rf"storage\.{backend.name}\.{name}"):
        backend.build({**backend.params(root), name: value})
    with pytest.raises(ConfigError, match=rf"storage\.{backend.name}: unknown parameter\(s\) bukcet"):
        backend.build({**backend.params(root), "bukcet": "typo"})


@pytest.mark.parametrize("style", ["registry-env", "reference"])
def test_a_parameter_can_come_from_the_environment(
    backend: Backend, root: str, style: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """REGISTRY_STORAGE_<DRIVER>_<PARAM> as the registry reads it, or "${NAME}" naming any variable."""
    image = write_image(backend, root, "app", "env")
    params = backend.params(root)
    value = str(params.pop(backend.env_param))
    if style == "registry-env":
        monkeypatch.setenv(f"REGISTRY_STORAGE_{backend.name}_{backend.env_param}".upper(), value)
    else:
        monkeypatch.setenv("GEOREG_TEST_STORAGE_VALUE", value)
        params[backend.env_param] = "${GEOREG_TEST_STORAGE_VALUE}"
    adapter = backend.build(params)

    assert tag_digest(adapter, "app", "env") == image.manifest_digest
    if backend.env_param in backend.secrets:
        assert value not in repr(adapter)


def test_an_unset_reference_is_named(backend: Backend, root: str) -> None:
    params = {**backend.params(root), backend.env_param: "${GEOREG_TEST_SURELY_UNSET}"}
    with pytest.raises(ConfigError, match=rf"storage\.{backend.name}\.{backend.env_param}: .*GEOREG_TEST_SURELY_UNSET"):
        backend.build(params)


def test_wrong_credentials_fail_without_showing_them(backend: Backend, root: str) -> None:
    secret = backend.credential_param
    if secret is None:
        pytest.skip(f"the {backend.name} test service checks no credentials")
    wrong = "V3JvbmdTZWNyZXRXcm9uZ1NlY3JldA=="  # base64, as an Azure account key must be
    adapter = backend.build({**backend.params(root), secret: wrong})

    with pytest.raises(StorageError) as failure:
        adapter.object_size("docker/registry/v2/probe")
    assert wrong not in str(failure.value)
    assert "401" in str(failure.value) or "403" in str(failure.value)
    assert not failure.value.transient
