"""Every error georeg raises, in one tree.

    GeoregError
    ├── ConfigError                  the config file is wrong; names the key
    ├── InvalidReference             a repository, tag or digest breaks the distribution grammar
    ├── RegistryError                a registry answered something other than what we asked for
    │   ├── TransientRegistryError   worth retrying: connection failures, 5xx, 429, 408
    │   │   └── RateLimited          429, carries Retry-After
    │   └── PermanentRegistryError   retrying will not help until a person acts
    │       ├── NotFound             404 (MANIFEST_UNKNOWN, BLOB_UNKNOWN, NAME_UNKNOWN, ...)
    │       ├── Unauthorized         401 even with a fresh token
    │       ├── Denied               403
    │       ├── InvalidRequest       400 (MANIFEST_BLOB_UNKNOWN, DIGEST_INVALID, ...)
    │       └── Unsupported          405 (for example deletes disabled on the registry)
    ├── IntegrityError               bytes whose digest is not the one they were asked for
    ├── ReplicationError             an image could not be made equal on a secondary
    └── StateSchemaError             the state database's schema is older or newer than this georeg's

`transient` tells the retry machinery whether another attempt can succeed, so nothing else has to
parse messages; `exhausted` says that one layer has already retried it as often as its budget allows,
so no layer above retries it again (the policy: `georeg.retries`).
"""

from __future__ import annotations


class GeoregError(Exception):
    """Root of georeg's errors. `transient` says whether retrying may help, `exhausted` whether a
    layer already spent its retries on it."""

    transient: bool = False
    exhausted: bool = False

    @property
    def worth_retrying(self) -> bool:
        """Whether the layer that sees this error should try again."""
        return self.transient and not self.exhausted


class ConfigError(GeoregError):
    """The configuration is invalid; the message names the offending key."""


class InvalidReference(GeoregError):
    """A repository name, tag or digest is not valid per the distribution grammar."""


class RegistryError(GeoregError):
    """A registry request failed. Carries what a person needs to act on it."""

    def __init__(
        self,
        message: str,
        *,
        status: int | None = None,
        code: str | None = None,
        method: str | None = None,
        url: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.method = method
        self.url = url


class TransientRegistryError(RegistryError):
    """The registry or the network failed in a way that another attempt may not."""

    transient = True


class RateLimited(TransientRegistryError):
    """429 Too Many Requests; `retry_after` is the registry's Retry-After in seconds, if given."""

    def __init__(self, message: str, *, retry_after: float | None = None, **kwargs: object) -> None:
        super().__init__(message, **kwargs)  # type: ignore[arg-type]
        self.retry_after = retry_after


class PermanentRegistryError(RegistryError):
    """Retrying will not help until something is changed by a person."""


class NotFound(PermanentRegistryError):
    """404: the manifest, blob, repository or upload does not exist."""


class Unauthorized(PermanentRegistryError):
    """401 although credentials were (re)sent: they are wrong or lack the scope."""


class Denied(PermanentRegistryError):
    """403: the registry forbids this operation for these credentials."""


class InvalidRequest(PermanentRegistryError):
    """400: the registry rejected what we sent (for example a manifest whose blobs it lacks)."""


class Unsupported(PermanentRegistryError):
    """405: the registry does not allow this operation (deletes disabled, read-only mode)."""


class IntegrityError(GeoregError):
    """Bytes did not hash to the digest they were fetched by: the source copy is corrupt."""


class ReplicationError(GeoregError):
    """An image could not be made equal on a secondary; the message says which and why."""


class StateSchemaError(GeoregError):
    """The state database is at a schema revision this georeg does not work with; the message says
    what to do (run `georeg db upgrade`, or upgrade georeg)."""
