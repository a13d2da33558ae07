"""georeg's configuration: one YAML file, validated by pydantic, every error naming its key.

Where the file is: `--config`, else `$GEOREG_CONFIG`, else `./georeg.yaml`. Relative paths inside
it (key files, CA files) are relative to the file itself, so a config works from any directory.
"""

from __future__ import annotations

import fnmatch
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from georeg.errors import ConfigError

CONFIG_ENV = "GEOREG_CONFIG"
DEFAULT_CONFIG_PATH = Path("georeg.yaml")
MIB = 1024 * 1024
STATUS_TOKEN_MIN_LENGTH = 16


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class NoAuth(_Strict):
    type: Literal["none"] = "none"


class BasicAuth(_Strict):
    """HTTP basic credentials sent with every request."""

    type: Literal["basic"]
    username: str
    password: SecretStr


class TokenAuth(_Strict):
    """The registry's Bearer challenge: fetch tokens from the realm it names, optionally with credentials."""

    type: Literal["token"]
    username: str | None = None
    password: SecretStr | None = None


class JwtAuth(_Strict):
    """GitLab Geo style: georeg mints short-lived tokens itself from the key pair the registries trust."""

    type: Literal["jwt"]
    key_file: Path = Field(description="PEM private key whose certificate is in the registry's rootcertbundle")
    issuer: str = Field(min_length=1, description="must equal the registry's auth.token.issuer")
    service: str = Field(min_length=1, description="must equal the registry's auth.token.service")
    subject: str = "georeg"
    ttl_seconds: int = Field(default=300, ge=10, le=3600, description="lifetime of each minted token")


AuthConfig = Annotated[NoAuth | BasicAuth | TokenAuth | JwtAuth, Field(discriminator="type")]


class RegistryConfig(_Strict):
    url: str = Field(description="base URL of the registry, e.g. http://127.0.0.1:5000")
    auth: AuthConfig = NoAuth()
    storage: dict[str, Any] | None = Field(
        default=None, description="the registry's own `storage:` block, used by storage adapters"
    )
    ca_file: Path | None = None
    insecure: bool = Field(default=False, description="skip TLS verification (only for testing)")
    max_concurrent_copies: int | None = Field(
        default=None, ge=1, le=10_000, description="blob copies in flight against this registry, across all workers"
    )
    requests_per_second: float | None = Field(
        default=None, gt=0, le=100_000, description="requests per second to this registry, across all workers"
    )

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError("must start with http:// or https://")
        return url.rstrip("/")


class SecondaryConfig(RegistryConfig):
    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    mode: Literal["auto", "copy", "shared"] = Field(
        default="auto",
        description="auto: shared when both storage blocks name the same location, else copy; "
        "copy: always copy through the registry API; shared: insist on shared storage (refused if it is not)",
    )


class NotificationsConfig(_Strict):
    """What the receiver accepts: the registry's `Authorization` header must equal one of the secrets."""

    secret: SecretStr | None = None
    secrets: list[SecretStr] = Field(default_factory=list, description="more accepted secrets, for rotation")
    max_body_bytes: int = Field(default=1024 * 1024, ge=1024, le=64 * 1024 * 1024)
    status_token: SecretStr | None = Field(
        default=None,
        description="bearer token `GET /status` requires; without one, /status is refused (403)",
    )

    @field_validator("status_token")
    @classmethod
    def _long_enough(cls, token: SecretStr | None) -> SecretStr | None:
        # The status document names every repository that fails and why: no guessable token guards it.
        if token is not None and len(token.get_secret_value()) < STATUS_TOKEN_MIN_LENGTH:
            raise ValueError(f"must be at least {STATUS_TOKEN_MIN_LENGTH} characters")
        return token

    @model_validator(mode="after")
    def _status_token_is_not_a_secret(self) -> NotificationsConfig:
        # Whoever may read /status must not thereby be able to post events (and the other way round).
        if self.status_token is not None and self.status_token.get_secret_value() in self.accepted_secrets():
            raise ValueError("status_token must differ from notifications.secret and notifications.secrets")
        return self

    def accepted_secrets(self) -> list[str]:
        values = ([self.secret] if self.secret else []) + list(self.secrets)
        return [value.get_secret_value() for value in values]


