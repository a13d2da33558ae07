"""Image references (`repo:tag`, `repo@sha256:...`) validated against the distribution grammar.

Every repository name and digest that reaches a URL or a storage path passes through here first,
so a hostile webhook body or CLI argument cannot smuggle `..` or `%2F` into a request.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from georeg.errors import InvalidReference

# From distribution/reference/regexp.go: path components separated by '/', 255 characters at most.
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]*)[a-z0-9]+)*"
_REPOSITORY = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_TAG = re.compile(r"[\w][\w.-]{0,127}")
_DIGEST = re.compile(r"sha256:[a-f0-9]{64}|sha512:[a-f0-9]{128}")
MAX_REPOSITORY_LENGTH = 255


def validate_repository(name: str) -> str:
    if len(name) > MAX_REPOSITORY_LENGTH or not _REPOSITORY.fullmatch(name):
        raise InvalidReference(f"invalid repository name {name!r}: use lowercase path components such as 'group/app'")
    return name


def validate_tag(tag: str) -> str:
    if not _TAG.fullmatch(tag):
        raise InvalidReference(f"invalid tag {tag!r}: up to 128 of [A-Za-z0-9_.-], not starting with '.' or '-'")
    return tag


def validate_digest(digest: str) -> str:
    if not _DIGEST.fullmatch(digest):
        raise InvalidReference(f"invalid digest {digest!r}: expected 'sha256:' followed by 64 hex digits")
    return digest


def is_digest(reference: str) -> bool:
    return bool(_DIGEST.fullmatch(reference))


def validate_reference(reference: str) -> str:
    """A manifest reference is either a tag or a digest."""
    return validate_digest(reference) if ":" in reference else validate_tag(reference)


@dataclass(frozen=True)
class ImageReference:
    """A repository plus a tag or a digest, e.g. `group/app:1.0` or `group/app@sha256:...`."""

    repository: str
    reference: str

    @property
    def is_digest(self) -> bool:
        return is_digest(self.reference)

    def __str__(self) -> str:
        separator = "@" if self.is_digest else ":"
        return f"{self.repository}{separator}{self.reference}"

    @classmethod
    def parse(cls, text: str, *, default_tag: str | None = "latest") -> ImageReference:
        """Parse `REPO`, `REPO:TAG` or `REPO@DIGEST`; a bare REPO means `default_tag`."""
        if "@" in text:
            repository, digest = text.split("@", 1)
            return cls(validate_repository(repository), validate_digest(digest))
        repository, _, tag = text.rpartition(":")
        if not repository or "/" in tag:
            if default_tag is None:
                raise InvalidReference(f"{text!r} names no tag or digest: use REPO:TAG or REPO@DIGEST")
            repository, tag = text, default_tag
        return cls(validate_repository(repository), validate_tag(tag))
