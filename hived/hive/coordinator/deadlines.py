"""The time limit on a whole WebSocket message, from its first byte to its last.

aiohttp's reader buffers a message until its last fragment and has no deadline of its own, so a
peer that trickles one (a byte a second, or fragments kept open with pings in between) would
hold its buffer, up to ``--max-frame-bytes``, for as long as it likes. ``watch`` puts a
``FrameClock`` between the connection's transport and aiohttp's protocol: it reads only the
frame headers (RFC 6455, section 5.2) of the bytes going by, to know when a message begins and
ends, and cuts the connection once one has been arriving for longer than the limit. Waiting for
hived itself does not count: while aiohttp has paused reading (its queue is full), the limit is
pushed back.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from aiohttp import web

_RECHECK = 1.0  # seconds between looks while reading is paused by hived, not by the peer


class FrameClock:
    """Follows the frames of one direction of a WebSocket, without their payloads. ``since``
    is when the oldest unfinished thing began (a message, or a control frame between messages),
    or None between messages."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self.clock = clock
        self.since: float | None = None
        self._head = bytearray()  # the frame header read so far
        self._left = 0  # payload bytes of the current frame still to come
        self._frame = (False, False)  # the current frame: (a data frame, the last of its message)
        self._open = False  # a data message has begun and its last frame has not ended

    def feed(self, data: bytes | bytearray | memoryview) -> None:
        i, n = 0, len(data)
        while i < n:
            if self._left:
                take = min(self._left, n - i)
                i += take
                self._left -= take
                if not self._left:
                    self._end_frame()
                continue
            if not self._head and self.since is None:
                self.since = self.clock()
            self._head.append(data[i])
            i += 1
            length = _payload_length(self._head)
            if length is None:
                continue
            first = self._head[0]
            self._frame = ((first & 0x0F) < 8, bool(first & 0x80))
            self._head.clear()
            self._left = length
            if not length:
                self._end_frame()

    def _end_frame(self) -> None:
        data, last = self._frame
        if data:
            self._open = not last
        if not self._open:
            self.since = None


def _payload_length(head: bytearray) -> int | None:
    """The payload length a complete header declares, or None while the header is incomplete."""
    if len(head) < 2:
        return None
    short, masked = head[1] & 0x7F, head[1] & 0x80
    extra = {126: 2, 127: 8}.get(short, 0)
    if len(head) < 2 + extra + (4 if masked else 0):
        return None
    return int.from_bytes(head[2:2 + extra], "big") if extra else short


class _Watched(asyncio.Protocol):
    """Stands between the transport and aiohttp's protocol, passing everything on."""

    def __init__(self, inner: asyncio.Protocol, transport: asyncio.Transport, timeout: float,
                 expired: Callable[[], None]):
        self.inner, self.transport, self.timeout, self.expired = inner, transport, timeout, expired
        self.clock = FrameClock()
        self.timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        self.follow(data)
        self.inner.data_received(data)

    def follow(self, data: bytes) -> None:
        was = self.clock.since
        self.clock.feed(data)
        if self.clock.since != was:
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            if self.clock.since is not None:
                self.timer = asyncio.get_running_loop().call_later(
                    self.clock.since + self.timeout - time.monotonic(), self._check)

    def _check(self) -> None:
        if not self.transport.is_reading():  # paused by aiohttp until hived catches up
            self.timer = asyncio.get_running_loop().call_later(_RECHECK, self._check)
            return
        self.timer = None
        self.expired()
        self.transport.abort()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.inner.connection_lost(exc)

    def eof_received(self) -> bool | None:
        return self.inner.eof_received()

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()


def watch(request: web.Request, timeout: float, expired: Callable[[], None]) -> None:
    """Cut ``request``'s connection, once it is a WebSocket, when a message from the other end
    takes longer than ``timeout`` seconds; ``expired`` is called first (to say so). Call it
    before ``prepare``, so the clock sees every byte after the upgrade request."""
    transport = request.transport
    if transport is None:
        return
    watched = _Watched(request.protocol, transport, timeout, expired)
    # Bytes that came after the upgrade request, before this handler ran, wait in aiohttp's
    # protocol to be fed to its WebSocket reader in ``prepare``; the clock must see them first.
    watched.follow(request.protocol._message_tail)
    transport.set_protocol(watched)