class DispatchConfig(_Strict):
    """How the receiver turns journaled events into flow runs."""

    mode: Literal["inline", "deployment", "events"] = Field(
        default="inline",
        description="inline: run flows in the receiver's process; deployment: through Prefect; events: Prefect's "
        "own trigger on the receiver's events starts the runs (see `georeg automations apply`)",
    )
    concurrency: int = Field(default=4, ge=1, le=256, description="flow runs in flight at once")
    poll_seconds: float = Field(default=1.0, gt=0, le=60, description="how often due work and runs are checked")
    max_attempts: int = Field(default=10, ge=1, le=1000, description="failed runs of one item before it is parked")
    backoff_cap_seconds: float = Field(default=300.0, ge=1, le=86400)
    run_timeout_seconds: float = Field(
        default=3600.0,
        gt=0,
        description="a deployment flow run not finished by then (its worker died) is ended as crashed and retried",
    )
    batch_size: int = Field(
        default=25, ge=1, le=1000, description="items one flow run takes when more are due than runs are free"
    )
    digest_push_delay_seconds: float = Field(
        default=10.0,
        ge=0,
        le=3600,
        description="how long a push by digest alone waits for the index that usually follows and covers it",
    )
    shutdown_grace_seconds: float = Field(
        default=30.0,
        ge=0,
        le=3600,
        description="on SIGTERM/SIGINT, how long inline runs in flight may take to finish; "
        "what has not finished then goes back to the journal as pending",
    )
    events_fallback_seconds: float = Field(
        default=60.0,
        ge=1,
        le=86400,
        description="events mode: work no triggered run has settled by then is dispatched as in deployment mode",
    )
    replicate_deployment: str = "replicate-image/replicate-image"
    batch_deployment: str = "replicate-images/replicate-images"
    delete_deployment: str = "delete-image/delete-image"


class StateConfig(_Strict):
    url: str = "sqlite:///georeg.db"
    migrate_on_start: bool = Field(
        default=True, description="upgrade an older state database when a process starts (else: georeg db upgrade)"
    )
    retention_days: int = Field(
        default=14, ge=1, le=3650, description="days to keep done journal events and finished run records"
    )


class RepositoryFilter(_Strict):
    """Which repositories to replicate: shell globs such as `group/*`; exclude wins over include."""

    include: list[str] = Field(default_factory=lambda: ["*"])
    exclude: list[str] = Field(default_factory=list)

    def wants(self, repository: str) -> bool:
        return any(fnmatch.fnmatchcase(repository, pattern) for pattern in self.include) and not any(
            fnmatch.fnmatchcase(repository, pattern) for pattern in self.exclude
        )


class TagFilter(_Strict):
    """Which tags to replicate: regular expressions matched against the whole tag; exclude wins."""

    include: str = ".*"
    exclude: str | None = None

    @field_validator("include", "exclude")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as error:
                raise ValueError(f"not a regular expression: {error}") from None
        return pattern

    def wants(self, tag: str) -> bool:
        if not re.fullmatch(self.include, tag):
            return False
        return self.exclude is None or not re.fullmatch(self.exclude, tag)


class ConcurrencyConfig(_Strict):
    """How much georeg does at once, level by level. The levels nest (a backfill's repositories, each
    repository's tags, each image's blobs), so their product can be large; `requests_per_registry`
    caps what actually reaches each registry from one process, whatever the product."""

    blobs_per_image: int = Field(default=4, ge=1, le=64, description="blob copies in flight per image")
    tags_per_repository: int = Field(default=4, ge=1, le=64, description="tags copied at once per repository")
    repositories: int = Field(default=8, ge=1, le=256, description="repositories a backfill or verify works on at once")
    requests_per_registry: int = Field(
        default=32, ge=1, le=1024, description="requests in flight to each registry from one georeg process"
    )


