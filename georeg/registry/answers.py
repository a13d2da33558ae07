"""What a registry's answer means: an error of `georeg.errors` whose message says what to do."""

from __future__ import annotations

import email.utils
import time

import httpx

from georeg.errors import (
    Denied,
    InvalidRequest,
    NotFound,
    PermanentRegistryError,
    RateLimited,
    RegistryError,
    TransientRegistryError,
    Unauthorized,
    Unsupported,
)

_HINTS = {
    401: "check this registry's auth settings (for jwt: key_file, issuer and service must match the registry)",
    403: "the credentials lack permission for this repository",
    405: "the registry refuses this operation; deletes need storage.delete.enabled: true",
}
_ERRORS_BY_STATUS: dict[int, type[RegistryError]] = {
    400: InvalidRequest,
    401: Unauthorized,
    403: Denied,
    404: NotFound,
    405: Unsupported,
}


async def error_from_response(registry: str, response: httpx.Response, *, replayable: bool) -> RegistryError:
    """The error for an answer that was not the one expected (the body is read and the response closed)."""
    await response.aread()
    await response.aclose()
    status = response.status_code
    method = response.request.method
    path = response.request.url.path  # never the query: upload locations carry signed state
    code, detail = _registry_error(response)
    message = f"{registry}: {method} {path} -> {status}{f' {code}' if code else ''}{f': {detail}' if detail else ''}"
    if status in _HINTS:
        message += f" ({_HINTS[status]})"
    kwargs = {"status": status, "code": code, "method": method, "url": path}
    if status == 429:
        return RateLimited(message, retry_after=_retry_after(response), **kwargs)
    if status == 401 and not replayable:
        # A token expired under a streamed upload: the auth flow dropped it, a new attempt mints anew.
        return TransientRegistryError(message, **kwargs)
    if _is_torn_link_read(method, path, status, code):
        return TransientRegistryError(
            f"{message} (the registry read a link file while another request rewrote it; retried)", **kwargs
        )
    error_class = _ERRORS_BY_STATUS.get(status)
    if error_class is not None:
        return error_class(message, **kwargs)
    if status == 408 or status >= 500:
        return TransientRegistryError(message, **kwargs)
    return PermanentRegistryError(message, **kwargs)


def _is_torn_link_read(method: str, path: str, status: int, code: str) -> bool:
    """Registry 2.8 on filesystem storage rewrites a link file in place (truncate, then write) when a
    blob is linked into a repository again; a manifest PUT that checks its blobs meanwhile reads an
    empty link and answers DIGEST_INVALID. georeg PUTs the primary's exact bytes under the digest it
    computed from them, so for georeg that answer means the read was torn, and another attempt a
    moment later succeeds (a 500 on a blob HEAD, the same read elsewhere, is a 5xx and retried anyway)."""
    return method == "PUT" and status == 400 and code == "DIGEST_INVALID" and "/manifests/" in path


def _registry_error(response: httpx.Response) -> tuple[str, str]:
    """The first entry of the registry's `{"errors": [...]}` body, as (code, message)."""
    try:
        errors = response.json().get("errors") or []
        first = errors[0]
        return str(first.get("code", "")), str(first.get("message", ""))
    except (ValueError, AttributeError, IndexError, TypeError):
        return "", response.reason_phrase


def _retry_after(response: httpx.Response) -> float | None:
    value = response.headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(0.0, parsed.timestamp() - time.time()) if parsed else None
