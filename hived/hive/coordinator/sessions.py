"""Connections and who is behind them: the login handshake, its rate limit, and each peer's
session. One key is one participant: a key joins once at a time, and a banned key not at all."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import WSMsgType, web

from ..keys import KeyStore
from ..protocol import (MAX_HELLO_BYTES, MAX_REPLICAS, PROTOCOL_VERSION, Hello, ProtocolError, Refused, clean_text,
                        decode, encode)

if TYPE_CHECKING:
    from .uploads import Upload

log = logging.getLogger("hived.coordinator")
HELLO_TIMEOUT = 15.0  # seconds a new connection has to say who it is


@dataclass
class PeerSession:
    """One connected peer: its connection, the key it logged in with, and how it is doing."""

    id: str
    name: str  # what it calls itself (shown; the key's name is what counts)
    key_name: str
    device: str
    replicas: int  # shares of each round's work (a Ray cluster's workers)
    address: str
    ws: web.WebSocketResponse
    state: str = "joined"  # joined | working | idle
    joined: float = field(default_factory=time.time)
    last_seen: float = field(default_factory=time.time)
    rounds: int = 0
    tokens: int = 0
    tokens_per_sec: float = 0.0
    upload: Upload | None = None  # the update being received, part by part
    sent_at: float = 0.0
    transport: asyncio.BaseTransport | None = None  # to drop a peer that no longer reads at once

    def drop(self) -> None:
        """Cut the connection without a closing handshake: a peer that stopped reading would
        hold a WebSocket close up as long as it holds a send."""
        if self.transport is not None:
            self.transport.abort()


class LoginLimiter:
    """Logins per address. Failed ones: after ``limit`` in ``window`` seconds, a wrong key from
    that address is refused without a log line, while a valid key still gets in (a home NAT
    shares its address with strangers); the count is taken when the key is checked, so parallel
    connections get no more answers than sequential ones. Connections still logging in: at most
    ``pending`` per address, the oldest closed to make room, so silent connections cannot pile
    up nor keep a newer, real one out. At most ``max_addresses`` addresses are remembered (the
    least recently failed are forgotten first), so strangers cannot grow it without end."""

    def __init__(self, limit: int = 5, window: float = 60.0, pending: int = 8, max_addresses: int = 10_000):
        self.limit, self.window, self.pending, self.max_addresses = limit, window, pending, max_addresses
        self.failures: OrderedDict[str, deque[float]] = OrderedDict()
        self.waiting: dict[str, deque[web.WebSocketResponse]] = {}

    def blocked(self, address: str) -> float:
        """Seconds until a wrong key from ``address`` is answered again (0: now)."""
        times = self.failures.get(address)
        if times is None:
            return 0.0
        while times and times[0] < time.time() - self.window:
            times.popleft()
        if not times:
            del self.failures[address]
            return 0.0
        return times[0] + self.window - time.time() if len(times) >= self.limit else 0.0

    def fail(self, address: str) -> None:
        self.failures.setdefault(address, deque(maxlen=self.limit)).append(time.time())
        self.failures.move_to_end(address)
        while len(self.failures) > self.max_addresses:
            self.failures.popitem(last=False)

    def arrive(self, address: str, ws: web.WebSocketResponse) -> web.WebSocketResponse | None:
        """Count a connection that has yet to log in; the one to close to make room, if any."""
        waiting = self.waiting.setdefault(address, deque())
        waiting.append(ws)
        return waiting.popleft() if len(waiting) > self.pending else None

    def leave(self, address: str, ws: web.WebSocketResponse) -> None:
        waiting = self.waiting.get(address)
        if waiting is not None and ws in waiting:
            waiting.remove(ws)
        if not waiting:
            self.waiting.pop(address, None)


async def refuse(ws: web.WebSocketResponse, reason: str, final: bool = False) -> None:
    """Tell the peer why, then close: 4001 for good (do not retry), 4002 for now."""
    await ws.send_bytes(encode(Refused(reason, final)))
    await ws.close(code=4001 if final else 4002, message=reason.encode()[:120])


async def admit(ws: web.WebSocketResponse, address: str, limiter: LoginLimiter, keys: KeyStore,
                connected: Iterable[PeerSession]) -> PeerSession | None:
    """Read the Hello and check the version and the key; the new session, or None once the
    connection has been refused and closed."""
    crowded = limiter.arrive(address, ws)
    if crowded is not None:
        await crowded.close(code=4002, message=b"too many connections logging in from this address")
    try:
        return await _login(ws, address, limiter, keys, connected)
    finally:
        limiter.leave(address, ws)


async def _login(ws: web.WebSocketResponse, address: str, limiter: LoginLimiter, keys: KeyStore,
                 connected: Iterable[PeerSession]) -> PeerSession | None:
    try:
        msg = await ws.receive(timeout=HELLO_TIMEOUT)
        hello = decode(msg.data, MAX_HELLO_BYTES) if msg.type == WSMsgType.BINARY else None
        if not isinstance(hello, Hello):
            raise ProtocolError("the first frame must be a Hello")
        if not 1 <= hello.replicas <= MAX_REPLICAS:
            raise ProtocolError(f"a peer speaks for 1 to {MAX_REPLICAS} replicas")
    except (ProtocolError, asyncio.TimeoutError) as exc:
        await ws.close(code=1002, message=f"protocol error: {exc}".encode()[:120])
        return None
    if hello.version != PROTOCOL_VERSION:
        await refuse(ws, f"protocol version {hello.version} is not {PROTOCOL_VERSION}; install the same "
                         "hived version as the coordinator", final=True)
        return None
    key_name, banned = keys.check(hello.key)
    if key_name is None:
        wait = limiter.blocked(address)
        limiter.fail(address)
        if wait:
            await refuse(ws, f"too many failed attempts from {address}; try again in {wait:.0f} s")
            return None
        log.warning("refused a peer from %s: unknown or revoked key", address)
        await refuse(ws, "unknown or revoked key; ask the coordinator's operator for a key "
                         "(`hived keys add NAME`)", final=True)
        return None
    if banned:
        await refuse(ws, f"key {key_name} is banned ({banned}); the coordinator's operator can lift "
                         f"the ban with `hived keys unban {key_name}`", final=True)
        return None
    other = next((p for p in connected if p.key_name == key_name and not p.ws.closed), None)
    if other is not None:  # one key, one participant: its weight and its strikes are not multiplied
        await refuse(ws, f"key {key_name} is already connected (from {other.address}); each key joins "
                         "once: ask the operator for a key per machine (`hived keys add NAME`)")
        return None
    return PeerSession(secrets.token_hex(4), clean_text(hello.name) or key_name, key_name,
                       clean_text(hello.device), hello.replicas, address, ws)