class ReplicationConfig(_Strict):
    repositories: RepositoryFilter = RepositoryFilter()
    tags: TagFilter = TagFilter()
    delete_extra_tags: bool = Field(default=True, description="remove secondary tags the primary no longer has")
    retry_backoff_base_seconds: float = Field(
        default=60.0, ge=0, le=86400, description="wait before a failed repository's first retry; doubles each time"
    )
    retry_backoff_cap_seconds: float = Field(
        default=3600.0, ge=1, le=7 * 86400, description="longest wait before a failed repository is retried"
    )
    concurrency: ConcurrencyConfig = Field(
        default_factory=ConcurrencyConfig,
        description="a mapping of levels, or one number for the three levels (requests_per_registry stays)",
    )
    chunk_size: int = Field(default=32 * MIB, ge=64 * 1024, le=1024 * MIB, description="bytes per PATCH")
    monolithic_max: int = Field(
        default=4 * MIB, ge=0, le=64 * MIB, description="blobs up to this size are uploaded in one PUT"
    )
    request_timeout: float = Field(default=60.0, gt=0, le=3600)
    request_attempts: int = Field(default=4, ge=1, le=10, description="tries per request on transient errors")
    retries_per_image: int = Field(
        default=8, ge=0, le=1000, description="request retries one image may spend in all, across its requests"
    )
    task_retries: int = Field(
        default=2,
        ge=0,
        le=20,
        description="Prefect retries of an image or repository failing where no request retried",
    )
    retry_delay_seconds: float = Field(default=2.0, ge=0, le=600, description="first task retry's wait; doubles")

    @field_validator("concurrency", mode="before")
    @classmethod
    def _one_number_for_every_level(cls, value: object) -> object:
        # `concurrency: 8` was once the only setting, for all three levels: it still means that.
        if isinstance(value, int) and not isinstance(value, bool):
            return {"blobs_per_image": value, "tags_per_repository": value, "repositories": value}
        return value


class BackfillConfig(_Strict):
    """How a backfill shares its work when it runs as a deployment (workers may be on many machines)."""

    fan_out: bool = Field(
        default=True, description="split into flow runs of batch_deployment, for any worker of the pool to take"
    )
    batch_size: int = Field(default=100, ge=1, le=100_000, description="repositories per batch flow run")
    repositories_per_task: int = Field(
        default=50, ge=1, le=10_000, description="repositories per Prefect task run of a backfill or verify"
    )
    batch_deployment: str = "backfill-batch/backfill-batch"
    batch_timeout_seconds: float = Field(
        default=6 * 3600, gt=0, description="a batch not finished by then (its worker died) counts as failed"
    )
    lease_seconds: float = Field(
        default=300, ge=5, le=86400, description="how long a backfill that died keeps the next one out"
    )
    recheck_days: float = Field(
        default=7,
        gt=0,
        le=365,
        description="every repository's secondary tags are HEADed again within this time, instead of "
        "trusting georeg's record of what it wrote",
    )


class AutomationsConfig(_Strict):
    """The Prefect automations `georeg automations apply` creates (see georeg.automations)."""

    failures_per_hour: int = Field(
        default=3, ge=1, le=10_000, description="failed replications of a repository within an hour that start a verify"
    )
    backfill_interval_seconds: float = Field(
        default=6 * 3600,
        ge=10,
        le=30 * 86400,
        description="the backfill deployment's schedule; no completed backfill of a secondary in twice this alerts",
    )
    notify_block: str | None = Field(
        default=None,
        pattern=r"^[a-z0-9-]+/[A-Za-z0-9_-]+$",
        description="a Prefect notification block, as <block-type-slug>/<name> (e.g. custom-webhook/georeg-alerts)",
    )
    verify_deployment: str = "verify/verify"


