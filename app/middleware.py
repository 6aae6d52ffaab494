"""Pure ASGI middleware: request ids, the body-size limit enforced while reading, metrics, access
logs, and optional bearer API keys."""

from __future__ import annotations

import hmac
import json
import logging
import re
import time
import uuid
from contextvars import ContextVar

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.errors import ApiError, error_body
from app.metrics import Metrics

log = logging.getLogger("app.access")
request_id_var: ContextVar[str] = ContextVar("request_id", default="-")
SAFE_ID = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


class BodyTooLargeError(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(413, "body_too_large", f"request body larger than {limit} bytes")


class RequestContext:
    """Gives every request an id (an incoming X-Request-ID is honoured and returned), refuses bodies
    over ``max_body_bytes`` (by Content-Length up front, and by counting while streaming), and
    writes one access-log line per request."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        incoming = headers.get("x-request-id", "")
        request_id = incoming if SAFE_ID.match(incoming) else uuid.uuid4().hex
        token = request_id_var.set(request_id)
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", [])
                message["headers"] = [*message["headers"], (b"x-request-id", request_id.encode())]
            await send(message)

        try:
            early = self._check_length(headers.get("content-length"))
            if early is not None:
                status_code, code, text = early
                await reply(send_with_id, status_code, code, text)
                return
            received = 0

            async def counted_receive() -> Message:
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body_bytes:
                        raise BodyTooLargeError(self.max_body_bytes)
                return message

            await self.app(scope, counted_receive, send_with_id)
        finally:
            elapsed = time.perf_counter() - started
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope.get("method", "-")
            self.metrics.requests.labels(method=method, route=route, status=str(status)).inc()
            self.metrics.latency.labels(route=route).observe(elapsed)
            log.info("%s %s %d %.1fms", method, scope.get("path", "-"), status, elapsed * 1000)
            request_id_var.reset(token)

    def _check_length(self, value: str | None) -> tuple[int, str, str] | None:
        if value is None:
            return None
        if not value.strip().isdigit() or len(value) > 20:
            return 400, "bad_request", "invalid Content-Length header"
        if int(value) > self.max_body_bytes:
            return 413, "body_too_large", f"request body larger than {self.max_body_bytes} bytes"
        return None


async def reply(send: Send, status: int, code: str, text: str, extra: list[tuple[bytes, bytes]] | None = None) -> None:
    body = json.dumps(error_body(code, text)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers + (extra or [])})
    await send({"type": "http.response.body", "body": body})


class ApiKeyAuth:
    """When keys are configured, every path but the probes, /metrics and the try-it page (``/``
    and ``/static/``, which hold no data: the page asks for a key and sends it with each call)
    needs ``Authorization: Bearer <key>``; keys are compared in constant time."""

    OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics", "/"})

    def __init__(self, app: ASGIApp, keys: list[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] != "http" or not self.keys or path in self.OPEN_PATHS or path.startswith("/static/"):
            await self.app(scope, receive, send)
            return
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        ok = False
        for key in self.keys:  # no early exit: timing does not tell which key matched
            ok |= hmac.compare_digest(token.strip(), key)
        if scheme.lower() != b"bearer" or not ok:
            await reply(send, 401, "unauthorized", "missing or invalid API key", [(b"www-authenticate", b"Bearer")])
            return
        await self.app(scope, receive, send)
