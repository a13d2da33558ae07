"""Image references: the distribution grammar keeps hostile names out of URLs and storage paths."""

from __future__ import annotations

import pytest

from georeg.errors import InvalidReference
from georeg.references import ImageReference, validate_digest, validate_repository

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "repository", "reference"),
    [
        ("app", "app", "latest"),
        ("group/app:1.0", "group/app", "1.0"),
        ("group/sub/app_x.y-z:v1.2-rc.1", "group/sub/app_x.y-z", "v1.2-rc.1"),
        (f"group/app@{DIGEST}", "group/app", DIGEST),
        ("app:sha256-" + "b" * 64 + ".sig", "app", "sha256-" + "b" * 64 + ".sig"),
    ],
)
def test_valid_references_parse(text, repository, reference):
    parsed = ImageReference.parse(text)
    assert (parsed.repository, parsed.reference) == (repository, reference)
    assert str(parsed) == (text if ":" in text or "@" in text else f"{text}:latest")


@pytest.mark.parametrize(
    "text",
    ["Group/app", "group//app", "../etc:x", "group/app:", "group/app:.hidden", "app@sha256:short", "a%2Fb:1", "-app:1"],
)
def test_invalid_references_are_refused_with_the_rule(text):
    with pytest.raises(InvalidReference, match="invalid"):
        ImageReference.parse(text)


def test_a_reference_without_tag_is_refused_when_one_is_required():
    with pytest.raises(InvalidReference, match="names no tag or digest"):
        ImageReference.parse("group/app", default_tag=None)


def test_names_longer_than_255_characters_are_refused():
    with pytest.raises(InvalidReference):
        validate_repository("a" * 256)
    assert validate_repository("a" * 255)


def test_digests_must_be_sha256_or_sha512_hex():
    assert validate_digest(DIGEST) == DIGEST
    with pytest.raises(InvalidReference, match="expected 'sha256:'"):
        validate_digest("md5:" + "a" * 32)
