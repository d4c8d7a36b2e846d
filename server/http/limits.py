"""Bounds on what a client can make the API server hold: request bodies counted as they arrive, a global budget of
bytes held for in-flight uploads and downloads, and a body read deadline.

`BodyLimit` is plain ASGI around the app. It wraps ``receive``: every body chunk (JSON or multipart, chunked or
with a Content-Length) is counted the moment it arrives, so a body over ``max_body_bytes`` is refused with 413 after
at most one chunk beyond the cap (a declared Content-Length over the cap is refused before any byte is read), and
every chunk is charged to the request's `Charge` against the shared `ByteBudget`: when the budget is spent the
request is answered 429 (``Retry-After``) before its bytes pile up. Image URL downloads charge the same `Charge`
(`url_fetch`). The bytes stay charged until the response is complete, since the request holds its images that long.
A body that stalls longer than ``body_idle_timeout_s`` between chunks or takes longer than ``body_deadline_s`` in
all is answered 408 and the connection closed (slow clients; the request head has its own deadline in
`http_server`). When a limit trips, the app's own answer (it sees the read fail) is replaced by this module's."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from diffgentor.engine.config import DEFAULT_BODY_DEADLINE_S, DEFAULT_BODY_IDLE_TIMEOUT_S

CHARGE_SCOPE_KEY = "diffgentor.charge"  # an ASGI scope extension key: the request's `Charge`
RETRY_AFTER_S = 1


class BudgetExceeded(Exception):
    """The server-wide budget of bytes held for in-flight requests is spent."""


class ByteBudget:
    """Bytes held for in-flight uploads and downloads, across all requests of one server."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.used = 0

    def available(self) -> int:
        return self.total - self.used

    def take(self, n: int) -> bool:
        if self.used + n > self.total:
            return False
        self.used += n
        return True

    def give(self, n: int) -> None:
        self.used = max(0, self.used - n)


class Charge:
    """The bytes one request holds against a `ByteBudget`; all given back by `release`."""

    def __init__(self, budget: ByteBudget | None) -> None:
        self.budget = budget
        self.held = 0

    def add(self, n: int) -> None:
        if self.budget is None or n <= 0:
            return
        if not self.budget.take(n):
            raise BudgetExceeded(f"the server holds {self.budget.used} bytes for requests in flight")
        self.held += n

    def release(self) -> None:
        if self.budget is not None:
            self.budget.give(self.held)
        self.held = 0


class BodyRejected(Exception):
    """Raised from ``receive`` once a body limit tripped; the app's answer to it is replaced."""


@dataclass
class _Rejection:
    status: int
    message: str
    code: str


def error_message(status: int, message: str, code: str) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers and body of an OpenAI error answer (the same shape as `openai_schemas.OpenAIError.body`)."""
    kind = {413: "invalid_request_error", 408: "invalid_request_error", 429: "rate_limit_error"}.get(
        status, "invalid_request_error")
    body = json.dumps({"error": {"message": message, "type": kind, "param": None, "code": code}}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
               (b"connection", b"close")]
    if status == 429:
        headers.append((b"retry-after", str(RETRY_AFTER_S).encode()))
    return headers, body


class BodyLimit:
    """ASGI middleware: the body limits above, on HTTP requests whose path starts with one of ``prefixes``."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, budget: ByteBudget | None = None,
                 body_idle_timeout_s: float = DEFAULT_BODY_IDLE_TIMEOUT_S,
                 body_deadline_s: float = DEFAULT_BODY_DEADLINE_S, prefixes: tuple[str, ...] = ("/v1/",)) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.budget = budget
        self.body_idle_timeout_s = body_idle_timeout_s
        self.body_deadline_s = body_deadline_s
        self.prefixes = prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefixes):
            await self.app(scope, receive, send)
            return
        charge = Charge(self.budget)
        scope[CHARGE_SCOPE_KEY] = charge
        length = Headers(scope=scope).get("content-length", "")
        early = None
        if length.isdigit() and int(length) > self.max_body_bytes:
            early = _Rejection(413, f"request body larger than {self.max_body_bytes} bytes", "request_too_large")
        elif length.isdigit() and self.budget is not None and int(length) > self.budget.available():
            early = _Rejection(429, "the server is holding too much request data; retry later",
                               "rate_limit_exceeded")
        if early is not None:
            await _send_rejection(send, early)
            return

        rejected: list[_Rejection] = []
        started = False
        body_done = False
        received = 0
        deadline = time.monotonic() + self.body_deadline_s

        def reject(r: _Rejection) -> BodyRejected:
            rejected.append(r)
            return BodyRejected(r.message)

        async def guarded_receive() -> Message:
            nonlocal received, body_done
            if rejected:
                raise BodyRejected(rejected[0].message)
            if body_done:
                return await receive()
            wait = min(self.body_idle_timeout_s, deadline - time.monotonic())
            try:
                msg = await asyncio.wait_for(receive(), timeout=max(0.0, wait))
            except TimeoutError:
                raise reject(_Rejection(408, "the request body arrived too slowly", "request_timeout")) from None
            if msg["type"] != "http.request":
                return msg
            n = len(msg.get("body", b""))
            received += n
            if received > self.max_body_bytes:
                raise reject(_Rejection(413, f"request body larger than {self.max_body_bytes} bytes",
                                        "request_too_large"))
            try:
                charge.add(n)
            except BudgetExceeded:
                raise reject(_Rejection(429, "the server is holding too much request data; retry later",
                                        "rate_limit_exceeded")) from None
            if not msg.get("more_body", False):
                body_done = True
            return msg

        async def guarded_send(msg: Message) -> None:
            nonlocal started
            if rejected and not started:
                return  # the app's answer to a failed read: replaced below
            if msg["type"] == "http.response.start":
                started = True
            await send(msg)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if not rejected or started:
                raise
        finally:
            charge.release()
        if rejected and not started:
            await _send_rejection(send, rejected[0])


async def _send_rejection(send: Send, r: _Rejection) -> None:
    headers, body = error_message(r.status, r.message, r.code)
    await send({"type": "http.response.start", "status": r.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


__all__ = ["BodyLimit", "BodyRejected", "BudgetExceeded", "ByteBudget", "CHARGE_SCOPE_KEY", "Charge",
           "error_message"]
