"""Write a primary straight into a registry's filesystem storage, in distribution's own layout.

Pushing 100,000 images through the API takes hours; writing the files a push would leave takes
minutes, and a real `docker-registry` started on the directory then serves them like any other.
Under `<root>/docker/registry/v2/`:

    blobs/sha256/<hex[0:2]>/<hex>/data                         every blob, manifests included
    repositories/<name>/_layers/sha256/<hex>/link              a config or layer linked in <name>
    repositories/<name>/_manifests/revisions/sha256/<hex>/link a manifest of <name>
    repositories/<name>/_manifests/tags/<tag>/current/link     what <tag> points at
    repositories/<name>/_manifests/tags/<tag>/index/sha256/<hex>/link   every digest <tag> has pointed at

each link holding `sha256:<hex>`, no newline. The content is deterministic from a seed: the same
shape and seed give the same digests. The shape is a real primary's: each tag its own small image
(layers are real gzipped tars of a few hundred bytes), a base layer shared across repositories,
dependency layers shared by runs of tags within a repository, Docker and OCI repositories, some
multi-arch indexes, nested names, and a few wide repositories of many tags.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import shutil
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.support.images import (
    DOCKER_CONFIG,
    DOCKER_LAYER,
    DOCKER_MANIFEST,
    OCI_CONFIG,
    OCI_LAYER,
    OCI_MANIFEST,
    Blob,
    Image,
    build_index,
)

CREATED = "2026-01-01T00:00:00Z"  # fixed, so a config's digest depends on the seed alone
ARCHITECTURES = ("amd64", "arm64")  # the platforms of a multi-arch index
_MEDIA_TYPES = {
    "docker": (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LAYER),
    "oci": (OCI_MANIFEST, OCI_CONFIG, OCI_LAYER),
}
Listing = dict[str, dict[str, str]]  # repository -> tag -> manifest digest


@dataclass(frozen=True)
class Shape:
    """What to write: `repositories` of `tags` tags each, the first `wide_repositories` of them with
    `wide_tags` tags instead. Every `index_every`-th image is a multi-arch index (0: none); each
    repository builds on one of `bases` base layers; `deps_every` tags in a row share a dependency layer."""

    repositories: int
    tags: int
    wide_repositories: int = 0
    wide_tags: int = 0
    index_every: int = 20
    bases: int = 4
    deps_every: int = 5
    seed: int = 0

    def __post_init__(self) -> None:
        if self.repositories < 1 or self.tags < 1 or self.bases < 1 or self.deps_every < 1:
            raise ValueError(f"repositories, tags, bases and deps_every must be at least 1: {self}")
        if not 0 <= self.wide_repositories <= self.repositories or self.index_every < 0:
            raise ValueError(f"wide_repositories must be 0..repositories and index_every 0 or more: {self}")
        if self.wide_repositories and self.wide_tags < 1:
            raise ValueError(f"wide repositories need wide_tags of at least 1: {self}")

    @property
    def total_tags(self) -> int:
        return (self.repositories - self.wide_repositories) * self.tags + self.wide_repositories * self.wide_tags


def repository_name(number: int, wide: bool = False) -> str:
    """Flat, two-level and three-level names, as a GitLab primary has them (groups, subgroups)."""
    if wide:
        return f"monorepo/app{number}"
    return (
        f"app{number}",
        f"team{number % 7}/app{number}",
        f"group{number % 5}/sub{number % 3}/app{number}",
    )[number % 3]


def tag_name(number: int) -> str:
    return f"1.{number // 100}.{number % 100}"


@dataclass
class Layout:
    """What a registry root holds: repository -> tag -> digest, the indexes first written among them,
    and what writing it cost."""

    root: Path
    tags: Listing = field(default_factory=dict)
    indexes: int = 0
    blobs: int = 0
    blob_bytes: int = 0
    files: int = 0

    @property
    def tag_count(self) -> int:
        return sum(len(tags) for tags in self.tags.values())


@dataclass(frozen=True)
class Changes:
    """Tags a `mutate` moved to a new image, added, and deleted, as (repository, tag)."""

    moved: list[tuple[str, str]]
    added: list[tuple[str, str]]
    deleted: list[tuple[str, str]]

    def __len__(self) -> int:
        return len(self.moved) + len(self.added) + len(self.deleted)


class LayoutWriter:
    """Writes blobs, manifests and tags into one registry root, as a push through the API would."""

    def __init__(self, root: Path) -> None:
        self.layout = Layout(root)
        self._v2 = root / "docker" / "registry" / "v2"
        self._written: set[str] = set()  # blob digests whose data is already on disk
        self._directories: set[str] = set()  # directories this writer made
        self._linked: set[tuple[str, str]] = set()  # (repository, blob digest) this writer linked

    def put_blob(self, repository: str, blob: Blob) -> None:
        self._write_blob_data(blob)
        if (repository, blob.digest) not in self._linked:  # shared layers come again with every tag
            self._link(self._repository(repository) / "_layers" / "sha256" / _hex(blob.digest) / "link", blob.digest)
            self._linked.add((repository, blob.digest))

    def put_image(self, repository: str, image: Image, tag: str | None = None) -> None:
        """Blobs, children, the manifest as a revision, then the tag: the order of a push."""
        for blob in image.blobs:
            self.put_blob(repository, blob)
        for child in image.children:
            self.put_image(repository, child)
        manifest = Blob(sha256_of(image.manifest), image.manifest, image.media_type)
        self._write_blob_data(manifest)
        revisions = self._repository(repository) / "_manifests" / "revisions" / "sha256"
        self._link(revisions / _hex(manifest.digest) / "link", manifest.digest)
        if tag is not None:
            tag_directory = self._repository(repository) / "_manifests" / "tags" / tag
            self._link(tag_directory / "index" / "sha256" / _hex(manifest.digest) / "link", manifest.digest)
            self._link(tag_directory / "current" / "link", manifest.digest)
            self.layout.tags.setdefault(repository, {})[tag] = manifest.digest

    def delete_tag(self, repository: str, tag: str) -> None:
        """What distribution's tag deletion does: the tag goes, its manifests and blobs stay."""
        shutil.rmtree(self._repository(repository) / "_manifests" / "tags" / tag)
        del self.layout.tags[repository][tag]

    def _write_blob_data(self, blob: Blob) -> None:
        if blob.digest in self._written:
            return
        hex_digest = _hex(blob.digest)
        data = self._v2 / "blobs" / "sha256" / hex_digest[:2] / hex_digest / "data"
        if not data.exists():
            self._write(data, blob.data)
            self.layout.blobs += 1
            self.layout.blob_bytes += blob.size
        self._written.add(blob.digest)

    def _repository(self, name: str) -> Path:
        return self._v2 / "repositories" / name

    def _link(self, path: Path, digest: str) -> None:
        self._write(path, digest.encode())

    def _write(self, path: Path, data: bytes) -> None:
        """Write one file. A file that exists is replaced through a temporary name and a rename, so a
        registry serving the root never reads a half-written link (a moved tag's `current/link`)."""
        self._make_directories(str(path.parent))
        target = str(path)
        if os.path.exists(target):
            temporary = f"{target}.tmp"
            with open(temporary, "wb") as file:
                file.write(data)
            os.replace(temporary, target)
        else:
            with open(target, "wb") as file:
                file.write(data)
        self.layout.files += 1

    def _make_directories(self, directory: str) -> None:
        # One mkdir per new directory, remembered: a million small files make syscalls the cost.
        missing = []
        while directory not in self._directories and not os.path.isdir(directory):
            missing.append(directory)
            directory = os.path.dirname(directory)
        for new in reversed(missing):
            os.mkdir(new)
            self._directories.add(new)


