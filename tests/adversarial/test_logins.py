"""Keys and connections from strangers: wrong keys in parallel, a valid key behind an address
that others have made suspicious (a home NAT), and connections that never say who they are."""

from __future__ import annotations

import asyncio

import aiohttp

from hived.hive.protocol import PROTOCOL_VERSION, Hello, Refused, Welcome, decode, encode
from hived.hive.coordinator.sessions import LoginLimiter

from adversarial.target import run


async def attempt(session: aiohttp.ClientSession, url: str, key: str) -> str:
    """What the coordinator answers a Hello with this key: Welcome, or the refusal's reason."""
    async with session.ws_connect(url, max_msg_size=0) as ws:
        await ws.send_bytes(encode(Hello(PROTOCOL_VERSION, key, "guess", "cpu", 1)))
        msg = await ws.receive(timeout=60)
        if msg.type != aiohttp.WSMsgType.BINARY:
            return f"closed {ws.close_code}"
        m = decode(msg.data)
        return "welcome" if isinstance(m, Welcome) else m.reason if isinstance(m, Refused) else type(m).__name__


def test_wrong_keys_in_parallel_are_checked_no_more_often_than_one_at_a_time_would_be(target):
    async def burst():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            return await asyncio.gather(*(attempt(session, target.url, f"hk_guess{i}") for i in range(300)))

    answers = run(burst())
    target.sent(len(encode(Hello(PROTOCOL_VERSION, "hk_guess100", "guess", "cpu", 1))) * 300, cases=300)
    unknown = sum("unknown or revoked key" in a for a in answers)
    assert unknown <= LoginLimiter().limit, f"{unknown} of 300 parallel guesses were checked and answered"
    assert all("welcome" != a for a in answers)
    target.rounds_go_on(1)


def test_a_valid_key_gets_in_from_an_address_that_sent_wrong_ones(target):
    async def nat():
        async with aiohttp.ClientSession() as session:
            wrong = [await attempt(session, target.url, f"hk_wrong{i}") for i in range(LoginLimiter().limit + 2)]
            assert "too many failed attempts" in wrong[-1]
            return await attempt(session, target.url, target.key("behind-nat"))

    assert run(nat()) == "welcome"
    target.rounds_go_on(1)


def test_connections_that_never_log_in_are_bounded_per_address(target):
    """Silent connections beyond the per-address limit are closed at once, and a valid key from
    the same address still gets in while they hang."""
    async def flood():
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
            silent = [await session.ws_connect(target.url, max_msg_size=0) for _ in range(50)]
            await asyncio.sleep(0.5)
            closed = 0
            for ws in silent:
                try:
                    msg = await ws.receive(timeout=0.2)
                    closed += msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) or msg.type == aiohttp.WSMsgType.BINARY
                except asyncio.TimeoutError:
                    pass
            answer = await attempt(session, target.url, target.key("beside-the-flood"))
            for ws in silent:
                await ws.close()
            return closed, answer

    closed, answer = run(flood())
    target.sent(0, cases=50)  # silent connections: no bytes, only the connections
    assert closed >= 50 - LoginLimiter().pending, f"only {closed} of 50 silent connections were closed"
    assert answer == "welcome"
    target.rounds_go_on(1)
