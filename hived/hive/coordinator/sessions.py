"""Connections and who is behind them: the login handshake, its rate limit, and each peer's
session. One key is one participant (unless the operator lets a key join more than once at a
time), and a banned key joins not at all."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from aiohttp import WSMsgType, web

from ..keys import KeyStore
from ..protocol import MAX_REPLICAS, PROTOCOL_VERSION, Hello, ProtocolError, Refused, clean_text, decode, encode
from .limits import Limits

if TYPE_CHECKING:
    from .uploads import Upload

log = logging.getLogger("hived.coordinator")


class MessageRate:
    """A token bucket: ``burst`` messages at once, ``rate`` a second over time."""

    def __init__(self, rate: float, burst: int):
        self.rate, self.burst = rate, burst
        self.tokens, self.at = float(burst), time.monotonic()

    def take(self) -> bool:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True


@dataclass
class PeerSession:
    """One connected peer: its connection, the key it logged in with, and how it is doing."""

    id: str
    name: str  # what it calls itself (shown; the key's name is what counts)
    key_name: str
    # Who it is in a round's aggregation: the key's name, or "NAME#2" and on for a key's further
    # connections (--max-connections-per-key), so that the order of updates stays the same run to run.
    participant: str
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
    step_seconds: float = 0.0  # its compute time per inner step, averaged over rounds (0: not measured yet)
    upload: Upload | None = None  # the update being received, part by part
    sent_at: float = 0.0
    holds: int = -1  # the round whose weights it was last sent, on this connection (-1: none)
    transport: asyncio.BaseTransport | None = None  # to drop a peer that no longer reads at once
    rate: MessageRate | None = None

    def drop(self) -> None:
        """Cut the connection without a closing handshake: a peer that stopped reading would
        hold a WebSocket close up as long as it holds a send."""
        if self.transport is not None:
            self.transport.abort()


class LoginLimiter:
    """Logins per address and per key. Failed ones: after ``max_login_failures`` in
    ``login_window`` seconds, a wrong key from that address is refused without a log line, while
    a valid key still gets in (a home NAT shares its address with strangers); the count is taken
    when the key is checked, so parallel connections get no more answers than sequential ones.
    Successful ones: at most ``max_key_logins`` per key in the window, so a peer stuck in a
    reconnection loop costs a Welcome now and then, not one a moment. Connections still logging
    in: at most ``max_pending_logins`` per address, the oldest closed to make room, so silent
    connections cannot pile up nor keep a newer, real one out. At most ``max_addresses``
    addresses and keys are remembered (the least recent forgotten first), so strangers cannot
    grow it without end."""

    def __init__(self, limits: Limits = Limits(), max_addresses: int = 10_000):
        self.limit, self.window, self.pending = limits.max_login_failures, limits.login_window, limits.max_pending_logins
        self.key_limit, self.max_addresses = limits.max_key_logins, max_addresses
        self.failures: OrderedDict[str, deque[float]] = OrderedDict()
        self.logins: OrderedDict[str, deque[float]] = OrderedDict()  # key name → its recent logins
        self.waiting: dict[str, deque[web.WebSocketResponse]] = {}
        self.refusals: Counter[str] = Counter()  # reason → logins refused so far

    def blocked(self, address: str) -> float:
        """Seconds until a wrong key from ``address`` is answered again (0: now)."""
        return self._wait(self.failures, address, self.limit)

    def fail(self, address: str) -> None:
        self._count(self.failures, address, self.limit)

    def key_wait(self, key_name: str) -> float:
        """Seconds until key ``key_name`` may log in again (0: now); a login now is counted."""
        wait = self._wait(self.logins, key_name, self.key_limit)
        if not wait:
            self._count(self.logins, key_name, self.key_limit)
        return wait

    def _wait(self, table: OrderedDict[str, deque[float]], who: str, limit: int) -> float:
        times = table.get(who)
        if times is None:
            return 0.0
        while times and times[0] < time.time() - self.window:
            times.popleft()
        if not times:
            del table[who]
            return 0.0
        return times[0] + self.window - time.time() if len(times) >= limit else 0.0

    def _count(self, table: OrderedDict[str, deque[float]], who: str, limit: int) -> None:
        table.setdefault(who, deque(maxlen=limit)).append(time.time())
        table.move_to_end(who)
        while len(table) > self.max_addresses:
            table.popitem(last=False)

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
                connected: Iterable[PeerSession], limits: Limits) -> PeerSession | None:
    """Read the Hello and check the version and the key; the new session, or None once the
    connection has been refused and closed."""
    crowded = limiter.arrive(address, ws)
    if crowded is not None:
        await crowded.close(code=4002, message=b"too many connections logging in from this address")
    try:
        return await _login(ws, address, limiter, keys, connected, limits)
    finally:
        limiter.leave(address, ws)


async def _login(ws: web.WebSocketResponse, address: str, limiter: LoginLimiter, keys: KeyStore,
                 connected: Iterable[PeerSession], limits: Limits) -> PeerSession | None:
    # ``connected`` is read after the Hello arrives, and nothing is awaited from the checks to the
    # session's registration: connections that log in together are each held to the limits.
    try:
        msg = await ws.receive(timeout=limits.hello_timeout)
        hello = (decode(msg.data, limits.max_hello_bytes, limits.max_message_objects)
                 if msg.type == WSMsgType.BINARY else None)
        if not isinstance(hello, Hello):
            raise ProtocolError("the first frame must be a Hello")
        if not 1 <= hello.replicas <= MAX_REPLICAS:
            raise ProtocolError(f"a peer speaks for 1 to {MAX_REPLICAS} replicas")
    except (ProtocolError, asyncio.TimeoutError) as exc:
        limiter.refusals["timeout" if isinstance(exc, asyncio.TimeoutError) else "malformed"] += 1
        await ws.close(code=1002, message=f"protocol error: {exc}".encode()[:120])
        return None
    if hello.version != PROTOCOL_VERSION:
        limiter.refusals["version"] += 1
        await refuse(ws, f"protocol version {hello.version} is not {PROTOCOL_VERSION}; install the same "
                         "hived version as the coordinator", final=True)
        return None
    key_name, banned = keys.check(hello.key)
    if key_name is None:
        wait = limiter.blocked(address)
        limiter.fail(address)
        limiter.refusals["throttled" if wait else "unknown_key"] += 1
        if wait:
            await refuse(ws, f"too many failed attempts from {address}; try again in {wait:.0f} s")
            return None
        log.warning("refused a peer from %s: unknown or revoked key", address)
        await refuse(ws, "unknown or revoked key; ask the coordinator's operator for a key "
                         "(`hived keys add NAME`)", final=True)
        return None
    if banned:
        limiter.refusals["banned"] += 1
        await refuse(ws, f"key {key_name} is banned ({banned}); the coordinator's operator can lift "
                         f"the ban with `hived keys unban {key_name}`", final=True)
        return None
    # One key, one participant by default: its weight in the aggregation is not multiplied.
    taken = {p.participant: p.address for p in connected if p.key_name == key_name and not p.ws.closed}
    if len(taken) >= limits.max_connections_per_key:
        limiter.refusals["key_in_use"] += 1
        await refuse(ws, f"key {key_name} is already connected (from {', '.join(sorted(set(taken.values())))}); "
                         f"a key joins {limits.max_connections_per_key} time(s) at once: ask the operator for a "
                         "key per machine (`hived keys add NAME`)")
        return None
    if sum(1 for p in connected if p.address == address and not p.ws.closed) >= limits.max_peers_per_address:
        limiter.refusals["address_full"] += 1
        await refuse(ws, f"{limits.max_peers_per_address} peers are already connected from {address}; "
                         "the coordinator's operator can raise --max-peers-per-address")
        return None
    wait = limiter.key_wait(key_name)
    if wait:
        limiter.refusals["key_logins"] += 1
        await refuse(ws, f"key {key_name} has logged in {limiter.key_limit} times in {limiter.window:.0f} s; "
                         f"try again in {wait:.0f} s")
        return None
    participant = next(name for n in range(1, limits.max_connections_per_key + 1)
                       if (name := key_name if n == 1 else f"{key_name}#{n}") not in taken)
    return PeerSession(secrets.token_hex(4), clean_text(hello.name) or key_name, key_name, participant,
                       clean_text(hello.device), hello.replicas, address, ws,
                       rate=MessageRate(limits.max_messages_per_second, limits.message_burst))