def sha256_of(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _hex(digest: str) -> str:
    algorithm, _, hex_digest = digest.partition(":")
    if algorithm != "sha256" or len(hex_digest) != 64:
        raise ValueError(f"not a sha256 digest: {digest!r}")
    return hex_digest


# --- the images ------------------------------------------------------------------------------------


class ImageFactory:
    """Deterministic images: every piece of content is drawn from a generator seeded by the shape's
    seed and the piece's own name, so it does not depend on what was made before it."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._layers: dict[str, tuple[bytes, str]] = {}  # name -> (gzipped tar, diff_id), for shared layers

    def layer(self, name: str, shared: bool = False) -> tuple[bytes, str]:
        """A gzipped tar of one small file: its bytes and its diff_id (the digest of the tar)."""
        if name in self._layers:
            return self._layers[name]
        rng = random.Random(f"{self.seed}:layer:{name}")
        content = rng.randbytes(rng.randint(64, 320))
        archive = io.BytesIO()
        with tarfile.open(fileobj=archive, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            member = tarfile.TarInfo(f"georeg/{name.replace('/', '_')}")
            member.size, member.mtime, member.mode = len(content), 0, 0o644
            tar.addfile(member, io.BytesIO(content))
        tar_bytes = archive.getvalue()
        made = (gzip.compress(tar_bytes, compresslevel=6, mtime=0), sha256_of(tar_bytes))
        if shared:
            self._layers[name] = made
        return made

    def image(self, kind: str, layers: list[str], shared: int, labels: dict[str, str], architecture: str) -> Image:
        """A single-platform image of `layers` (the first `shared` of them reused elsewhere) and a config
        whose labels make it this image's own."""
        manifest_type, config_type, layer_type = _MEDIA_TYPES[kind]
        made = [self.layer(name, shared=index < shared) for index, name in enumerate(layers)]
        blobs = [Blob.of(data, layer_type) for data, _ in made]
        config_body = {
            "architecture": architecture,
            "os": "linux",
            "created": CREATED,
            "config": {"Env": ["PATH=/usr/local/bin:/usr/bin:/bin"], "Labels": labels},
            "rootfs": {"type": "layers", "diff_ids": [diff_id for _, diff_id in made]},
            "history": [{"created": CREATED, "created_by": f"ADD {name}"} for name in layers],
        }
        config = Blob.of(json.dumps(config_body, sort_keys=True).encode(), config_type)
        body = {
            "schemaVersion": 2,
            "mediaType": manifest_type,
            "config": config.descriptor(),
            "layers": [blob.descriptor() for blob in blobs],
        }
        return Image(json.dumps(body, indent=3).encode(), manifest_type, [config, *blobs])

    def tagged(self, shape: Shape, repository: int, tag: int, generation: int = 0) -> Image:
        """The image of tag number `tag` in repository number `repository` (a later `generation` is the
        same tag pushed again with new content): base, the run's dependency layer, its own app layer."""
        kind = "oci" if repository % 2 else "docker"
        base, deps = f"base{repository % shape.bases}", f"r{repository}/deps{tag // shape.deps_every}"
        labels = {"org.opencontainers.image.version": tag_name(tag), "georeg.scale.generation": str(generation)}
        labels["org.opencontainers.image.title"] = f"app{repository}"
        own = f"r{repository}/t{tag}/g{generation}"
        if not (shape.index_every and (repository * 7 + tag) % shape.index_every == 0):
            return self.image(kind, [base, deps, own], 2, labels, "amd64")
        children = [
            self.image(kind, [f"{base}-{arch}", f"{deps}-{arch}", f"{own}-{arch}"], 2, labels, arch)
            for arch in ARCHITECTURES
        ]
        return build_index(children, kind=kind)


# --- whole primaries -------------------------------------------------------------------------------


def write_primary(root: Path, shape: Shape) -> Layout:
    """Write `shape` into an empty registry root; returns what was written."""
    writer, factory = LayoutWriter(root), ImageFactory(shape.seed)
    for number in range(shape.repositories):
        wide = number < shape.wide_repositories
        name = repository_name(number, wide)
        for tag in range(shape.wide_tags if wide else shape.tags):
            image = factory.tagged(shape, number, tag)
            writer.put_image(name, image, tag_name(tag))
            writer.layout.indexes += bool(image.children)
    return writer.layout


def mutate(layout: Layout, shape: Shape, fraction: float, seed: int = 1) -> Changes:
    """Change `fraction` of the tags of a written primary, a third each moved to a new image, added
    and deleted (at least one of each); no repository loses its last tag."""
    rng = random.Random(f"{shape.seed}:mutate:{seed}")
    numbers = {repository_name(n, n < shape.wide_repositories): n for n in range(shape.repositories)}
    candidates = sorted((name, tag) for name, tags in layout.tags.items() for tag in tags)
    each = max(1, round(len(candidates) * fraction / 3))
    chosen = rng.sample(candidates, min(len(candidates), 2 * each))
    moved, deleted = chosen[:each], []
    for name, tag in chosen[each:]:
        if len(layout.tags[name]) > 1:
            deleted.append((name, tag))
    writer, factory = LayoutWriter(layout.root), ImageFactory(shape.seed)
    writer.layout = layout
    for name, tag in moved:
        number = numbers[name]
        writer.put_image(name, factory.tagged(shape, number, _tag_number(tag), generation=seed), tag)
    for name, tag in deleted:
        writer.delete_tag(name, tag)
    added = []
    for name in rng.sample(sorted(layout.tags), min(len(layout.tags), each)):
        number, tag = numbers[name], 9000 + seed  # tag numbers no generated repository reaches
        writer.put_image(name, factory.tagged(shape, number, tag, generation=seed), tag_name(tag))
        added.append((name, tag_name(tag)))
    return Changes(moved, added, deleted)


def _tag_number(tag: str) -> int:
    _, hundreds, units = tag.split(".")
    return int(hundreds) * 100 + int(units)


def read_tags(root: Path) -> Listing:
    """repository -> tag -> digest, read back from a registry root (one the registry wrote, or this module)."""
    repositories = root / "docker" / "registry" / "v2" / "repositories"
    found: Listing = {}
    for directory, subdirectories, _ in os.walk(repositories):
        if "_manifests" in subdirectories:
            tags_directory = Path(directory) / "_manifests" / "tags"
            tags = sorted(os.listdir(tags_directory)) if tags_directory.is_dir() else []
            found[os.path.relpath(directory, repositories)] = {
                tag: (tags_directory / tag / "current" / "link").read_text() for tag in tags
            }
        subdirectories[:] = [name for name in subdirectories if not name.startswith("_")]
    return found
