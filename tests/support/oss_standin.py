"""A stand-in for Alibaba Cloud OSS, not an emulator: no OSS emulator exists, so the oss adapter is
tested against this small HTTP server that answers the few calls oss2 makes (PUT bucket, PUT / HEAD /
GET object, and GET bucket, which lists objects by prefix a page at a time) in OSS's wire format,
path-style (`/<bucket>/<key>`, what oss2 sends to an IP address) or virtual-hosted (`Host:
<bucket>.<endpoint>`). Signatures are not checked; every request is recorded, so tests can check
what the adapter sent (method, path, signed or not).
"""

from __future__ import annotations

import hashlib
import threading
import uuid
from dataclasses import dataclass
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from urllib.parse import parse_qs, unquote, urlsplit
from xml.sax.saxutils import escape


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    bucket: str
    key: str
    authorization: str  # the header as sent: tests check it is signed, not its signature


class OssStandIn:
    """Buckets of objects in memory behind an HTTP server on 127.0.0.1, in a thread of this process."""

    def __init__(self) -> None:
        self.buckets: dict[str, dict[str, bytes]] = {}
        self.requests: list[RecordedRequest] = []
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> OssStandIn:
        self._thread = threading.Thread(target=self._server.serve_forever, name="oss-standin", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=10)
            self._thread = None
        self._server.server_close()

    def record(self, request: RecordedRequest) -> None:
        with self._lock:
            self.requests.append(request)

    def __enter__(self) -> OssStandIn:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()


def _etag(data: bytes) -> str:
    """OSS's ETag of an object put in one request: the MD5 of its contents, in upper-case hex, quoted."""
    return f'"{hashlib.md5(data).hexdigest().upper()}"'


def _handler(store: OssStandIn) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: object) -> None:  # quiet: requests are recorded instead
            pass

        def _target(self) -> tuple[str, str]:
            path = unquote(urlsplit(self.path).path)
            host = (self.headers.get("Host") or "").split(":")[0]
            if host and not host.replace(".", "").isdigit() and host != "localhost" and "." in host:
                return host.split(".", 1)[0], path.lstrip("/")  # virtual-hosted style
            bucket, _, key = path.lstrip("/").partition("/")
            return bucket, key

        def _answer(self, status: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
            self.send_response(status)
            self.send_header("x-oss-request-id", uuid.uuid4().hex.upper())
            self.send_header("Date", formatdate(usegmt=True))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if "Content-Length" not in (headers or {}):
                self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, code: str, bucket: str, key: str) -> None:
            body = (
                f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{code}</Message>'
                f"<RequestId>standin</RequestId><HostId>127.0.0.1</HostId><BucketName>{bucket}</BucketName>"
                f"<Key>{key}</Key></Error>"
            ).encode()
            self._answer(status, body, {"Content-Type": "application/xml", "x-oss-ec": code})

        def _start(self) -> tuple[str, str]:
            bucket, key = self._target()
            store.record(RecordedRequest(self.command, bucket, key, self.headers.get("Authorization", "")))
            return bucket, key

        def do_PUT(self) -> None:
            bucket, key = self._start()
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            with store._lock:
                if not key:
                    store.buckets.setdefault(bucket, {})
                    return self._answer(200)
                if bucket not in store.buckets:
                    return self._error(404, "NoSuchBucket", bucket, key)
                store.buckets[bucket][key] = body
            self._answer(200, headers={"ETag": _etag(body)})

        def _object(self) -> None:
            bucket, key = self._start()
            if not key and self.command == "GET":
                return self._list(bucket)
            with store._lock:
                objects = store.buckets.get(bucket)
                data = None if objects is None else objects.get(key)
            if objects is None:
                return self._error(404, "NoSuchBucket", bucket, key)
            if data is None:
                return self._error(404, "NoSuchKey", bucket, key)
            self._answer(
                200,
                data,
                {
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(len(data)),
                    "ETag": _etag(data),
                    "Last-Modified": formatdate(usegmt=True),
                    "x-oss-object-type": "Normal",
                },
            )

        def _list(self, bucket: str) -> None:
            query = {name: values[0] for name, values in parse_qs(urlsplit(self.path).query).items()}
            prefix, marker, limit = query.get("prefix", ""), query.get("marker", ""), int(query.get("max-keys", "100"))
            with store._lock:
                objects = store.buckets.get(bucket)
                listed = sorted((k, v) for k, v in (objects or {}).items() if k.startswith(prefix) and k > marker)
            if objects is None:
                return self._error(404, "NoSuchBucket", bucket, "")
            page, truncated = listed[:limit], len(listed) > limit
            contents = "".join(
                f"<Contents><Key>{escape(key)}</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>"
                f"<ETag>{_etag(data)}</ETag><Type>Normal</Type><Size>{len(data)}</Size>"
                "<StorageClass>Standard</StorageClass></Contents>"
                for key, data in page
            )
            body = (
                f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult><Name>{bucket}</Name>'
                f"<Prefix>{escape(prefix)}</Prefix><Marker>{escape(marker)}</Marker><MaxKeys>{limit}</MaxKeys>"
                f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>"
                + (f"<NextMarker>{escape(page[-1][0])}</NextMarker>" if truncated else "")
                + f"{contents}</ListBucketResult>"
            ).encode()
            self._answer(200, body, {"Content-Type": "application/xml"})

        do_HEAD = _object
        do_GET = _object

    return Handler
