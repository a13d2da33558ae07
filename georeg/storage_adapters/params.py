"""Reading one driver's block of a registry `storage:` config the way the registry reads it.

The registry takes each parameter from its config file or from `REGISTRY_STORAGE_<DRIVER>_<PARAM>`
in its environment, so deployments keep secrets out of the file; georeg accepts the same variables
for parameters the block leaves out, and also `"${NAME}"` values naming a variable of its own.
Secrets come back as `SecretStr` so that no repr, log line or error message can show them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr

from georeg.errors import ConfigError

_ENV_REFERENCE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class DriverParameters:
    """The parameters of one storage driver, with env fallback, `${NAME}` expansion and typed getters.

    Every error names the key as `storage.<driver>.<param>` and never includes the value, which may
    be a secret.
    """

    def __init__(self, driver: str, parameters: Mapping[str, Any] | None, known: Iterable[str]) -> None:
        self.driver = driver
        if parameters is not None and not isinstance(parameters, Mapping):
            raise ConfigError(f"storage.{driver}: expected a mapping of parameters")
        # The registry matches parameter names case-insensitively for most drivers; people write lowercase.
        self._values = {str(key).lower(): value for key, value in (parameters or {}).items()}
        unknown = set(self._values) - set(known)
        if unknown:
            raise ConfigError(f"storage.{driver}: unknown parameter(s) {', '.join(sorted(unknown))}")

    def key(self, name: str) -> str:
        return f"storage.{self.driver}.{name}"

    def raw(self, name: str) -> Any:
        """The value as given (file first, then REGISTRY_STORAGE_<DRIVER>_<NAME>), `${NAME}` expanded."""
        value = self._values.get(name)
        if value is None or value == "":
            value = os.environ.get(f"REGISTRY_STORAGE_{self.driver}_{name}".upper())
        return self._expand(name, value)

    def _expand(self, name: str, value: Any) -> Any:
        if isinstance(value, str):
            match = _ENV_REFERENCE.fullmatch(value.strip())
            if match:
                variable = match.group(1)
                if variable not in os.environ:
                    raise ConfigError(f"{self.key(name)}: environment variable {variable} is not set")
                return os.environ[variable]
            return value
        if isinstance(value, Mapping):
            return {key: self._expand(f"{name}.{key}", item) for key, item in value.items()}
        return value

    def string(self, name: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.raw(name)
        if value is None or value == "":
            if required:
                raise ConfigError(f"{self.key(name)}: required")
            return default
        if isinstance(value, (Mapping, list, bool)):
            raise ConfigError(f"{self.key(name)}: expected a string")
        return str(value)

    def required(self, name: str) -> str:
        value = self.string(name, required=True)
        assert value is not None
        return value

    def secret(self, name: str, *, required: bool = False) -> SecretStr | None:
        value = self.string(name, required=required)
        return SecretStr(value) if value is not None else None

    def boolean(self, name: str, default: bool) -> bool:
        value = self.raw(name)
        if value is None or value == "":
            return default
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ConfigError(f"{self.key(name)}: expected true or false")

    def integer(self, name: str, default: int | None = None) -> int | None:
        value = self.raw(name)
        if value is None or value == "":
            return default
        try:
            return int(str(value).strip())
        except ValueError:
            raise ConfigError(f"{self.key(name)}: expected an integer") from None

    def mapping(self, name: str) -> dict[str, Any] | None:
        value = self.raw(name)
        if value is None or value == "":
            return None
        if not isinstance(value, Mapping):
            raise ConfigError(f"{self.key(name)}: expected a mapping")
        return {str(key): item for key, item in value.items()}


def normalise_root(root: str | None) -> str:
    """The key prefix the cloud drivers use: they trim '/' from both ends of rootdirectory."""
    return (root or "").strip("/")


def object_key(root: str, path: str) -> str:
    """`<root>/<path>` as the s3, gcs, azure and oss drivers name objects (no leading '/')."""
    path = path.lstrip("/")
    return f"{root}/{path}" if root else path


def directory_key(root: str, directory: str) -> str:
    """The key prefix of every object under `directory`, ending in '/' so that `a/b` lists no `a/bc`."""
    return object_key(root, directory.strip("/") + "/")


def relative_path(root: str, key: str) -> str:
    """The registry path of an object key: `object_key` undone."""
    return key[len(object_key(root, "")) :]


def location_root(root: str) -> str:
    """Roots in a StorageLocation: '/' for none, '/a/b' otherwise, so "", "/" and "a/" vs "/a" agree."""
    return "/" + root


def normalise_endpoint(url: str, key: str, default_scheme: str = "https") -> str:
    """`host[:port][/path]` of an endpoint URL: lowercase host, default port, credentials, query and
    trailing '/' dropped, and no scheme, since http and https to one host reach the same storage."""
    text = url.strip()
    if "://" not in text:
        text = f"{default_scheme}://{text}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ConfigError(f"{key}: not a valid URL") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{key}: expected an http:// or https:// URL")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    if port is not None and port != {"http": 80, "https": 443}[parts.scheme]:
        host = f"{host}:{port}"
    path = re.sub(r"/+", "/", parts.path).rstrip("/")
    return host + path


def public_url(url: str) -> str:
    """An endpoint URL without user info or query string, safe to show in errors."""
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)[-1]
    return f"{parts.scheme}://{netloc}{parts.path}"
