"""The gateway's front door: limits, authentication before the body, and a JSON reader that cannot be bombed.

Everything here runs before a route handler, so it holds for every route, including ones added later:

- ``HardenedHttpTools``: the uvicorn HTTP protocol with a cap on the request line plus headers (431) and a
  deadline for them (slow-loris: a connection that has not sent complete headers within ``read_timeout`` is
  answered 408 and closed; an idle new connection is closed). uvicorn itself has neither.
- ``Guard`` (pure ASGI middleware): the bearer token is checked from the headers (401/403) before a byte of the
  body is read; ``Content-Length`` above ``max_body_bytes`` is refused (413) before reading, and a chunked body
  is read only up to the limit (413) and only within ``read_timeout`` (408). Refused requests reach no handler
  and write no log.
- ``read_json``: strict JSON (NaN, Infinity and numbers that overflow to infinity are a 400), nesting bounded by
  the interpreter's recursion guard (400), and at most ``max_objects`` objects (413) so a body of many small
  objects is stopped while it is parsed, not after.

``Limits.from_env()`` reads the settings (standalone gateway and embedded canary gateway alike):

==========================================  ==========  ======================================================
``MLPLATFORM_GATEWAY_MAX_BODY_BYTES``       1048576     request body (Content-Length or streamed), else 413
``MLPLATFORM_GATEWAY_MAX_INSTANCES``        1000        rows per ``:predict`` / ``:batchPredict``, else 413
``MLPLATFORM_GATEWAY_MAX_HEADER_BYTES``     16384       request line plus headers, else 431
``MLPLATFORM_GATEWAY_READ_TIMEOUT``         10          seconds for the headers, and again for the body (408)
``MLPLATFORM_GATEWAY_MAX_CONNECTIONS``      512         open connections (uvicorn ``limit_concurrency``), 503
==========================================  ==========  ======================================================

Idle keep-alive connections are closed after ``KEEP_ALIVE_SECONDS``.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Callable

from mlplatform.serving.auth import ANONYMOUS, PLATFORM_PRINCIPAL, AuthError, Principal

KEEP_ALIVE_SECONDS = 5
PROBES = frozenset({"/healthz", "/readyz"})  # no token needed (orchestrator probes); /readyz hides details then
MODEL_PREFIX = "/v1/models/"
PRINCIPAL_KEY = "mlplatform.principal"  # in scope["state"]: request.state.__dict__ access via request.state
DRAIN_BYTES = 64 * 1024  # a refused request with a body at most this big keeps its keep-alive connection


class RequestError(Exception):
    """A request the gateway refuses with ``status`` and ``detail`` (never echoing the body)."""

    def __init__(self, status: int, detail: str):
        super().__init__(detail)
        self.status, self.detail = status, detail


def _env_number(name: str, raw: str | None, default: float, kind: type) -> Any:
    if raw is None or not raw.strip():
        return default
    try:
        value = kind(raw.strip())
    except ValueError:
        raise ValueError(f"{name}={raw!r} is not a {kind.__name__}") from None
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name}={raw!r} must be a positive number")
    return value


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int = 1024 * 1024
    max_instances: int = 1000
    max_header_bytes: int = 16 * 1024
    read_timeout: float = 10.0
    max_connections: int = 512

    @classmethod
    def from_env(cls) -> Limits:
        d = cls()
        return cls(
            max_body_bytes=_env_number("MLPLATFORM_GATEWAY_MAX_BODY_BYTES",
                                       os.environ.get("MLPLATFORM_GATEWAY_MAX_BODY_BYTES"), d.max_body_bytes, int),
            max_instances=_env_number("MLPLATFORM_GATEWAY_MAX_INSTANCES",
                                      os.environ.get("MLPLATFORM_GATEWAY_MAX_INSTANCES"), d.max_instances, int),
            max_header_bytes=_env_number("MLPLATFORM_GATEWAY_MAX_HEADER_BYTES",
                                         os.environ.get("MLPLATFORM_GATEWAY_MAX_HEADER_BYTES"), d.max_header_bytes,
                                         int),
            read_timeout=_env_number("MLPLATFORM_GATEWAY_READ_TIMEOUT",
                                     os.environ.get("MLPLATFORM_GATEWAY_READ_TIMEOUT"), d.read_timeout, float),
            max_connections=_env_number("MLPLATFORM_GATEWAY_MAX_CONNECTIONS",
                                        os.environ.get("MLPLATFORM_GATEWAY_MAX_CONNECTIONS"), d.max_connections, int),
        )


# --- JSON ------------------------------------------------------------------------------------------------


def _no_constant(name: str) -> Any:
    raise RequestError(400, f"the body has {name}: JSON numbers must be finite (send null for a missing value)")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise RequestError(400, "the body has a number too large for a float: JSON numbers must be finite")
    return value


def read_json(body: bytes, max_objects: int, too_many: str | None = None) -> Any:
    """Strictly parse ``body``; at most ``max_objects`` JSON objects (``{...}``) are built (else 413
    ``too_many``)."""
    count = 0

    def make_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        nonlocal count
        count += 1
        if count > max_objects:
            raise RequestError(413, too_many or f"the body has more than {max_objects} JSON objects")
        return dict(pairs)

    try:
        text = body.decode("utf-8")
        return json.loads(text, parse_constant=_no_constant, parse_float=_finite_float,
                          object_pairs_hook=make_object)
    except RequestError:
        raise
    except UnicodeDecodeError:
        raise RequestError(400, "the body is not UTF-8") from None
    except RecursionError:
        raise RequestError(400, "the body's JSON is nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise RequestError(400, f"the body is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") \
            from None
    except ValueError as exc:  # e.g. an integer with more digits than int() accepts
        raise RequestError(400, f"the body has an invalid number ({str(exc)[:100]})") from None


def _row(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise RequestError(422, f"{where} must be an object {{feature: value}}")
    for feature, v in value.items():
        if v is not None and not isinstance(v, (int, float, str)):  # bool is an int
            raise RequestError(422, f"{where}: feature values must be numbers, strings, booleans or null "
                                    f"(not {type(v).__name__})")
    return value


def _too_many(max_instances: int, n: int | None = None) -> str:
    got = f"more than {max_instances}" if n is None else f"{n}"
    return (f"the request has {got} instances; the gateway's limit is {max_instances} per request "
            f"(split it into several requests)")


def _instances(payload: dict[str, Any], max_instances: int) -> list[dict[str, Any]]:
    rows = payload["instances"]
    if not isinstance(rows, list) or not rows:
        raise RequestError(422, "instances must be a non-empty list of rows")
    if len(rows) > max_instances:
        raise RequestError(413, _too_many(max_instances, len(rows)))
    return [_row(r, f"instances[{i}]") for i, r in enumerate(rows)]


def predict_rows(body: bytes, max_instances: int) -> list[dict[str, Any]]:
    """Rows of a ``:predict`` body: ``{"instances": [row, ...]}`` or ``{"inputs": row}``."""
    payload = read_json(body, max_instances + 1, _too_many(max_instances))
    if not isinstance(payload, dict):
        raise RequestError(422, "the body must be a JSON object")
    forms = [k for k in ("instances", "inputs") if k in payload]
    if len(forms) != 1 or set(payload) - {"instances", "inputs"}:
        raise RequestError(422, "give either instances (a list of rows) or inputs (one row), nothing else")
    if forms == ["inputs"]:
        return [_row(payload["inputs"], "inputs")]
    return _instances(payload, max_instances)


def batch_rows(body: bytes, max_instances: int) -> tuple[list[dict[str, Any]], list[str | None]]:
    """Rows and routing keys of a ``:batchPredict`` body: ``{"instances": [...], "routing_keys": [...]?}``."""
    payload = read_json(body, max_instances + 1, _too_many(max_instances))
    if not isinstance(payload, dict) or "instances" not in payload or set(payload) - {"instances", "routing_keys"}:
        raise RequestError(422, "give instances (a list of rows) and optionally routing_keys, nothing else")
    rows = _instances(payload, max_instances)
    keys = payload.get("routing_keys")
    if keys is None:
        return rows, [None] * len(rows)
    if not isinstance(keys, list) or len(keys) != len(rows):
        raise RequestError(422, "routing_keys must have one entry per instance")
    if not all(k is None or isinstance(k, str) for k in keys):
        raise RequestError(422, "routing_keys must be strings or null")
    return rows, keys


# --- ASGI middleware ---------------------------------------------------------------------------------------


async def _refuse(send: Callable, status: int, detail: str, close: bool) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    if close:
        headers.append((b"connection", b"close"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Guard:
    """Authenticate from the headers, then read the body within the limits, then call the app.

    ``auth()`` returns the gateway's auth (``identify(authorization) -> Principal``) or None (no auth: every
    request is the platform). The principal is put in ``scope["state"][PRINCIPAL_KEY]``.
    """

    def __init__(self, app: Callable, auth: Callable[[], Any], limits: Limits):
        self.app, self.auth, self.limits = app, auth, limits

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length, chunked, authorization = None, False, None
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    length = -1
            elif name == b"transfer-encoding":
                chunked = True
            elif name == b"authorization":
                authorization = value.decode("latin-1")
        # A refused request whose body we do not read closes its connection, unless the body is small (then
        # uvicorn discards it and the connection stays usable).
        close = chunked or (length or 0) > DRAIN_BYTES
        try:
            principal = self._principal(scope["path"], authorization)
        except AuthError as exc:
            await _refuse(send, exc.status, exc.detail, close)
            return
        if length is not None and (length < 0 or length > self.limits.max_body_bytes):
            await _refuse(send, 413 if length > 0 else 400, self._too_large() if length > 0
                          else "invalid Content-Length", True)
            return
        try:
            async with asyncio.timeout(self.limits.read_timeout):
                body = await self._read(receive)
        except RequestError as exc:
            await _refuse(send, exc.status, exc.detail, True)
            return
        except asyncio.TimeoutError:
            await _refuse(send, 408, f"the body did not arrive within {self.limits.read_timeout:g}s", True)
            return
        if body is None:  # the client went away
            return
        scope.setdefault("state", {})[PRINCIPAL_KEY] = principal
        replayed = False

        async def replay() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    def _too_large(self) -> str:
        return f"the body is larger than the gateway's limit of {self.limits.max_body_bytes} bytes"

    def _principal(self, path: str, authorization: str | None) -> Principal:
        auth = self.auth()
        if auth is None:
            return PLATFORM_PRINCIPAL
        if path in PROBES:
            try:
                return auth.identify(authorization) if authorization else ANONYMOUS
            except AuthError:
                return ANONYMOUS
        principal = auth.identify(authorization)
        if path.startswith(MODEL_PREFIX):
            tenant = path[len(MODEL_PREFIX):].split("/", 1)[0]
            if not principal.may_use(tenant):
                raise AuthError(403, f"this token may not use tenant {tenant!r}'s models")
        return principal

    async def _read(self, receive: Callable) -> bytes | None:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limits.max_body_bytes:
                raise RequestError(413, self._too_large())
            chunks.append(chunk)
            if not message.get("more_body", False):
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def principal_of(scope: dict) -> Principal:
    return scope.get("state", {}).get(PRINCIPAL_KEY, ANONYMOUS)


# --- uvicorn protocol --------------------------------------------------------------------------------------


def hardened_protocol(limits: Limits) -> type | str:
    """uvicorn's httptools protocol with a header size cap and a header deadline (h11 with its size cap if
    httptools is missing: no header deadline then)."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - httptools is in the lock file
        return "h11"

    class HardenedHttpTools(HttpToolsProtocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_bytes = 0  # request line and headers seen by the parser callbacks
            self._pending = 0  # bytes of chunks that ended with the headers still incomplete
            self._began = False  # a message began in the chunk being parsed
            self._header_timer: asyncio.TimerHandle | None = None
            self._in_headers = False
            self._refused = False

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(limits.read_timeout, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if self._in_headers:
                self._refuse(408, b"Request Timeout", b"request headers did not arrive in time")
            elif self.cycle is None and not self.transport.is_closing():
                self.transport.close()  # a new connection that never sent a byte

        def _refuse(self, status: int, reason: bytes, msg: bytes) -> None:
            self._refused = True
            self._disarm()
            if not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: text/plain; charset=utf-8\r\n"
                                     b"content-length: %d\r\nconnection: close\r\n\r\n%s"
                                     % (status, reason, len(msg), msg))
                self.transport.close()

        def _count(self, n: int) -> bool:
            self._header_bytes += n
            if self._header_bytes > limits.max_header_bytes and not self._refused:
                self._refuse(431, b"Request Header Fields Too Large", b"request line and headers are too large")
            return not self._refused

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._refused:
                return
            self._began = False
            super().data_received(data)
            # httptools buffers a header until it is complete before calling on_header: count the raw bytes of
            # chunks after the one a message began in, while its headers are still incomplete.
            if self._in_headers and not self._began:
                self._pending += len(data)
                if self._pending > limits.max_header_bytes and not self._refused:
                    self._refuse(431, b"Request Header Fields Too Large", b"request line and headers are too large")

        def send_400_response(self, msg: str) -> None:
            if not self._refused:
                super().send_400_response(msg)

        def on_message_begin(self) -> None:
            if self._refused:
                return
            super().on_message_begin()
            self._header_bytes, self._pending, self._in_headers, self._began = 0, 0, True, True
            self._arm()

        def on_url(self, url: bytes) -> None:
            if self._count(len(url)):
                super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            if self._count(len(name) + len(value) + 4):
                super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_headers = False
            self._disarm()
            if not self._refused:
                super().on_headers_complete()

        def on_body(self, body: bytes) -> None:
            if not self._refused:
                super().on_body(body)

        def on_message_complete(self) -> None:
            if not self._refused:
                super().on_message_complete()

    return HardenedHttpTools
