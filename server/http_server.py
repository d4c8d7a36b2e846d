"""The uvicorn server as `diffgentor serve` runs it: slow request heads are cut off, and a signal ends in a clean exit.

* `head_timeout_protocol`: uvicorn's h11 protocol with a deadline for the request head. uvicorn closes idle
  keep-alive connections but waits forever for a head that trickles in (slow-loris); here the head of every request
  must be complete within ``head_timeout_s`` of its first byte (of the connection, for the first request), else the
  connection is closed. Body reads have their own deadline (`limits.BodyLimit`).
* `DrainingServer`: on SIGTERM / SIGINT uvicorn stops accepting and lets in-flight requests finish (the drain), then
  re-raises the signal, which kills the process before the engine cores get `Shutdown` and the ZeroMQ temp dirs are
  removed (exit 143). This server records the signal instead, so `serve` can shut the engines down and exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Generator

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

DEFAULT_HEAD_TIMEOUT_S = 10.0


class _HeadTimeoutH11Protocol(H11Protocol):
    head_timeout_s: float = DEFAULT_HEAD_TIMEOUT_S

    def connection_made(self, transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
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

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.logger.debug("closing a connection whose request head did not arrive in %.1f s", self.head_timeout_s)
            self.transport.close()

    def connection_lost(self, exc) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)


def head_timeout_protocol(head_timeout_s: float) -> type[H11Protocol]:
    """An h11 protocol class for `uvicorn.Config(http=...)` with this head deadline."""
    return type("HeadTimeoutH11Protocol", (_HeadTimeoutH11Protocol,), {"head_timeout_s": float(head_timeout_s)})


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


__all__ = ["DEFAULT_HEAD_TIMEOUT_S", "DrainingServer", "head_timeout_protocol"]