class GeoregConfig(_Strict):
    primary: RegistryConfig
    secondaries: list[SecondaryConfig] = Field(min_length=1)
    notifications: NotificationsConfig = NotificationsConfig()
    state: StateConfig = StateConfig()
    replication: ReplicationConfig = ReplicationConfig()
    dispatch: DispatchConfig = DispatchConfig()
    backfill: BackfillConfig = BackfillConfig()
    automations: AutomationsConfig = AutomationsConfig()

    @field_validator("dispatch", mode="before")
    @classmethod
    def _dispatch_shorthand(cls, value: Any) -> Any:
        return {"mode": value} if isinstance(value, str) else value

    @model_validator(mode="after")
    def _unique_secondary_names(self) -> GeoregConfig:
        names = [secondary.name for secondary in self.secondaries]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"secondary names must be unique, repeated: {', '.join(duplicates)}")
        return self

    def select_secondaries(self, name: str | None = None) -> list[SecondaryConfig]:
        """All secondaries, or the one called `name`."""
        if name is None:
            return list(self.secondaries)
        for secondary in self.secondaries:
            if secondary.name == name:
                return [secondary]
        known = ", ".join(secondary.name for secondary in self.secondaries)
        raise ConfigError(f"no secondary named {name!r} in the config (known: {known})")


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    if explicit:
        return Path(explicit)
    return Path(os.environ.get(CONFIG_ENV) or DEFAULT_CONFIG_PATH)


def load_config(path: str | os.PathLike[str] | None = None) -> GeoregConfig:
    """Read and validate the config; raise ConfigError naming the file and the bad key."""
    location = config_path(path)
    try:
        raw = yaml.safe_load(location.read_text())
    except FileNotFoundError:
        raise ConfigError(
            f"config file {location} not found: pass --config, set ${CONFIG_ENV}, or create ./georeg.yaml"
        ) from None
    except yaml.YAMLError as error:
        raise ConfigError(f"{location}: not valid YAML: {error}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{location}: expected a mapping with 'primary' and 'secondaries' at the top")
    return parse_config(raw, base_dir=location.resolve().parent, source=str(location))


def parse_config(raw: dict[str, Any], *, base_dir: Path, source: str = "config") -> GeoregConfig:
    try:
        config = GeoregConfig.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(f"{_key_path(e['loc'])}: {e['msg']}" for e in error.errors())
        raise ConfigError(f"{source}: {problems}") from None
    return _resolve_files(config, base_dir, source)


def _key_path(location: tuple[int | str, ...]) -> str:
    """('secondaries', 0, 'auth', 'jwt', 'key_file') -> 'secondaries[0].auth.key_file'."""
    text = ""
    previous: int | str | None = None
    for part in location:
        if isinstance(part, int):
            text += f"[{part}]"
        elif previous == "auth" and part in {"none", "basic", "token", "jwt"}:
            pass  # pydantic adds the union tag to the path; people never write it
        else:
            text += f".{part}" if text else part
        previous = part
    return text or "(top level)"


def _resolve_files(config: GeoregConfig, base_dir: Path, source: str) -> GeoregConfig:
    """Make relative key and CA paths relative to the config file, and check they exist."""

    def resolve(registry: RegistryConfig, key: str) -> RegistryConfig:
        updates: dict[str, Any] = {}
        if registry.ca_file is not None:
            updates["ca_file"] = _existing(base_dir / registry.ca_file, f"{key}.ca_file", source)
        if isinstance(registry.auth, JwtAuth):
            key_file = _existing(base_dir / registry.auth.key_file, f"{key}.auth.key_file", source)
            updates["auth"] = registry.auth.model_copy(update={"key_file": key_file})
        return registry.model_copy(update=updates) if updates else registry

    return config.model_copy(
        update={
            "primary": resolve(config.primary, "primary"),
            "secondaries": [resolve(s, f"secondaries[{i}]") for i, s in enumerate(config.secondaries)],
            "state": config.state.model_copy(update={"url": _absolute_sqlite(config.state.url, base_dir)}),
        }
    )


def _absolute_sqlite(url: str, base_dir: Path) -> str:
    """`sqlite:///georeg.db` means next to the config file, wherever the process runs (workers too)."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix + ":memory:":
        return prefix + str(base_dir / url[len(prefix) :])
    return url


def _existing(path: Path, key: str, source: str) -> Path:
    if not path.is_file():
        raise ConfigError(f"{source}: {key}: file {path} does not exist")
    return path
