"""The uvicorn server as `diffgentor serve` runs it: slow request heads are cut off, and a signal ends in a clean exit.

* `head_timeout_protocol`: uvicorn's h11 protocol with a deadline for the request head. uvicorn closes idle
  keep-alive connections but waits forever for a head that trickles in (slow-loris); here the head of every request
  must be complete within ``head_timeout_s`` of its first byte (of the connection, for the first request), else the
  connection is closed. Body reads have their own deadline (`limits.BodyLimit`).
* `ConnectionLimiter` (used by that protocol): at most ``max_connections`` open connections, of which at most
  ``max_pending`` without a complete request head (new, or kept alive between requests). A connection that would
  pass a cap closes the oldest headless connection of the client holding the most of them, so a flood of half-sent
  heads cannot lock a new client (a health check) out, nor exhaust the process's file descriptors; when every
  connection is busy with a request, the new one is answered 503 and closed. `fd_capped` keeps the caps under the
  process's descriptor limit.
* `DrainingServer`: on SIGTERM / SIGINT uvicorn stops accepting and lets in-flight requests finish (the drain), then
  re-raises the signal, which kills the process before the engine cores get `Shutdown` and the ZeroMQ temp dirs are
  removed (exit 143). This server records the signal instead, so `serve` can shut the engines down and exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import resource
from collections import OrderedDict
from collections.abc import Generator

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from diffgentor.engine.config import DEFAULT_HEAD_TIMEOUT_S

DEFAULT_MAX_CONNECTIONS = 2048
DEFAULT_MAX_PENDING_CONNECTIONS = 512
RESERVED_FDS = 256  # descriptors kept for everything but client connections (engine sockets, files, URL fetches)
_BUSY_BODY = (b'{"error": {"message": "too many open connections; retry later", "type": "server_error", '
              b'"param": null, "code": "too_many_connections"}}')
_BUSY = (b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nconnection: close\r\n"
         b"retry-after: 1\r\ncontent-length: %d\r\n\r\n" % len(_BUSY_BODY)) + _BUSY_BODY


class ConnectionLimiter:
    """The open connections of one server and the caps on them (see the module docstring). Protocols call
    `opened` / `head_done` / `idle` / `closed`; an evicted connection is forgotten at once (its close completes
    later)."""

    def __init__(self, max_connections: int = DEFAULT_MAX_CONNECTIONS,
                 max_pending: int = DEFAULT_MAX_PENDING_CONNECTIONS) -> None:
        self.max_connections = max(1, max_connections)
        self.max_pending = max(1, min(max_pending, self.max_connections))
        self.open: set = set()
        self.pending: dict[str, OrderedDict] = {}  # client host -> its headless connections, oldest first
        self.num_pending = 0
        self.evicted = 0
        self.refused = 0

    def opened(self, proto, host: str) -> bool:
        """Track a new connection; False when it must be refused (every other connection is busy)."""
        while self.num_pending and (self.num_pending >= self.max_pending or len(self.open) >= self.max_connections):
            self._evict()
        if len(self.open) >= self.max_connections:
            self.refused += 1
            return False
        self.open.add(proto)
        self.idle(proto, host)
        return True

    def idle(self, proto, host: str) -> None:
        """The connection waits for a request head (new, or kept alive after a response)."""
        if proto not in self.open:
            return
        self._drop_pending(proto)
        proto._limiter_host = host
        self.pending.setdefault(host, OrderedDict())[proto] = None
        self.num_pending += 1

    def head_done(self, proto) -> None:
        self._drop_pending(proto)

    def closed(self, proto) -> None:
        self._drop_pending(proto)
        self.open.discard(proto)

    def _drop_pending(self, proto) -> bool:
        host = getattr(proto, "_limiter_host", None)
        conns = self.pending.get(host)
        if conns is None or proto not in conns:
            return False
        del conns[proto]
        if not conns:
            del self.pending[host]
        self.num_pending -= 1
        return True

    def _evict(self) -> None:
        host = max(self.pending, key=lambda h: len(self.pending[h]))
        proto, _ = self.pending[host].popitem(last=False)
        if not self.pending[host]:
            del self.pending[host]
        self.num_pending -= 1
        self.open.discard(proto)
        self.evicted += 1
        proto.transport.close()


def fd_capped(max_connections: int, max_pending: int) -> tuple[int, int]:
    """The connection caps, lowered to fit the process's file-descriptor limit (its soft limit raised to the hard
    one first: a server is expected to use what it may)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        want = hard if hard != resource.RLIM_INFINITY else max(soft, max_connections + RESERVED_FDS)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY:
        max_connections = min(max_connections, max(16, soft - RESERVED_FDS))
    return max_connections, min(max_pending, max_connections)


class _HeadTimeoutH11Protocol(H11Protocol):
    head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S
    limiter: ConnectionLimiter | None = None

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        if self.limiter is not None and not self.limiter.opened(self, self.client[0] if self.client else ""):
            transport.write(_BUSY)
            transport.close()
            return
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_timed_out)

    def _disarm_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def data_received(self, data: bytes) -> None:
        if self.conn.their_state is h11.IDLE:
            self._arm_head_timer()  # the first byte of a request on a kept-alive connection
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:
            self._disarm_head_timer()
            if self.limiter is not None:
                self.limiter.head_done(self)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.limiter is not None and self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.limiter.idle(self, self.client[0] if self.client else "")  # kept alive, waiting for a head

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.debug("closing a connection whose request head did not arrive in %.1f s", self.head_timeout_s)
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self._disarm_head_timer()
        if self.limiter is not None:
            self.limiter.closed(self)
        super().connection_lost(exc)


def head_timeout_protocol(head_timeout_s: float, limiter: ConnectionLimiter | None = None) -> type[H11Protocol]:
    """An h11 protocol class for `uvicorn.Config(http=...)` with this head deadline and connection caps."""
    return type("HeadTimeoutH11Protocol", (_HeadTimeoutH11Protocol,),
                {"head_timeout_s": float(head_timeout_s), "limiter": limiter})


class DrainingServer(uvicorn.Server):
    """`uvicorn.Server` that drains on SIGTERM / SIGINT without re-raising the signal afterwards; the signals it
    caught are in `signals`."""

    def __init__(self, config: uvicorn.Config) -> None:
        super().__init__(config)
        self.signals: list[int] = []

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        with super().capture_signals():
            try:
                yield
            finally:
                self.signals = list(self._captured_signals)
                self._captured_signals.clear()  # uvicorn re-raises what is left here once the handlers are restored


__all__ = ["ConnectionLimiter", "DrainingServer", "fd_capped", "head_timeout_protocol"]
